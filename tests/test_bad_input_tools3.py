"""Bad input to every tool, part 3 (issue 23, the rest): the writers that still replaced outputs, the exit status
of bad input (2) against a run that started and failed (1), and the checks that were missing.

    make_demo_data.py, vocab_experiment.py   an existing --out is refused without --overwrite (the default --out of
                                             make_demo_data is the shipped demo data), and appears whole with it
    generate.py without a tokenizer           one line, exit 2 (it was 1)
    LoRAConfig(alpha=inf / nan)               refused where the config is made (the flag's type refused it already)
    finetune --max-seq-len past the model's   a one-line warning naming both lengths and the model
"""

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bad_input_helpers import assert_refused, snapshot, tool_main  # noqa: E402
from train_helpers import make_workspace  # noqa: E402

from minipeft import assets_dir  # noqa: E402
from minipeft.demo_data import generate  # noqa: E402
from minipeft.peft import LoRAConfig, PeftConfigError  # noqa: E402


def run_in_process(capsys, tool: str, *args):
    """(exit status, stderr) of the tool as its command line runs it: main(argv) under cli_errors.run_main."""
    from minipeft.cli_errors import run_main
    try:
        code = run_main(tool_main(tool).main, f"{tool}.py", [str(a) for a in args])
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("bad_tools3_ws"))


def test_make_demo_data_never_replaces_the_shipped_data_or_an_existing_out(tmp_path, capsys):
    shipped = assets_dir() / "demo_data"
    before = snapshot(shipped)
    code, err = run_in_process(capsys, "make_demo_data", "--seed", "1")     # the default --out: the shipped files
    assert_refused(code, err, str(shipped), "already exists", "--overwrite", before=before, roots=(shipped,))
    out = tmp_path / "data"
    out.mkdir()
    (out / "mine.txt").write_text("a file of the user's")
    code, err = run_in_process(capsys, "make_demo_data", "--out", out, "--seed", "1")
    assert_refused(code, err, str(out), "--overwrite")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    code, err = run_in_process(capsys, "make_demo_data", "--out", out, "--seed", "1", "--train-size", "30",
                               "--heldout-size", "5", "--overwrite")
    assert code == 0, err
    train, heldout = generate(1, 30, 5)                                    # the generator, called directly
    assert sorted(p.name for p in out.iterdir()) == ["heldout.json", "train.json"]
    assert json.loads((out / "train.json").read_text(encoding="utf-8")) == train
    assert json.loads((out / "heldout.json").read_text(encoding="utf-8")) == heldout


def test_vocab_experiment_refuses_an_existing_out_before_any_work(ws, tmp_path, capsys):
    out = tmp_path / "experiment"
    out.mkdir()
    (out / "results.json").write_text("{}")
    roots = (out, Path(ws["model"]))
    before = snapshot(*roots)
    code, err = run_in_process(capsys, "vocab_experiment", "--model", ws["model"], "--data", ws["train"], "--out", out)
    assert_refused(code, err, str(out), "already exists", "--overwrite", before=before, roots=roots)


def test_generate_without_a_tokenizer_is_bad_input(ws, tmp_path, capsys):
    import shutil
    model = tmp_path / "model"
    shutil.copytree(ws["model"], model)
    (model / "tokenizer.model").unlink()
    code, err = run_in_process(capsys, "generate", model, "--prompt", "hi")
    assert_refused(code, err, "generate.py: error: no tokenizer at", "--tokenizer")


@pytest.mark.parametrize("alpha", [math.inf, -math.inf, math.nan, 0.0, -1.0, True])
def test_lora_alpha_must_be_finite_and_positive(alpha):
    with pytest.raises(PeftConfigError, match=r"LoRAConfig\.alpha must be a finite positive number"):
        LoRAConfig(alpha=alpha)


def test_finetune_warns_when_max_seq_len_passes_the_models(ws, tmp_path, capsys):
    from minipeft.checkpoint import open_checkpoint
    model_len = open_checkpoint(ws["model"]).config().max_seq_len                 # 128 in the workspace
    code = tool_main("finetune").main(["--model", ws["model"], "--train-data", ws["train"], "--val-data", ws["val"],
                                       "--max-seq-len", str(2 * model_len), "--max-steps", "1", "--batch-size", "2",
                                       "--out", str(tmp_path / "run"), "--samples", "0"])
    err = capsys.readouterr().err
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and f"--max-seq-len {2 * model_len}" in warnings[0], err
    assert f"max_seq_len {model_len} ({ws['model']})" in warnings[0]
