# -*- coding: utf-8 -*-
# Copyright: Covet Agent contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""covet.agent.upgrade: the module, with endpoint filled in (plugin_utils/covet_action.py)."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible_collections.covet.agent.plugins.plugin_utils.covet_action import CovetAction


class ActionModule(CovetAction):
    pass
