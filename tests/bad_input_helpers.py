"""Helpers of the bad-input suites (tests/test_bad_input_*.py): run a tool as a user would (a subprocess, or
its main() in-process), hash every file of the folders it could touch before and after, and check the answer:
a non-zero exit, one line on stderr naming the flag / file / field, no traceback, nothing changed."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def snapshot(*roots) -> dict:
    """path -> SHA-256 of every file under `roots` (folders included as entries, so a new empty one shows)."""
    state = {}
    for root in map(Path, roots):
        for path in sorted(root.rglob("*")) if root.is_dir() else [root]:
            if path.is_dir():
                state[str(path)] = "dir"
            elif path.exists():
                state[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def run_tool(tool: str, *args) -> subprocess.CompletedProcess:
    """`python tools/<tool>.py args...` with PYTHONPATH set, as the README tells a user to run it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "tools" / f"{tool}.py"), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def error_lines(stderr: str) -> list:
    """The lines of stderr that are the tool's own (library warnings from imports left out)."""
    return [line for line in stderr.splitlines()
            if line.strip() and "Warning" not in line and not line.startswith("  warnings.warn")]


def assert_refused(code: int, stderr: str, *fragments, before: dict = None, roots=(), status: int = 2):
    """Exit `status` (2: bad input, as run_main and argparse give it), exactly one error line containing every
    fragment, no traceback, files unchanged."""
    assert code == status, f"exit {code} (expected {status}) for a bad input; stderr: {stderr[-800:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = error_lines(stderr)
    assert len(lines) == 1, f"expected one line, got {lines}"
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    if before is not None:
        assert snapshot(*roots) == before, "a refused command changed files"
    return lines[0]


def run_in_process(capsys, tool: str, *args):
    """(exit code, stderr) of tools/<tool>.py's main(args), called in-process (a value a flag's type refuses
    ends in argparse's SystemExit: its status)."""
    try:
        code = tool_main(tool).main([str(a) for a in args])
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err


def tool_main(tool: str):
    """The tool's module (tools/<tool>.py), for calling main(argv) in-process."""
    sys.path.insert(0, str(ROOT / "tools"))
    import importlib
    return importlib.import_module(tool)


def write_evil_pickle(path: Path, marker: Path) -> None:
    """A torch file whose unpickling would run `touch marker` (what a planted checkpoint could do)."""
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    torch.save({"weight": Evil()}, path)
