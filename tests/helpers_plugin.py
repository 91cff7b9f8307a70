"""The toy method of tests/plugins/output_scale_plugin.py (a user's plugin file: one home for its code), loaded in
this process the way the tools load it (minipeft.plugins.import_plugin) and unregistered again afterwards, so the
tests that need it in-process share it with the tests that drive the tools with --plugin."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from minipeft.peft import unregister
from minipeft.plugins import import_plugin

PLUGIN_FILE = Path(__file__).resolve().parent / "plugins" / "output_scale_plugin.py"
MODULE_NAME = "minipeft_plugin_output_scale_plugin"          # the name import_plugin gives a .py file


@contextlib.contextmanager
def output_scale_registered():
    """Registers "output_scale" for the with-block; yields the plugin module (OutputScaleConfig, ScaledLinear)."""
    try:
        yield import_plugin(str(PLUGIN_FILE))
    finally:
        unregister("output_scale")
        sys.modules.pop(MODULE_NAME, None)
