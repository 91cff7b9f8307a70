"""Plugins: modules outside the package that register PEFT methods (or model families) before a tool runs.

    python tools/finetune.py --plugin my_methods --method my_method ...
    MINIPEFT_PLUGINS=my_methods,other.module python tools/generate.py CKPT --adapter runs/x/adapter ...

A plugin is any importable module (on sys.path or PYTHONPATH, or a path to a .py file) whose import calls
`minipeft.peft.register(PeftMethod(...))` or `minipeft.families.register_family(Family(...))`. Every tool that
takes or reads a method imports the plugins first, before it builds its argument parser, so a registered
method is a valid `--method` choice and its flags are on the command line like a built-in one's.

`--plugin MODULE` may be repeated; MINIPEFT_PLUGINS holds comma-separated module names. The environment's
plugins load first, then the flags', each once.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence

ENV_VAR = "MINIPEFT_PLUGINS"
FLAG = "--plugin"
FLAG_HELP = (f"import MODULE (a module name or a .py file) before anything else, so that the PEFT methods or model "
             f"families it registers can be used; repeatable; also the environment variable {ENV_VAR}="
             f"MOD1,MOD2")


class PluginError(ValueError):
    """A plugin that cannot be imported; the message names it and where it was given."""


def plugin_names(argv: Sequence[str], environ=None) -> List[str]:
    """The plugins named by MINIPEFT_PLUGINS and by every `--plugin M` / `--plugin=M` of argv, in that order."""
    environ = os.environ if environ is None else environ
    names = [(name.strip(), ENV_VAR) for name in environ.get(ENV_VAR, "").split(",") if name.strip()]
    for i, arg in enumerate(argv):
        if arg == FLAG:
            if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                raise PluginError(f"{FLAG}: expected a module name after it")
            names.append((argv[i + 1], FLAG))
        elif arg.startswith(FLAG + "="):
            names.append((arg[len(FLAG) + 1:], FLAG))
    return list(dict.fromkeys(names))


def import_plugin(name: str, source: str = FLAG):
    """Import one plugin: a dotted module name, or a path to a .py file."""
    try:
        if name.endswith(".py"):
            path = Path(name)
            if not path.is_file():
                raise PluginError(f"{source} {name}: file not found")
            module_name = f"minipeft_plugin_{path.stem}"
            if module_name in sys.modules:                  # imported already (MINIPEFT_PLUGINS and --plugin)
                return sys.modules[module_name]
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            return module
        return importlib.import_module(name)
    except PluginError:
        raise
    except ModuleNotFoundError as err:
        raise PluginError(f"{source} {name}: no module named {err.name!r} (put its folder on PYTHONPATH, or give "
                          f"the path of its .py file)") from None
    except Exception as err:  # noqa: BLE001 - a plugin that fails while registering: say which, in one line
        raise PluginError(f"{source} {name}: importing it failed: {type(err).__name__}: "
                          f"{' '.join(str(err).split())}") from None


def load_plugins(argv: Optional[Sequence[str]] = None, environ=None) -> List[str]:
    """Import every plugin named in the environment and in argv (default sys.argv[1:]); returns their names.
    A module imported once is not imported again (Python's module cache), so calling this twice is harmless."""
    argv = sys.argv[1:] if argv is None else list(argv)
    loaded = []
    for name, source in plugin_names(argv, environ):
        import_plugin(name, source)
        loaded.append(name)
    return loaded


def add_plugin_flag(parser) -> None:
    """The --plugin flag on a tool's parser (the plugins were imported already; this documents and accepts it)."""
    parser.add_argument(FLAG, action="append", default=[], metavar="MODULE", help=FLAG_HELP)
