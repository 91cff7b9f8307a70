"""The output policy of every writer (minipeft/reservation.py: reserve_output, Reservation.place; fileio.atomic_folder), as a
user meets it: each data-loss case of issue 23 and its siblings is refused with a non-zero exit and one line, and
the SHA-256 of every file it could have touched (inputs and outputs) is unchanged (bad_input_helpers.snapshot).

Everything is refused before any training, so the file runs in seconds; the concurrent finetune run is a
subprocess started while this process holds the run folder through the library (no timing involved).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bad_input_helpers import ROOT, assert_refused, run_in_process, snapshot  # noqa: E402
from train_helpers import MAX_SEQ_LEN, make_workspace  # noqa: E402

from minipeft import compare, pretrain  # noqa: E402
from minipeft.checkpoint import CheckpointError, load_model, save_model  # noqa: E402
from minipeft.fileio import atomic_folder, write_atomic  # noqa: E402
from minipeft.reservation import RESERVED_MARK, reserve_output  # noqa: E402


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("policy_ws"))


def user_files(folder: Path, **files) -> Path:
    """A folder holding what a user already had (name -> text)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def no_markers(*roots) -> bool:
    return not any(RESERVED_MARK in p.name for root in roots for p in Path(root).rglob("*"))


# ---- pretrain_tiny.py: --name stays inside --out; --overwrite never removes an input ----------------------------
def pretrain_argv(corpus, out, *extra):
    return ["--corpus", str(corpus), "--out", str(out), "--steps", "2", "--vocab-size", "64", *map(str, extra)]


@pytest.mark.parametrize("name", ["../x", ".", "..", "a/b", "train_state.pt"])
def test_pretrain_name_is_a_plain_name_inside_out(tmp_path, capsys, name):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text\n" * 50)
    user_files(tmp_path / "x", keep="the user's folder beside --out")
    out = user_files(tmp_path / "out", notes="already here")
    before = snapshot(tmp_path)
    code = pretrain.run_command_line(pretrain_argv(corpus, out, "--name", name, "--overwrite"))
    assert_refused(code, capsys.readouterr().err, "--name", before=before, roots=[tmp_path])
    assert no_markers(tmp_path)


@pytest.mark.parametrize("inside", ["corpus", "init-from", "tokenizer"])
def test_pretrain_overwrite_never_removes_an_input(ws, tmp_path, capsys, inside):
    out = user_files(tmp_path / "out", old="an earlier run")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text\n" * 50)
    extra = []
    if inside == "corpus":
        corpus = out / "corpus.txt"
        corpus.write_text("some text\n" * 50)
    elif inside == "init-from":
        save_model(load_model(ws["model"]), load_model(ws["model"]).config, out / "init", tokenizer_path=ws["tokenizer"])
        extra = ["--init-from", out / "init"]
    else:
        (out / "tok.model").write_bytes(Path(ws["tokenizer"]).read_bytes())
        extra = ["--tokenizer", out / "tok.model"]
    before = snapshot(tmp_path)
    code = pretrain.run_command_line(pretrain_argv(corpus, out, "--overwrite", *extra))
    assert_refused(code, capsys.readouterr().err, "is an input of this run", "--overwrite", before=before,
                   roots=[tmp_path])


# ---- compare_methods.py: an --out holding results is refused unless --resume / --overwrite ------------------------
def compare_argv(ws, out, *extra):
    return ["--base", ws["model"], "--data", ws["train"], "--val-data", ws["val"], "--max-seq-len", str(MAX_SEQ_LEN),
            "--methods", "lora", "--lr", "lora=1e-2", "--epochs", "1", "--threads", "1", "--device", "cpu",
            "--out", str(out), *map(str, extra)]


def earlier_comparison(out: Path) -> Path:
    user_files(out, **{"results.json": json.dumps({"results": {"lora": {}}}), "results.md": "# earlier\n"})
    user_files(out / "runs" / "lora", **{"metrics.jsonl": '{"step": 1}\n'})
    return out


def test_compare_run_twice_into_one_out_is_refused(ws, tmp_path, capsys):
    out = earlier_comparison(tmp_path / "out")
    before = snapshot(tmp_path, *map(Path, (ws["model"], ws["train"], ws["val"])))
    code = compare.main(compare_argv(ws, out))
    assert_refused(code, capsys.readouterr().err, f"--out {out}", "holds an earlier comparison", "--overwrite",
                   before=before, roots=[tmp_path, ws["model"], ws["train"], ws["val"]])
    assert no_markers(tmp_path)


def test_compare_overwrite_never_removes_an_input(ws, tmp_path, capsys):
    out = earlier_comparison(tmp_path / "out")
    data = out / "runs" / "train.json"                   # the training data lies in what --overwrite removes
    data.write_text(Path(ws["train"]).read_text())
    argv = compare_argv(ws, out, "--overwrite")
    argv[argv.index("--data") + 1] = str(data)
    before = snapshot(tmp_path)
    code = compare.main(argv)
    assert_refused(code, capsys.readouterr().err, str(data), "is an input of this run", before=before, roots=[tmp_path])


@pytest.mark.parametrize("label", ["..", "results.json", "a/b"])
def test_compare_base_label_is_a_plain_name_inside_out(ws, tmp_path, capsys, label):
    argv = compare_argv(ws, tmp_path / "out")
    i = argv.index("--base")
    argv[i:i + 2] = ["--bases", f"{label}={ws['model']}"]
    code = compare.main(argv)
    assert_refused(code, capsys.readouterr().err, "--bases", before={}, roots=[tmp_path])


# ---- the final rename: never over a folder or file that appeared while the output was written ---------------------
def test_save_model_never_replaces_a_folder_that_appeared_meanwhile(ws, tmp_path, monkeypatch):
    import minipeft.checkpoint.folder as folder_module
    model = load_model(ws["model"])
    target = tmp_path / "saved"
    original = folder_module.write_model_files

    def write_then_a_user_makes_the_folder(*args, **kwargs):
        original(*args, **kwargs)
        user_files(target, mine="the user's file")        # appears after the start-up check, before the rename
    monkeypatch.setattr(folder_module, "write_model_files", write_then_a_user_makes_the_folder)
    with pytest.raises(CheckpointError, match="appeared") as err:
        save_model(model, model.config, target, overwrite=False)
    assert "\n" not in str(err.value)
    assert snapshot(target) == {str(target / "mine"): snapshot(target / "mine")[str(target / "mine")]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]     # no temporary, no marker left


def test_atomic_folder_and_write_atomic_keep_what_appeared(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(FileExistsError, match="appeared"):
        with atomic_folder(target) as tmp:
            (tmp / "new").write_text("new")
            user_files(target, mine="x", other="y")
    assert sorted(p.name for p in target.iterdir()) == ["mine", "other"]
    path = tmp_path / "file.txt"
    with pytest.raises(FileExistsError, match="appeared"):
        write_atomic(path, lambda tmp: (tmp.write_text("new"), path.write_text("the user's")), overwrite=False)
    assert path.read_text() == "the user's"


def test_convert_and_extend_vocab_overwrite_never_remove_an_input(ws, tmp_path, capsys):
    out = tmp_path / "out"
    save_model(load_model(ws["model"]), load_model(ws["model"]).config, out / "src", tokenizer_path=ws["tokenizer"])
    before = snapshot(tmp_path)
    code, err = run_in_process(capsys, "convert_checkpoint", out / "src", out, "--overwrite")
    assert_refused(code, err, "is an input of this run", before=before, roots=[tmp_path])
    code, err = run_in_process(capsys, "extend_vocab", "--base-tokenizer", ws["tokenizer"], "--extra-tokenizer",
                               ws["tokenizer"], "--out", tmp_path / "ext.model", "--checkpoint", out / "src",
                               "--checkpoint-out", out, "--overwrite")
    assert_refused(code, err, "is an input of this run", before=before, roots=[tmp_path])


# ---- two writers of one target: the second is refused while the first holds it -----------------------------------
def finetune_flags(ws, out, *extra):
    return ["--model", ws["model"], "--train-data", ws["train"], "--val-data", ws["val"], "--max-seq-len",
            str(MAX_SEQ_LEN), "--lr", "1e-2", "--batch-size", "4", "--max-steps", "1", "--no-exact-match",
            "--no-progress", "--samples", "0", "--device", "cpu", "--out", str(out), *map(str, extra)]


def test_a_second_finetune_on_one_out_is_refused_while_the_first_holds_it(ws, tmp_path):
    from minipeft.train import TrainConfig
    from minipeft.train.config import reserve_run_folder
    out = tmp_path / "run"
    first = reserve_run_folder(TrainConfig(out=str(out)))   # what the first run's prepare_run holds until it ends
    try:
        before = snapshot(tmp_path, *map(Path, (ws["model"], ws["train"], ws["val"])))
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        done = subprocess.run([sys.executable, str(ROOT / "tools" / "finetune.py"), *finetune_flags(ws, out)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert_refused(done.returncode, done.stderr, f"{out}: in use by process {os.getpid()}", before=before,
                       roots=[tmp_path, ws["model"], ws["train"], ws["val"]])
        assert not out.exists()
    finally:
        first.release()
    assert no_markers(tmp_path)


def test_a_reservation_left_by_a_killed_process_is_taken_over(tmp_path, capsys):
    target = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    marker = tmp_path / f".out{RESERVED_MARK}"
    marker.write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename, "token": "old"}))
    with reserve_output(target) as reservation:
        assert json.loads(marker.read_text())["pid"] == os.getpid() and reservation.marker == marker
    assert "taking over the reservation left by process" in capsys.readouterr().err
    assert not marker.exists()
    with reserve_output(target):                     # the same process may nest (a tool holds, the library writes)
        with atomic_folder(target) as tmp:
            (tmp / "a").write_text("a")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
