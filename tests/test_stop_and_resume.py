"""Stopping and resuming safely (issue 23): SIGTERM / MINIPEFT_STOP_AT_STEP stop a run after a step with a
checkpoint, one line and a non-zero exit, and --resume then ends bit-identical to an uninterrupted run; a run whose
weights go non-finite stops (pretrain_tiny.py --lr inf); a resume with other inputs of the same shape (another
tokenizer of the same size, another corpus, other content at the same --data path) is refused or re-run; a truncated
train_state.pt is one line; a full disk during a save is one line and leaves nothing partial (a 2 MB tmpfs)."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bad_input_helpers import assert_refused, snapshot, tool_main  # noqa: E402
from train_helpers import MAX_SEQ_LEN, make_workspace  # noqa: E402

from minipeft import pretrain  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("stop_ws"))


def finetune_args(ws, out, steps=4, method_flags=("--lora-rank", "4", "--lora-dropout", "0.1")):
    return ["--model", ws["model"], "--train-data", ws["train"], "--max-seq-len", str(MAX_SEQ_LEN), *method_flags,
            "--lr", "1e-2", "--batch-size", "2", "--max-steps", str(steps), "--save-every", "1",
            "--no-exact-match", "--no-progress", "--samples", "0", "--device", "cpu", "--out", str(out)]


def in_process(capsys, tool, args):
    module = tool_main(tool)
    code = (getattr(module, "main", None) or module.run_command_line)([str(a) for a in args])
    return code, capsys.readouterr().err


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_resume_is_bit_identical(ws, tmp_path, capsys):
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    assert in_process(capsys, "finetune", finetune_args(ws, full))[0] == 0
    roots = (Path(ws["model"]).parent,)
    before = snapshot(*roots)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "MINIPEFT_STOP_AT_STEP": "2:SIGTERM"}             # the process sends itself SIGTERM after step 2
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "finetune.py"), *finetune_args(ws, stopped)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    line = assert_refused(done.returncode, done.stderr, "stopped by SIGTERM after step 2 of 4",
                          f"--resume {stopped}", before=before, roots=roots, status=1)   # 1: the run stopped
    assert str(stopped / "checkpoints" / "step-000002.pt") in line
    assert (stopped / "checkpoints" / "step-000002.pt").is_file() and not (stopped / "adapter").exists()
    assert not [p for p in stopped.rglob("*") if ".tmp-" in p.name]
    assert in_process(capsys, "finetune", finetune_args(ws, stopped) + ["--resume", stopped])[0] == 0
    a, b = (load_file(str(run / "adapter" / "adapter.safetensors")) for run in (full, stopped))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(row)["step"] for row in (stopped / "metrics.jsonl").read_text().splitlines()
             if "eval" not in json.loads(row)]
    assert steps == [1, 2, 3, 4]


def test_stop_at_step_setting(ws, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MINIPEFT_STOP_AT_STEP", "1")
    code, err = in_process(capsys, "finetune", finetune_args(ws, tmp_path / "run", steps=3))
    assert_refused(code, err, "stopped by MINIPEFT_STOP_AT_STEP=1 after step 1 of 3", status=1)
    assert (tmp_path / "run" / "checkpoints" / "step-000001.pt").is_file()
    monkeypatch.setenv("MINIPEFT_STOP_AT_STEP", "two")
    code, err = in_process(capsys, "finetune", finetune_args(ws, tmp_path / "other", steps=3))
    assert_refused(code, err, "MINIPEFT_STOP_AT_STEP='two'", "k:SIGNAL")


# ---- pretrain_tiny.py ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stop_corpus")
    words = "the king said unto them go forth and speak of love and of the night my lord what light".split()
    for name, shift in (("a.txt", 0), ("b.txt", 5)):
        lines = [" ".join(words[(i * 7 + j * 3 + shift) % len(words)] for j in range(12)) for i in range(600)]
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def pretrain_argv(corpus_file, out, *extra):
    return ["--corpus", str(corpus_file), "--out", str(out), "--steps", "6", "--batch-size", "2", "--seq-len", "16",
            "--lr", "1e-2", "--warmup", "1", "--vocab-size", "320", "--dim", "16", "--n-layers", "1", "--n-heads", "2",
            "--n-kv-heads", "1", "--eval-every", "3", "--save-every", "2", "--val-windows", "2", *map(str, extra)]


def test_pretrain_stops_when_the_weights_go_non_finite(corpus, tmp_path):
    args = pretrain.build_arg_parser().parse_args(pretrain_argv(corpus / "a.txt", tmp_path / "run"))
    args.lr = math.inf                     # past any parser check: the loop's own check must stop it
    before = snapshot(corpus)
    with pytest.raises(pretrain.PretrainFailed, match="step 1: .* holds non-finite values after the update"):
        pretrain.pretrain(args)
    assert snapshot(corpus) == before
    assert not (tmp_path / "run" / "train_state.pt").exists() and not (tmp_path / "run" / "tiny-llama").exists()


def test_pretrain_resume_checks_its_inputs_by_content(corpus, tmp_path, capsys, monkeypatch):
    run, other = tmp_path / "run", tmp_path / "other"
    assert pretrain.main(pretrain_argv(corpus / "a.txt", run, "--stop-at-step", "2")) == 0
    assert pretrain.main(pretrain_argv(corpus / "b.txt", other, "--stop-at-step", "2")) == 0
    from minipeft.tokenizer import Tokenizer
    assert Tokenizer(run / "tokenizer.model").vocab_size == Tokenizer(other / "tokenizer.model").vocab_size
    state = run / "train_state.pt"
    moved = tmp_path / "moved.txt"
    shutil.copy(corpus / "a.txt", moved)
    changed = tmp_path / "changed.txt"
    changed.write_text((corpus / "a.txt").read_text().replace("king", "queen"))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(state.read_bytes()[:2000])
    roots = (corpus, run, other, tmp_path / "moved.txt", changed, truncated)
    before = snapshot(*roots)
    capsys.readouterr()

    def error_of(code):            # stderr as it is: the progress bar shows on a terminal only
        return code, capsys.readouterr().err
    for argv, fragments in (
            (pretrain_argv(corpus / "a.txt", run, "--resume", state, "--tokenizer", other / "tokenizer.model"),
             [f"--resume {state}", "another tokenizer"]),
            (pretrain_argv(changed, run, "--resume", state), ["another corpus file 1"]),
            (pretrain_argv(corpus / "a.txt", run, "--resume", truncated), [f"--resume {truncated}", "not a readable"])):
        assert_refused(*error_of(pretrain.run_command_line(argv)), *fragments, before=before, roots=roots)
    # a stop requested through the environment writes train_state.pt; the moved corpus (same content) resumes
    monkeypatch.setenv("MINIPEFT_STOP_AT_STEP", "3")
    assert_refused(*error_of(pretrain.run_command_line(pretrain_argv(moved, run, "--resume", state))),
                   "stopped by MINIPEFT_STOP_AT_STEP=3 after step 3 of 6", status=1)     # 1: the run stopped
    monkeypatch.delenv("MINIPEFT_STOP_AT_STEP")
    assert pretrain.main(pretrain_argv(moved, run, "--resume", state)) == 0
    assert json.loads((run / "metrics.json").read_text())["steps"] == 6


def sigterm_during(monkeypatch, module, name):
    """Make module.name send this process SIGTERM, then do its work (the handler only records it)."""
    import signal
    original = getattr(module, name)

    def with_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)
    monkeypatch.setattr(module, name, with_sigterm)


def test_pretrain_sigterm_during_the_tokenizer_training_leaves_nothing_and_the_command_reruns(corpus, tmp_path,
                                                                                              capsys, monkeypatch):
    from minipeft.pretrain import run as pretrain_run
    out, argv = tmp_path / "run", pretrain_argv(corpus / "a.txt", tmp_path / "run")
    before = snapshot(corpus)
    with monkeypatch.context() as patch:
        sigterm_during(patch, pretrain_run, "train_family_tokenizer")
        code = pretrain.run_command_line(argv)
    assert_refused(code, capsys.readouterr().err, "stopped by SIGTERM before the first step", str(out),
                   "run the same command again", before=before, roots=(corpus,), status=1)
    assert list(out.iterdir()) == []                     # neither the tokenizer nor val_text.txt is left
    assert pretrain.run_command_line(argv) == 0          # the same command, unchanged, runs to the end
    assert json.loads((out / "metrics.json").read_text())["steps"] == 6


def test_pretrain_sigterm_during_the_final_save_completes_the_outputs(corpus, tmp_path, capsys, monkeypatch):
    from minipeft.pretrain import run as pretrain_run
    out = tmp_path / "run"
    sigterm_during(monkeypatch, pretrain_run, "save_checkpoint_folder")
    assert pretrain.run_command_line(pretrain_argv(corpus / "a.txt", out)) == 0
    err = capsys.readouterr().err
    assert "note: SIGTERM arrived during the final save; the run had finished" in err and "Traceback" not in err
    assert json.loads((out / "metrics.json").read_text())["steps"] == 6
    files = json.loads((out / "metrics.json").read_text())["file_bytes"]
    assert {name: (out / "tiny-llama" / name).stat().st_size for name in files} == files


# ---- compare_methods.py --resume ----------------------------------------------------------------
def test_compare_resume_identity_is_by_content(ws, tmp_path):
    from minipeft.compare.base_run import run_identity
    from minipeft.compare.cli import build_arg_parser
    data = tmp_path / "data.json"
    shutil.copy(ws["train"], data)
    args = build_arg_parser().parse_args(["--data", str(data), "--resume"])
    first = run_identity(args, ws["model"], data, None)
    moved = tmp_path / "moved.json"
    shutil.copy(data, moved)
    assert run_identity(build_arg_parser().parse_args(["--data", str(moved), "--resume"]), ws["model"], moved,
                        None) == first                               # same content elsewhere: kept
    records = json.loads(data.read_text())
    records[0]["output"] = "something else"
    data.write_text(json.dumps(records))
    assert run_identity(args, ws["model"], data, None) != first      # same path, other content: run again


# ---- a full disk ----------------------------------------------------------------------------------
@pytest.fixture
def full_disk(tmp_path):
    """A 2 MB tmpfs (needs root and permission to mount) filled up to `leave` free bytes by fill(leave)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a 2 MB tmpfs here (needs root): {done.stderr.strip() or done.returncode}")

    def fill(leave: int):
        stat = os.statvfs(mount)
        (mount / "filler").write_bytes(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave))
    try:
        yield mount, fill
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_during_a_save_is_one_line_and_leaves_nothing(ws, tmp_path, capsys, full_disk):
    mount, fill = full_disk
    fill(64 * 1024)                                 # the converted weights (~180 KB) do not fit
    roots = (Path(ws["model"]).parent,)
    before = snapshot(*roots)
    code, err = in_process(capsys, "convert_checkpoint", [ws["model"], mount / "converted"])
    assert_refused(code, err, str(mount), before=before, roots=roots)
    assert sorted(p.name for p in mount.iterdir()) == ["filler"]
    # training: the first checkpoint of a full fine-tune (weights + two Adam moments) does not fit
    (mount / "filler").unlink()
    fill(128 * 1024)
    code, err = in_process(capsys, "finetune", finetune_args(ws, mount / "run", steps=2, method_flags=("--method", "full")))
    assert_refused(code, err, str(mount / "run"), before=before, roots=roots)
    assert not [p for p in mount.rglob("*") if ".tmp-" in p.name]
    assert not (mount / "run" / "adapter").exists()
