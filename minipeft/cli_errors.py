"""The top of every tool: run_main(main, prog) turns what bad input raises into one line on stderr.

    if __name__ == "__main__":
        sys.exit(run_main(main, "generate.py"))

    a project error       ConfigError, CheckpointError, TrainError, PeftConfigError, DataError, TokenizerError,
                          FamilyError, PluginError, CompareError, PretrainError, ...: the package's ValueError
                          subclasses, whose messages already name the file, key, flag or field
                          -> "generate.py: error: <the message on one line>", exit status 2
    an OSError            a missing file, a full disk, a folder without permission
                          -> "generate.py: error: <path>: <what the system said>", exit status 2 (the package's
                          own FileExistsError, "<path>: output folder already exists; ...", as it is)
    KeyboardInterrupt     -> "generate.py: interrupted", exit status 130 (the shell's 128 + SIGINT)

Anything else (a RuntimeError, a library's own ValueError, an AssertionError) is a bug to fix where it starts,
so it keeps its traceback. A tool's main may catch and report its own errors first (several do, with their
own exit status); run_main is what catches the ones that get past it. It imports nothing from the package.
"""

from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence


def is_project_error(err: BaseException) -> bool:
    """A ValueError whose class (or a base of it) is defined in minipeft: its message is written for users."""
    return isinstance(err, ValueError) and any(c.__module__.split(".")[0] == "minipeft" for c in type(err).__mro__)


def one_line(err: BaseException) -> str:
    """The error as one line: a project error's message with its whitespace folded; an OSError as path: reason
    (one raised with a message only: the message); anything else as its type and its first three lines (a
    DeepSpeed config's pydantic error: the model, the key, the problem)."""
    if isinstance(err, OSError) and err.strerror:
        where = f"{err.filename}" + (f" -> {err.filename2}" if err.filename2 else "") if err.filename else ""
        return f"{where}: {err.strerror}" if where else err.strerror
    if is_project_error(err) or isinstance(err, OSError):
        return " ".join(str(err).split())
    lines = [line.strip() for line in str(err).splitlines() if line.strip()][:3]
    return f"{type(err).__name__}: {': '.join(lines)}"


def run_main(main: Callable, prog: str, argv: Optional[Sequence[str]] = None) -> int:
    """main(argv)'s exit status (None counts as 0); a project error or an OSError -> one line, 2; Ctrl-C -> 130."""
    try:
        code = main(argv)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    except OSError as err:
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except ValueError as err:
        if not is_project_error(err):
            raise
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 2
    return 0 if code is None else code
