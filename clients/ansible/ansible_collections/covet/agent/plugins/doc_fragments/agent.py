# -*- coding: utf-8 -*-
# Copyright: Covet Agent contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):
    # The options every covet.agent module takes.
    DOCUMENTATION = r"""
options:
  endpoint:
    description:
      - The agent, C(HOST:PORT).
      - When the task does not set it, the collection's action plugin uses the host variable
        C(covet_endpoint), else C({{ inventory_hostname }}:7443).
    type: str
  ca:
    description:
      - PEM file of the CA that signed the agent's certificate.
      - Defaults to the environment variable E(COVET_CA).
    type: path
  cert:
    description:
      - PEM client certificate; its role (O=covet:ROLE) decides what the agent allows.
      - Defaults to the environment variable E(COVET_CERT).
    type: path
  key:
    description:
      - PEM key of O(cert).
      - Defaults to the environment variable E(COVET_KEY).
    type: path
  server_name:
    description:
      - The name to check in the agent's certificate, when it is not the endpoint's host.
    type: str
  timeout:
    description:
      - Seconds to wait for each call (following an operation is not bounded by it).
    type: float
    default: 30
notes:
  - The module runs on the controller and talks to the agent over gRPC with mutual TLS; run
    the play with C(connection=local) (or the task with C(delegate_to=localhost)) and
    C(ansible_python_interpreter={{ ansible_playbook_python }}), in a Python that has
    C(grpcio).
  - Errors name their cause as covetctl's do, for example C(connection refused at HOST:PORT) or
    C(the agent refused your certificate - it is not issued by the agent's CA).
requirements:
  - grpcio >= 1.76 (and its protobuf) on the controller
"""
