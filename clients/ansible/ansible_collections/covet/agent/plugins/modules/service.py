#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: Covet Agent contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: service
short_description: Status, start, stop, restart or reload an app's systemd unit through covet-agent
version_added: "0.1.0"
description:
  - Acts on a unit the agent's configuration declares (an app's unit or C([systemd] allow))
    over D-Bus and waits for the job; each action is a journaled, audited operation on the agent.
  - O(state=status) reads only (any role); the others need an operator certificate.
extends_documentation_fragment:
  - covet.agent.agent
  - ansible.builtin.action_common_attributes
options:
  app:
    description:
      - The app whose unit to act on (its unit comes from the agent's configuration).
      - One of O(app) and O(unit) is required.
    type: str
  unit:
    description:
      - A declared unit, e.g. C(covet.service).
    type: str
  state:
    description:
      - V(started) and V(stopped) change nothing when the unit is already so; V(restarted)
        and V(reloaded) always act.
    type: str
    choices: [status, started, stopped, restarted, reloaded]
    default: status
  job_timeout:
    description:
      - How long the agent waits for the systemd job (C(90s), C(5m)); default the agent's (90s).
    type: str
attributes:
  platform:
    support: full
    platforms: posix
  check_mode:
    support: full
  diff_mode:
    support: none
author:
  - Covet Agent contributors (@covet-agent)
"""

EXAMPLES = r"""
- name: Restart the app
  covet.agent.service:
    app: covet
    state: restarted

- name: Is it running?
  covet.agent.service:
    unit: covet.service
  register: unit
"""

RETURN = r"""
unit:
  description: The unit acted on.
  returned: always
  type: str
status:
  description: The unit's status afterwards (load_state, active_state, sub_state, main_pid, restart_count).
  returned: always
  type: dict
job_result:
  description: The systemd job's result (done, failed, timeout, canceled, ...).
  returned: when the unit was acted on
  type: str
journal_tail:
  description: The unit's last journal lines when it is not active afterwards.
  returned: when the unit was acted on and is not active
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.covet.agent.plugins.module_utils.covet_client import (
    COMMON_ARGS,
    CovetClient,
    info_pb2,
    parse_duration,
    units_pb2,
)


def status_to_dict(s):
    return dict(
        name=s.name,
        load_state=s.load_state,
        active_state=s.active_state,
        sub_state=s.sub_state,
        main_pid=s.main_pid,
        restart_count=s.restart_count,
        error=s.error,
    )


def main():
    argument_spec = dict(
        COMMON_ARGS,
        app=dict(type="str"),
        unit=dict(type="str"),
        state=dict(type="str", default="status",
                   choices=["status", "started", "stopped", "restarted", "reloaded"]),
        job_timeout=dict(type="str"),
    )
    module = AnsibleModule(
        argument_spec=argument_spec,
        supports_check_mode=True,
        required_one_of=[("app", "unit")],
        mutually_exclusive=[("app", "unit")],
    )
    p = module.params
    job_timeout = None
    if p["job_timeout"] is not None:
        job_timeout = parse_duration(p["job_timeout"])
        if job_timeout is None:
            module.fail_json(msg="job_timeout: %r is not a duration (90s, 5m)" % p["job_timeout"])
    client = CovetClient(module)
    unit = p["unit"]
    if p["app"]:
        info = client.call(client.info.GetInfo, info_pb2.GetInfoRequest())
        units = dict((a.name, a.unit) for a in info.apps)
        if p["app"] not in units:
            client.fail("%s: app %s is not declared (declared: %s)"
                        % (client.endpoint, p["app"], ", ".join(sorted(units)) or "none"))
        unit = units[p["app"]]
    answer = client.call(client.units.GetUnitStatus, units_pb2.GetUnitStatusRequest(units=[unit]))
    status = answer.units[0] if answer.units else units_pb2.UnitStatus(name=unit)
    state = p["state"]
    if state == "status":
        client.exit(changed=False, unit=unit, status=status_to_dict(status))
    active = status.active_state in ("active", "reloading", "activating")
    if (state == "started" and active) or (state == "stopped" and status.active_state in ("inactive", "failed")):
        client.exit(changed=False, unit=unit, status=status_to_dict(status))
    if module.check_mode:
        client.exit(changed=True, unit=unit, status=status_to_dict(status), msg="would be %s" % state)
    method = {
        "started": client.units.StartUnit,
        "stopped": client.units.StopUnit,
        "restarted": client.units.RestartUnit,
        "reloaded": client.units.ReloadUnit,
    }[state]
    request = units_pb2.UnitActionRequest(unit=unit)
    call_timeout = p["timeout"]
    if job_timeout is not None:
        request.timeout.FromNanoseconds(int(job_timeout * 1e9))
        call_timeout = max(call_timeout, job_timeout + 5)
    done = client.call(method, request, timeout=max(call_timeout, 95.0))
    result = dict(
        changed=True,
        unit=unit,
        job_result=done.job_result,
        status=status_to_dict(done.status),
        journal_tail=[e.message for e in done.journal_tail],
    )
    if done.job_result != "done":
        client.fail("%s: %s of %s ended %s (unit %s/%s)" % (
            client.endpoint, state[:-2] if state.endswith("ed") else state, unit, done.job_result,
            done.status.active_state, done.status.sub_state), **result)
    client.exit(**result)


if __name__ == "__main__":
    main()
