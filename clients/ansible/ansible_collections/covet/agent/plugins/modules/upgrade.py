#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: Covet Agent contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: upgrade
short_description: Upgrade an app through covet-agent's journaled runbook
version_added: "0.1.0"
description:
  - Starts C(UpgradeService/Upgrade) on the host's agent and follows the operation to its end.
    The agent runs the whole runbook (preflight, backup, package, config, migrate, restart,
    health gate, optional watch) under the app's lock, and rolls the app back by itself when
    a step fails.
  - Fleet behaviour comes from Ansible (C(serial), C(max_fail_percentage), C(throttle), forks);
    the agent's operation is the unit of work per host.
  - Needs an operator or admin certificate.
extends_documentation_fragment:
  - covet.agent.agent
  - ansible.builtin.action_common_attributes
options:
  app:
    description:
      - The app, as declared in the agent's configuration.
    type: str
    required: true
  version:
    description:
      - The version to install.
    type: str
    required: true
  env_set:
    description:
      - Keys to set in the app's env file. The values are kept out of Ansible's logs, and the
        agent redacts them in the diff.
    type: dict
    default: {}
  env_rename:
    description:
      - Keys to rename in the app's env file, each old name mapped to its new name.
    type: dict
    default: {}
  env_unset:
    description:
      - Keys to remove from the app's env file.
    type: list
    elements: str
    default: []
  watch:
    description:
      - After the health gate, probe health this long (C(90), C(90s), C(5m), C(1h));
        a regression rolls back.
    type: str
  force:
    description:
      - Upgrade even if the app is unhealthy now.
    type: bool
    default: false
  no_rollback:
    description:
      - Do not roll back on failure (the operation then ends failed).
    type: bool
    default: false
attributes:
  platform:
    support: full
    platforms: posix
  check_mode:
    support: full
    details:
      - Check mode is the agent's dry run (C(UpgradeService/PlanUpgrade)), the preflight and the
        migration's dry run in a scratch environment; the plan is in the result and nothing changes.
  diff_mode:
    support: full
    details:
      - The env file's changed lines (values redacted by the agent).
notes:
  - C(changed) is false when the app is already at O(version) (the agent's preflight says so).
  - A rolled-back upgrade fails the task with the cause and C(rolled_back=true); an upgrade
    whose rollback failed fails it with C(needs_human), what is left and where the backup is.
author:
  - Covet Agent contributors (@covet-agent)
"""

EXAMPLES = r"""
- name: Upgrade CovetPy, canary first, stop at the first failed host
  hosts: covet
  connection: local
  gather_facts: false
  serial: [1, "25%"]
  max_fail_percentage: 0
  vars:
    ansible_python_interpreter: "{{ ansible_playbook_python }}"
  tasks:
    - name: Upgrade to 0.2.0, renaming the database key
      covet.agent.upgrade:
        app: covet
        version: 0.2.0
        env_rename:
          DATABASE_URI: DATABASE_URL
        watch: 5m

- name: The plan only (ansible-playbook --check --diff)
  hosts: covet
  connection: local
  gather_facts: false
  tasks:
    - name: Plan the upgrade
      covet.agent.upgrade:
        app: covet
        version: 0.2.0
      check_mode: true
      register: plan
"""

RETURN = r"""
operation_id:
  description: The upgrade's operation id (C(covetctl ops show ID)).
  returned: when an operation was started
  type: str
  sample: op-20261124-045501-3f2a
operation:
  description: The operation as it ended.
  returned: when an operation was started
  type: dict
  contains:
    id:
      description: Its id.
      type: str
    state:
      description: succeeded, rolled_back, needs_human, failed or canceled.
      type: str
    cause:
      description: Why it failed or was rolled back.
      type: str
    needs_human:
      description: What is left in which state, and where the backup is.
      type: str
    backup_id:
      description: The backup the upgrade made.
      type: str
    params:
      description: from_version, to_version and the edits asked.
      type: dict
    steps:
      description: The steps run, each with its name, outcome and detail.
      type: list
      elements: dict
rolled_back:
  description: Whether the agent rolled the app back.
  returned: always
  type: bool
needs_human:
  description: For an upgrade whose rollback failed, what is left.
  returned: when the operation needs a human
  type: str
from_version:
  description: The version before.
  returned: success
  type: str
version:
  description: The version asked.
  returned: always
  type: str
plan:
  description: The agent's dry run (check mode).
  returned: check mode
  type: dict
  contains:
    from_version:
      description: The version installed now.
      type: str
    steps:
      description: The steps that would run, in words.
      type: list
      elements: str
    migration_dry_run:
      description: The migrate command's dry-run output.
      type: list
      elements: str
    blockers:
      description: What would block the upgrade.
      type: list
      elements: str
    env_diff:
      description: The env file lines that would change.
      type: list
      elements: str
env_diff:
  description: The env file lines the upgrade changed (or would change, in check mode).
  returned: always
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.covet.agent.plugins.module_utils.covet_client import (
    COMMON_ARGS,
    PLAN_TIMEOUT,
    CovetClient,
    operations_pb2,
    parse_duration,
    upgrades_pb2,
)


def already_at(message, app, version):
    """The agent's preflight refusal for an installed version."""
    return message.strip() == "%s is already at %s" % (app, version)


def env_edits(params):
    edits = []
    for key, value in sorted(params["env_set"].items()):
        edits.append(upgrades_pb2.EnvEdit(set=upgrades_pb2.EnvSet(key=key, value=str(value))))
    for old, new in sorted(params["env_rename"].items()):
        # `from` is a Python keyword.
        edits.append(upgrades_pb2.EnvEdit(rename=upgrades_pb2.EnvRename(**{"from": old, "to": str(new)})))
    for key in params["env_unset"]:
        edits.append(upgrades_pb2.EnvEdit(unset=upgrades_pb2.EnvUnset(key=key)))
    return edits


def diff_of(lines, env_file="env file"):
    return dict(before_header=env_file, after_header=env_file, prepared="\n".join(lines) + "\n") if lines else {}


def main():
    argument_spec = dict(
        COMMON_ARGS,
        app=dict(type="str", required=True),
        version=dict(type="str", required=True),
        # Values are often secrets: kept out of logs (the agent redacts them in diffs).
        env_set=dict(type="dict", default={}, no_log=True),
        env_rename=dict(type="dict", default={}),
        env_unset=dict(type="list", elements="str", default=[]),
        watch=dict(type="str"),
        force=dict(type="bool", default=False),
        no_rollback=dict(type="bool", default=False),
    )
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    p = module.params
    request = upgrades_pb2.UpgradeRequest(
        app=p["app"],
        to_version=p["version"],
        env_edits=env_edits(p),
        no_rollback=p["no_rollback"],
        force=p["force"],
    )
    if p["watch"] is not None:
        seconds = parse_duration(p["watch"])
        if seconds is None:
            module.fail_json(msg="watch: %r is not a duration (90, 90s, 500ms, 5m, 1h)" % p["watch"])
        request.watch.FromNanoseconds(int(seconds * 1e9))
    client = CovetClient(module)
    base = dict(app=p["app"], version=p["version"], rolled_back=False)

    if module.check_mode:
        plan = client.call(client.upgrades.PlanUpgrade, request, timeout=max(p["timeout"], PLAN_TIMEOUT))
        result = dict(
            base,
            plan=dict(
                from_version=plan.from_version,
                to_version=plan.to_version,
                steps=list(plan.steps),
                migration_dry_run=list(plan.migration_dry_run),
                blockers=list(plan.blockers),
                env_diff=list(plan.env_diff),
            ),
            env_diff=list(plan.env_diff),
        )
        blockers = [b for b in plan.blockers if not already_at(b, p["app"], p["version"])]
        if len(blockers) < len(plan.blockers) and not blockers:
            client.exit(changed=False, msg="%s is already at %s" % (p["app"], p["version"]), **result)
        if blockers:
            client.fail("%s: the upgrade of %s to %s would not start: %s"
                        % (client.endpoint, p["app"], p["version"], "; ".join(blockers)), **result)
        client.exit(changed=True, diff=diff_of(result["env_diff"]), from_version=plan.from_version, **result)

    def installed(error):
        if error.code().name == "FAILED_PRECONDITION" and already_at(error.details() or "", p["app"], p["version"]):
            return False
        return None

    op = client.call(client.upgrades.Upgrade, request, on_error=installed)
    if op is False:
        client.exit(changed=False, msg="%s is already at %s" % (p["app"], p["version"]), env_diff=[], **base)
    final, outputs = client.follow(op.id)
    lines = outputs.get("config", [])
    result = dict(base, from_version=final.params.get("from_version", ""), env_diff=lines)
    del result["rolled_back"]  # finish() says
    if final.state == operations_pb2.OPERATION_STATE_SUCCEEDED:
        result["diff"] = diff_of(lines)
    client.finish(final, what="upgrade of %s to %s" % (p["app"], p["version"]), **result)


if __name__ == "__main__":
    main()
