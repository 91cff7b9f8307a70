"""A method registered from a file outside minipeft/ (tests/plugins/output_scale_plugin.py) reaches every tool that
takes or reads a method, through --plugin (a .py path) and through MINIPEFT_PLUGINS (a module name on PYTHONPATH),
with no package file edited: finetune.py trains it, resumes it bit-identically and refuses a changed setting,
generate.py loads its adapter folder, compare_methods.py runs it beside LoRA. It has no tuned learning rate, so
each tool without --lr stops with one line naming --lr. Each tool runs as a user runs it: a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_helpers import MAX_SEQ_LEN, make_workspace  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_DIR = ROOT / "tests" / "plugins"
PLUGIN_FILE = PLUGIN_DIR / "output_scale_plugin.py"


def tool(name, *args, plugin="flag", check=True):
    """Run tools/<name> in a fresh process; plugin "flag": --plugin FILE, "env": MINIPEFT_PLUGINS, None: none."""
    env = {k: v for k, v in os.environ.items() if k != "MINIPEFT_PLUGINS"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    argv = [sys.executable, str(ROOT / "tools" / name), *map(str, args)]
    if plugin == "flag":
        argv += ["--plugin", str(PLUGIN_FILE)]
    elif plugin == "env":
        env["MINIPEFT_PLUGINS"] = "output_scale_plugin"
        env["PYTHONPATH"] = os.pathsep.join([str(PLUGIN_DIR), env.get("PYTHONPATH", "")])
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    if check:
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def one_line_error(done, *words):
    assert done.returncode != 0, done.stdout[-1000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("plugin_ws"))


def finetune_args(ws, out, *extra):
    return ["--model", ws["model"], "--train-data", ws["train"], "--val-data", ws["val"], "--max-seq-len", MAX_SEQ_LEN,
            "--method", "output_scale", "--batch-size", 4, "--max-steps", 6, "--warmup-steps", 1, "--device", "cpu",
            "--no-progress", "--no-exact-match", "--samples", 0, "--out", out, *extra]


@pytest.fixture(scope="module")
def trained(ws, tmp_path_factory):
    """One run of the plugin's method through --plugin, with a checkpoint at step 3: the run the tests resume,
    refuse to resume with another setting, and generate from."""
    folder = tmp_path_factory.mktemp("plugin_run") / "a"
    whole = tool("finetune.py", *finetune_args(ws, folder, "--lr", 0.1, "--save-every", 3), plugin="flag")
    assert "method output_scale" in whole.stdout
    return folder


@pytest.mark.parametrize("plugin", ["flag", "env"])
def test_finetune_trains_resumes_and_refuses_a_changed_setting(ws, trained, tmp_path, plugin):
    resumed = tool("finetune.py", *finetune_args(ws, tmp_path / "b", "--lr", 0.1, "--resume",
                                                  trained / "checkpoints" / "step-000003.pt"), plugin=plugin)
    assert "resumed from" in resumed.stdout
    a, b = (load_file(str(run / "adapter" / "adapter.safetensors")) for run in (trained, tmp_path / "b"))
    assert a.keys() == b.keys() == {f"layers.{i}.attention.wo.scale" for i in range(2)}
    assert all((a[k] == b[k]).all() for k in a) and any((a[k] != 1).any() for k in a)      # trained, bit-identical
    changed = tool("finetune.py", *finetune_args(ws, tmp_path / "c", "--lr", 0.1, "--scale-init", 2.0, "--resume",
                                                 trained), plugin=plugin, check=False)
    one_line_error(changed, "peft.init")


def test_finetune_without_a_rate_names_lr_and_without_the_plugin_names_the_method(ws, tmp_path):
    one_line_error(tool("finetune.py", *finetune_args(ws, tmp_path / "x"), check=False), "--lr", "output_scale")
    no_plugin = tool("finetune.py", *finetune_args(ws, tmp_path / "y", "--lr", 0.1), plugin=None, check=False)
    assert no_plugin.returncode != 0 and "output_scale" in no_plugin.stderr and "Traceback" not in no_plugin.stderr


@pytest.mark.parametrize("plugin", ["flag", "env"])
def test_generate_loads_the_plugin_methods_adapter(ws, trained, plugin):
    args = [ws["model"], "--adapter", trained / "adapter", "--prompt", "say cat then dog", "--alpaca",
            "--max-new-tokens", 4, "--device", "cpu"]
    assert "### Response:" in tool("generate.py", *args, plugin=plugin).stdout
    if plugin == "flag":
        one_line_error(tool("generate.py", *args, plugin=None, check=False), "output_scale")


def compare_args(ws, out, *extra):
    return ["--base", ws["model"], "--data", ws["train"], "--val-data", ws["val"], "--max-seq-len", MAX_SEQ_LEN,
            "--max-train-examples", 8, "--epochs", 1, "--batch-size", 4, "--evals-per-epoch", 1, "--threads", 1,
            "--device", "cpu", "--no-exact-match", "--no-plot", "--methods", "lora,output_scale", "--out", out, *extra]


@pytest.mark.parametrize("plugin", ["flag", "env"])
def test_compare_methods_runs_the_plugin_method_beside_lora(ws, tmp_path, plugin):
    tool("compare_methods.py", *compare_args(ws, tmp_path / "cmp", "--lr", "output_scale=0.1"), plugin=plugin)
    results = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert list(results["results"]) == ["lora", "output_scale"]
    assert results["results"]["output_scale"]["trainable"] == 2 * 32
    assert "output_scale" in (tmp_path / "cmp" / "results.md").read_text()
    one_line_error(tool("compare_methods.py", *compare_args(ws, tmp_path / "cmp2"), plugin=plugin, check=False),
                   "--lr", "output_scale")
