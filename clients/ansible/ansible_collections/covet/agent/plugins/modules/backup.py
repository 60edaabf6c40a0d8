#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: Covet Agent contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: backup
short_description: Create, list, verify and prune an app's backups through covet-agent
version_added: "0.1.0"
description:
  - O(command=create) starts C(BackupService/CreateBackup) and follows it to its end; it archives the app's
    declared paths and its database, with a manifest of checksums.
  - O(command=list) lists valid backups, newest first (any role).
  - O(command=verify) recomputes a backup's checksums and test-reads it; a bad backup fails the task.
  - O(command=prune) applies the app's retention policy; backups an operation still needs are kept.
extends_documentation_fragment:
  - covet.agent.agent
  - ansible.builtin.action_common_attributes
options:
  app:
    description:
      - The app, as declared in the agent's configuration. Required except for O(command=verify)
        and O(command=list) (which then lists every app's backups).
    type: str
  command:
    description:
      - What to do (an option of its own, not C(state), as C(list) and C(verify) are not states).
    type: str
    choices: [create, list, verify, prune]
    default: create
  id:
    description:
      - The backup to verify; default the app's newest.
    type: str
  fresh_within:
    description:
      - With O(command=create), a backup of the app made less than this long ago (C(90s), C(30m),
        C(1h)) counts as done and nothing is created (C(changed=false)), so that a rerun of a
        rollout does not back up again.
    type: str
  skip_database:
    description:
      - Do not dump the database.
    type: bool
    default: false
  skip_files:
    description:
      - Do not archive the declared paths.
    type: bool
    default: false
  compression:
    description:
      - How archives are compressed.
    type: str
    choices: [zstd, gzip, none]
    default: zstd
attributes:
  platform:
    support: full
    platforms: posix
  check_mode:
    support: full
    details:
      - Nothing is created, verified or pruned; create reports whether it would back up.
  diff_mode:
    support: none
author:
  - Covet Agent contributors (@covet-agent)
"""

EXAMPLES = r"""
- name: Back up before the upgrade, unless a rerun finds a recent backup
  covet.agent.backup:
    app: covet
    command: create
    fresh_within: 1h
  register: backup

- name: Verify it
  covet.agent.backup:
    app: covet
    command: verify
    id: "{{ backup.backup.id }}"

- name: List
  covet.agent.backup:
    app: covet
    command: list
  register: backups
"""

RETURN = r"""
backup:
  description: The backup created, verified or found fresh (id, app, created, package_version, total_bytes, files).
  returned: create and verify
  type: dict
backups:
  description: The app's backups, newest first.
  returned: list and prune
  type: list
  elements: dict
pruned:
  description: Ids of the backups prune removed.
  returned: prune
  type: list
  elements: str
operation_id:
  description: The operation's id.
  returned: when an operation was started
  type: str
operation:
  description: The operation as it ended (id, state, cause, steps).
  returned: when an operation was started
  type: dict
"""

import time

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.covet.agent.plugins.module_utils.covet_client import (
    COMMON_ARGS,
    CovetClient,
    backups_pb2,
    enum_name,
    parse_duration,
)


def backup_to_dict(b):
    return dict(
        id=b.id,
        app=b.app,
        created=b.created.ToJsonString() if b.HasField("created") else "",
        created_unix=b.created.seconds,
        package_version=b.package_version,
        agent_version=b.agent_version,
        compression=enum_name(backups_pb2.Compression, b.compression, "COMPRESSION_"),
        total_bytes=b.total_bytes,
        files=[dict(name=f.name, source_path=f.source_path, size_bytes=f.size_bytes) for f in b.files],
        database=b.database.dbname if b.HasField("database") else "",
        referenced_by=list(b.referenced_by),
    )


def list_backups(client, app):
    answer = client.call(client.backups.ListBackups, backups_pb2.ListBackupsRequest(app=app or ""))
    return [backup_to_dict(b) for b in answer.backups]


def main():
    argument_spec = dict(
        COMMON_ARGS,
        app=dict(type="str"),
        command=dict(type="str", default="create", choices=["create", "list", "verify", "prune"]),
        id=dict(type="str"),
        fresh_within=dict(type="str"),
        skip_database=dict(type="bool", default=False),
        skip_files=dict(type="bool", default=False),
        compression=dict(type="str", default="zstd", choices=["zstd", "gzip", "none"]),
    )
    module = AnsibleModule(
        argument_spec=argument_spec,
        supports_check_mode=True,
        required_if=[("command", "create", ["app"]), ("command", "prune", ["app"])],
    )
    p = module.params
    fresh = None
    if p["fresh_within"] is not None:
        fresh = parse_duration(p["fresh_within"])
        if fresh is None:
            module.fail_json(msg="fresh_within: %r is not a duration (90s, 30m, 1h)" % p["fresh_within"])
    client = CovetClient(module)
    command = p["command"]

    if command == "list":
        client.exit(changed=False, backups=list_backups(client, p["app"]))

    if command == "create":
        if fresh is not None:
            now = time.time()
            recent = [b for b in list_backups(client, p["app"]) if now - b["created_unix"] < fresh]
            if recent:
                client.exit(changed=False, backup=recent[0],
                            msg="backup %s is younger than %s" % (recent[0]["id"], p["fresh_within"]))
        if module.check_mode:
            client.exit(changed=True, msg="would back up %s" % p["app"])
        request = backups_pb2.CreateBackupRequest(
            app=p["app"],
            skip_database=p["skip_database"],
            skip_files=p["skip_files"],
            compression=backups_pb2.Compression.Value("COMPRESSION_" + p["compression"].upper()),
        )
        op = client.call(client.backups.CreateBackup, request)
        final = client.follow(op.id)[0]
        extra = {}
        if final.backup_id:
            got = client.call(client.backups.GetBackup, backups_pb2.GetBackupRequest(id=final.backup_id))
            extra["backup"] = backup_to_dict(got)
        client.finish(final, what="backup of %s" % p["app"], **extra)

    if command == "verify":
        backup_id = p["id"]
        if not backup_id:
            if not p["app"]:
                client.fail("verify needs id or app")
            found = list_backups(client, p["app"])
            if not found:
                client.fail("%s: app %s has no backup to verify" % (client.endpoint, p["app"]))
            backup_id = found[0]["id"]
        got = client.call(client.backups.GetBackup, backups_pb2.GetBackupRequest(id=backup_id))
        if module.check_mode:
            client.exit(changed=False, backup=backup_to_dict(got), msg="would verify %s" % backup_id)
        op = client.call(client.backups.VerifyBackup, backups_pb2.GetBackupRequest(id=backup_id))
        final = client.follow(op.id)[0]
        client.finish(final, what="verification of backup %s" % backup_id, changed=False,
                      backup=backup_to_dict(got))

    # prune
    before = list_backups(client, p["app"])
    if module.check_mode:
        client.exit(changed=False, backups=before, msg="check mode: the retention policy was not applied")
    op = client.call(client.backups.PruneBackups, backups_pb2.PruneBackupsRequest(app=p["app"]))
    final = client.follow(op.id)[0]
    after = list_backups(client, p["app"])
    kept = set(b["id"] for b in after)
    pruned = [b["id"] for b in before if b["id"] not in kept]
    client.finish(final, what="prune of %s" % p["app"], changed=bool(pruned), pruned=pruned, backups=after)


if __name__ == "__main__":
    main()
