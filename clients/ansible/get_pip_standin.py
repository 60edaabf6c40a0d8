# Stand-in for ansible-test's pip bootstrap script (its download host,
# ci-files.testing.ansible.com, is not reachable here): pip from the
# interpreter's own ensurepip, then `pip install` of what was asked.
import runpy
import subprocess
import sys

subprocess.check_call([sys.executable, "-m", "ensurepip", "--default-pip"],
                      stdout=subprocess.DEVNULL)
# get-pip.py takes `pip install`'s arguments.
sys.argv[1:1] = ["install"]
runpy.run_module("pip", run_name="__main__", alter_sys=True)
