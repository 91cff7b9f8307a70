"""Run every lesson script (lessons/*/*.py) as its own subprocess, exactly as a reader would.

Each script asserts its own numbers against independent computations and exits non-zero on the first
failed check; this test fails on a non-zero exit or on a missing "all checks passed" line, and shows
the end of the script's output. The "try this" scripts train the shipped tiny model for a few dozen
steps (10-40 s each with one thread); lessons/figures/draw_methods.py redraws the method figures and
compares them byte for byte with the committed PNGs (also tested directly below).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
LESSON_SCRIPTS = sorted((REPO_ROOT / "lessons").glob("*/*.py"))
TIMEOUT_S = 180   # generous on a loaded 2-core machine; the slowest (the try-this runs) take ~40 s alone


def test_lessons_exist():
    assert LESSON_SCRIPTS, f"no lesson scripts found under {REPO_ROOT / 'lessons'}"


@pytest.mark.parametrize("script", LESSON_SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_lesson_script(script: Path):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env["DS_ACCELERATOR"] = "cpu"            # lesson 07 imports DeepSpeed's estimators; no GPU here
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run([sys.executable, str(script)], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=TIMEOUT_S)
    tail = (result.stdout + result.stderr)[-4000:]
    assert result.returncode == 0, f"{script.relative_to(REPO_ROOT)} exited with {result.returncode}:\n{tail}"
    assert "all checks passed" in result.stdout, f"{script.relative_to(REPO_ROOT)} did not finish:\n{tail}"


def test_figures_redraw_bit_for_bit(tmp_path):
    """lessons/figures/draw_methods.py redraws every committed method figure to the same bytes."""
    sys.path.insert(0, str(REPO_ROOT / "lessons" / "figures"))
    try:
        import draw_methods
    finally:
        sys.path.pop(0)
    draw_methods.draw_all(tmp_path)
    for method in draw_methods.METHODS:
        committed = REPO_ROOT / "lessons" / "figures" / f"{method}.png"
        assert committed.is_file(), f"{committed} is missing: run lessons/figures/draw_methods.py --write"
        assert (tmp_path / f"{method}.png").read_bytes() == committed.read_bytes(), \
            f"{committed.name} differs from a fresh drawing: run lessons/figures/draw_methods.py --write and commit"
