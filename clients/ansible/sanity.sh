#!/usr/bin/env bash
# Runs `ansible-test sanity --local` on the built collection:
#   PYTHON=venv/bin/python clients/ansible/sanity.sh WORK_DIR [ansible-test args]
# builds it (build.sh) into WORK_DIR/build, installs it into
# WORK_DIR/collections and runs every sanity test there, on Python 3.11.
#
# ansible-test makes a venv per sanity test and bootstraps pip in each with
# a script it downloads from ci-files.testing.ansible.com, which is not
# reachable here; get_pip_standin.py takes its place in ansible-test's
# cache (pip from the interpreter's own ensurepip). The tests' pinned
# requirements still come from PyPI. ANSIBLE_TEST_HOME (default
# WORK_DIR/home) is the HOME ansible-test keeps those venvs under: point it
# somewhere lasting and reruns take seconds.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${1:?usage: sanity.sh WORK_DIR [ansible-test args]}"
shift
python="${PYTHON:-python3}"
mkdir -p "$work"
work="$(cd "$work" && pwd)"
home="${ANSIBLE_TEST_HOME:-$work/home}"

tarball="$("$here/build.sh" "$work/build")"
rm -rf "$work/collections"
# Not from a directory holding ansible_collections/: `python -m` puts the
# current directory on sys.path, and ansible-galaxy would find it installed.
cd "$work"
"$python" -m ansible.cli.galaxy collection install --force -p "$work/collections" "$tarball" >/dev/null
cache="$home/.ansible/test/cache"
mkdir -p "$cache"
cp "$here/get_pip_standin.py" "$cache/get_pip_23_1_2.py"
# ansible-test's own entry point, run by this python (no script shebang).
stub="$("$python" -c 'import ansible_test, os; print(os.path.join(os.path.dirname(ansible_test.__file__), "_util/target/cli/ansible_test_cli_stub.py"))')"
cd "$work/collections/ansible_collections/covet/agent"
HOME="$home" "$python" "$stub" sanity --local --python 3.11 "$@"
