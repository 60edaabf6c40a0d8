#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: Covet Agent contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: info
short_description: Facts from a covet-agent (its version, its apps and their health)
version_added: "0.1.0"
description:
  - Calls C(InfoService/GetInfo) and, for every app with a health probe,
    C(ProbeService/CheckAppHealth), and returns them as the fact C(covet_agent).
  - Reads only; needs a certificate of any role (reader, operator, admin).
extends_documentation_fragment:
  - covet.agent.agent
  - ansible.builtin.action_common_attributes
options:
  health:
    description:
      - Also run each app's declared health probe.
    type: bool
    default: true
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
- name: Read every agent's facts
  hosts: covet
  connection: local
  gather_facts: false
  vars:
    ansible_python_interpreter: "{{ ansible_playbook_python }}"
  tasks:
    - name: Agent facts
      covet.agent.info:

    - name: Say which apps are unhealthy
      ansible.builtin.debug:
        msg: "{{ item.name }} is unhealthy: {{ item.health.error }}"
      loop: "{{ covet_agent.apps }}"
      when: item.health is defined and not item.health.healthy
"""

RETURN = r"""
ansible_facts:
  description: Facts about the agent.
  returned: always
  type: dict
  contains:
    covet_agent:
      description: The agent and its apps.
      type: dict
      contains:
        endpoint:
          description: The agent asked.
          type: str
          sample: 10.0.0.5:7443
        agent_version:
          description: The agent's version.
          type: str
          sample: 0.4.0
        api_versions:
          description: The API versions the agent serves.
          type: list
          elements: str
          sample: [v1]
        hostname:
          description: The host's name.
          type: str
        os:
          description: OS name and version.
          type: str
          sample: Debian GNU/Linux 12
        kernel_version:
          description: The running kernel.
          type: str
        arch:
          description: CPU architecture.
          type: str
          sample: x86_64
        uptime_seconds:
          description: Time since the host booted.
          type: int
        boot_id:
          description: Changes at every boot.
          type: str
        machine_id:
          description: /etc/machine-id, when readable.
          type: str
        caller:
          description: The caller as the agent saw its certificate (common_name, role).
          type: dict
        apps:
          description: The apps declared in the agent's configuration.
          type: list
          elements: dict
          contains:
            name:
              description: The app's name.
              type: str
            unit:
              description: Its systemd unit.
              type: str
            package_kind:
              description: pip, release, deb, rpm, apt, or empty.
              type: str
            package_name:
              description: The package's name.
              type: str
            has_database:
              description: Whether a database is declared.
              type: bool
            health:
              description: The health probe's outcome (when the app declares one and O(health) is set).
              type: dict
              contains:
                healthy:
                  description: Whether the probe passed.
                  type: bool
                http_status:
                  description: HTTP status of the last attempt.
                  type: int
                error:
                  description: Why it failed, in words.
                  type: str
                body_excerpt:
                  description: The first bytes of the response body.
                  type: str
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.covet.agent.plugins.module_utils.covet_client import (
    COMMON_ARGS,
    CovetClient,
    common_pb2,
    enum_name,
    info_pb2,
    probes_pb2,
)


def main():
    argument_spec = dict(COMMON_ARGS, health=dict(type="bool", default=True))
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    client = CovetClient(module)
    info = client.call(client.info.GetInfo, info_pb2.GetInfoRequest())
    apps = []
    for app in info.apps:
        entry = dict(
            name=app.name,
            unit=app.unit,
            package_kind=app.package_kind,
            package_name=app.package_name,
            has_database=app.has_database,
            has_health_probe=app.has_health_probe,
            smoke_checks=app.smoke_checks,
        )
        if module.params["health"] and app.has_health_probe:
            answer = client.call(
                client.probes.CheckAppHealth, probes_pb2.CheckAppHealthRequest(app=app.name)
            )
            entry["health"] = dict(
                healthy=answer.healthy,
                http_status=answer.health.http_status,
                error=answer.health.error,
                body_excerpt=answer.health.body_excerpt,
            )
        apps.append(entry)
    facts = dict(
        endpoint=client.endpoint,
        agent_version=info.agent_version,
        api_versions=list(info.api_versions),
        hostname=info.hostname,
        os=("%s %s" % (info.os_name, info.os_version)).strip(),
        kernel_version=info.kernel_version,
        arch=info.arch,
        uptime_seconds=info.uptime.seconds,
        boot_id=info.boot_id,
        machine_id=info.machine_id,
        caller=dict(
            common_name=info.caller.common_name,
            role=enum_name(common_pb2.Role, info.caller.role, "ROLE_"),
        ),
        apps=apps,
    )
    client.exit(changed=False, ansible_facts=dict(covet_agent=facts))


if __name__ == "__main__":
    main()
