# -*- coding: utf-8 -*-
# Copyright: Covet Agent contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""The action plugin of every covet.agent module.

A module cannot see inventory variables, so the action plugin fills in the
agent's address before the module runs on the controller: the task's
``endpoint``, else the host variable ``covet_endpoint``, else
``inventory_hostname:7443``.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible.plugins.action import ActionBase

DEFAULT_PORT = 7443


class CovetAction(ActionBase):
    """Runs the module of the same name with `endpoint` filled in."""

    _supports_check_mode = True
    _supports_async = False

    def run(self, tmp=None, task_vars=None):
        task_vars = task_vars or {}
        result = super(CovetAction, self).run(tmp, task_vars)
        args = dict(self._task.args)
        if not args.get("endpoint"):
            endpoint = task_vars.get("covet_endpoint")
            if endpoint:
                endpoint = self._templar.template(endpoint)
            else:
                endpoint = "%s:%d" % (task_vars.get("inventory_hostname"), DEFAULT_PORT)
            args["endpoint"] = endpoint
        result.update(
            self._execute_module(
                module_name=self._task.resolved_action or self._task.action,
                module_args=args,
                task_vars=task_vars,
            )
        )
        return result
