#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: Covet Agent contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: rollback
short_description: Roll an app back through covet-agent
version_added: "0.1.0"
description:
  - Starts C(UpgradeService/Rollback) and follows the operation to its end. The app is put back
    exactly as it was before its last succeeded upgrade (package, env file, database, other
    changed paths; then start and the health gate), or as in a given backup.
  - An upgrade is undone once; running this again undoes the upgrade before it. It is not
    idempotent on purpose.
  - Needs an operator certificate (admin to name a backup other than the last upgrade's).
extends_documentation_fragment:
  - covet.agent.agent
  - ansible.builtin.action_common_attributes
options:
  app:
    description:
      - The app, as declared in the agent's configuration.
    type: str
    required: true
  backup_id:
    description:
      - Roll back to this backup; default the backup of the last succeeded upgrade.
    type: str
attributes:
  platform:
    support: full
    platforms: posix
  check_mode:
    support: partial
    details:
      - The agent has no dry run of a rollback; check mode reports what would be asked and
        changes nothing.
  diff_mode:
    support: none
author:
  - Covet Agent contributors (@covet-agent)
"""

EXAMPLES = r"""
- name: Undo the last upgrade on every host, one at a time
  hosts: covet
  connection: local
  gather_facts: false
  serial: 1
  tasks:
    - name: Roll back
      covet.agent.rollback:
        app: covet
"""

RETURN = r"""
operation_id:
  description: The rollback's operation id.
  returned: when an operation was started
  type: str
operation:
  description: The operation as it ended (id, state, cause, needs_human, backup_id, params, steps).
  returned: when an operation was started
  type: dict
rolled_back:
  description: Always false for a rollback (it has no rollback of its own).
  returned: when an operation was started
  type: bool
needs_human:
  description: When the rollback failed, what is left.
  returned: when the operation needs a human
  type: str
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.covet.agent.plugins.module_utils.covet_client import (
    COMMON_ARGS,
    CovetClient,
    upgrades_pb2,
)


def main():
    argument_spec = dict(
        COMMON_ARGS,
        app=dict(type="str", required=True),
        backup_id=dict(type="str"),
    )
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    p = module.params
    client = CovetClient(module)
    if module.check_mode:
        client.exit(changed=True, msg="would roll %s back%s" % (
            p["app"], " to backup %s" % p["backup_id"] if p["backup_id"] else " (its last upgrade)"))
    request = upgrades_pb2.RollbackRequest(app=p["app"], backup_id=p["backup_id"] or "")
    op = client.call(client.upgrades.Rollback, request)
    final = client.follow(op.id)[0]
    client.finish(final, what="rollback of %s" % p["app"])


if __name__ == "__main__":
    main()
