"""Bad input to tools/finetune.py, as a user would give it: each is refused with a non-zero exit and one line
naming the flag, file or step, no traceback, and no file that existed before changed (every file of the
workspace and the run folder hashed before and after). One case runs as a subprocess; the others call the
tool's main() in-process (the same code path after the interpreter starts; 3 s saved each)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bad_input_helpers import assert_refused, run_tool, snapshot, tool_main, write_evil_pickle  # noqa: E402
from helpers_tokenizer import train_tiny_sentencepiece  # noqa: E402
from train_helpers import MAX_SEQ_LEN, make_workspace  # noqa: E402


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("bad_ft_ws"))


def base_flags(ws, out, *extra):
    return ["--model", ws["model"], "--train-data", ws["train"], "--val-data", ws["val"], "--max-seq-len",
            str(MAX_SEQ_LEN), "--batch-size", "4", "--no-exact-match", "--no-progress", "--samples", "0",
            "--device", "cpu", "--lr", "1e-2", "--out", str(out), *map(str, extra)]


def refused_in_process(capsys, ws, tmp_path, argv, *fragments):
    roots = (Path(ws["model"]).parent, tmp_path)
    before = snapshot(*roots)
    try:
        code = tool_main("finetune").main(argv)
    except SystemExit as stop:                  # a value the flag's type refuses: argparse exits, status 2
        code = stop.code
    return assert_refused(code, capsys.readouterr().err, *fragments, before=before, roots=roots)


def test_existing_run_folder_is_not_overwritten_subprocess(ws, tmp_path):
    run = tmp_path / "old_run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter.safetensors").write_bytes(b"old weights")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    roots = (Path(ws["model"]).parent, tmp_path)
    before = snapshot(*roots)
    done = run_tool("finetune", *base_flags(ws, run, "--max-steps", "1"))
    assert_refused(done.returncode, done.stderr, f"--out {run}", "holds another run", "--overwrite", before=before,
                   roots=roots)
    # with --overwrite the old run's files are replaced: a loadable adapter, only the new run's metrics
    (run / "keep.txt").write_text("not the run's")
    assert tool_main("finetune").main(base_flags(ws, run, "--max-steps", "2", "--overwrite")) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "eval" not in line]
    assert steps == [1, 2] and (run / "keep.txt").read_text() == "not the run's"
    assert (run / "adapter" / "adapter.safetensors").read_bytes() != b"old weights"


@pytest.mark.parametrize("flags, fragments", [
    (["--lr", "inf"], ["argument --lr: expected a finite number > 0, got 'inf'"]),
    (["--lr", "nan"], ["argument --lr: expected a finite number > 0, got 'nan'"]),
    (["--max-grad-norm", "0"], ["argument --max-grad-norm: expected a finite number > 0, got '0'"]),
    (["--max-grad-norm", "-1"], ["argument --max-grad-norm: expected a finite number > 0, got '-1'"]),
    (["--weight-decay", "nan"], ["argument --weight-decay: expected a finite number >= 0"]),
    (["--keep-checkpoints", "0", "--save-every", "1"], ["argument --keep-checkpoints: expected an integer >= 1",
                                                        "--save-every 0"]),
    (["--device", "cuda:7"], ["--device cuda:7", "CUDA devices"]),
    (["--device", "tpu"], ["--device"]),
    (["--lora-targets", "wqkv"], ["wqkv"]),                       # a BLOOM/ChatGLM name on a LLaMA
    (["--resume", "/nonexistent/run"], ["--resume /nonexistent/run", "not found"]),
])
def test_bad_flags(ws, tmp_path, capsys, flags, fragments):
    refused_in_process(capsys, ws, tmp_path, base_flags(ws, tmp_path / "run", "--max-steps", "1", *flags), *fragments)


def test_out_that_is_a_file(ws, tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("my notes")
    refused_in_process(capsys, ws, tmp_path, base_flags(ws, target), f"--out {target}: is a file")


def test_tokenizer_that_disagrees_with_the_model(ws, tmp_path, capsys):
    smaller = train_tiny_sentencepiece(tmp_path / "small", vocab_size=295)
    refused_in_process(capsys, ws, tmp_path, base_flags(ws, tmp_path / "run", "--tokenizer", smaller),
                       f"--tokenizer {smaller}", "has 295 pieces but the model's vocabulary is")


def test_bad_data_files(ws, tmp_path, capsys):
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes(b'[{"instruction": "say", "output": "ok"},\n {"instruction": "caf\xe9", "output": "x"}]')
    refused_in_process(capsys, ws, tmp_path, base_flags(ws, tmp_path / "r1", "--train-data", latin1),
                       f"{latin1}: line 2: not UTF-8")
    useless = tmp_path / "useless.jsonl"
    useless.write_text('{"instruction": "a"}\n{"instruction": "b", "output": 3}\nnot json\n')
    line = refused_in_process(capsys, ws, tmp_path, base_flags(ws, tmp_path / "r2", "--train-data", useless),
                              f"{useless}: no usable training examples")
    assert "record 0: missing field 'output'" in line and "record 2: line is not valid JSON" in line
    broken = tmp_path / "broken.tokenized.jsonl"
    broken.write_text('{"minipeft_tokenized": 1}\n{"input_ids": [1, 2], "labels": [1, 2], "prompt_len": 1}\n{oops\n')
    refused_in_process(capsys, ws, tmp_path, base_flags(ws, tmp_path / "r3", "--train-data", broken),
                       f"{broken}: line 3: not valid JSON")
    other = tmp_path / "other.tokenized.jsonl"
    other.write_text(json.dumps({"minipeft_tokenized": 1, "tokenizer": "other.model", "tokenizer_sha256": "0" * 64})
                     + '\n{"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "prompt_len": 1}\n')
    refused_in_process(capsys, ws, tmp_path, base_flags(ws, tmp_path / "r4", "--train-data", other),
                       f"{other}: made with another tokenizer")
    out_of_vocab = tmp_path / "old.tokenized.jsonl"
    out_of_vocab.write_text('{"minipeft_tokenized": 1}\n{"input_ids": [1, 99999], "labels": [1, 99999], "prompt_len": 1}\n')
    refused_in_process(capsys, ws, tmp_path, base_flags(ws, tmp_path / "r5", "--train-data", out_of_vocab),
                       f"{out_of_vocab}: line 2: token id 99999 is outside the vocabulary")
    not_json = tmp_path / "ds.json"
    not_json.write_text("stage: 2")
    refused_in_process(capsys, ws, tmp_path, base_flags(ws, tmp_path / "r6", "--deepspeed", not_json),
                       f"--deepspeed {not_json}: not valid JSON")


def test_a_utf8_bom_is_accepted(ws, tmp_path, capsys):
    with_bom = tmp_path / "bom.json"
    with_bom.write_bytes(b"\xef\xbb\xbf" + Path(ws["train"]).read_bytes())
    assert tool_main("finetune").main(base_flags(ws, tmp_path / "run", "--train-data", with_bom, "--max-steps", "1")) == 0


def test_non_finite_training_stops_without_an_adapter(ws, tmp_path, capsys):
    out = tmp_path / "run"
    code = tool_main("finetune").main(base_flags(ws, out, "--max-steps", "30", "--lr", "1e36", "--warmup-steps", "0"))
    line = assert_refused(code, capsys.readouterr().err, "finetune.py: error: step ", "stopping", status=1)
    assert "non-finite" in line or "loss is nan" in line or "loss is inf" in line
    assert not (out / "adapter").exists()


def test_resume_checks_what_the_checkpoint_was_made_with(ws, tmp_path, capsys):
    finetune = tool_main("finetune")
    run = tmp_path / "run"
    assert finetune.main(base_flags(ws, run, "--max-steps", "2", "--save-every", "1")) == 0
    capsys.readouterr()
    refused_in_process(capsys, ws, tmp_path, base_flags(ws, run, "--max-steps", "2", "--resume", run, "--lr", "5e-3"),
                       "checkpoint has lr = 0.01 but this run has 0.005")
    other_data = tmp_path / "other.json"
    other_data.write_text(json.dumps(json.loads(Path(ws["train"]).read_text())[::-1]))
    refused_in_process(capsys, ws, tmp_path, base_flags(ws, run, "--max-steps", "2", "--resume", run,
                                                        "--train-data", other_data), "train_data")
    other_base = tmp_path / "other_base"                     # the same shapes, other weights
    from minipeft.checkpoint import load_model, save_model
    model = load_model(ws["model"])
    model.norm.weight.data.add_(0.5)
    save_model(model, model.config, other_base, tokenizer_path=ws["tokenizer"])
    refused_in_process(capsys, ws, tmp_path, [*base_flags(ws, run, "--max-steps", "2", "--resume", run),
                                              "--model", str(other_base)], "base_model")
    # a planted pickle in the run folder: refused, and its code never runs
    marker = tmp_path / "pwned"
    write_evil_pickle(run / "checkpoints" / "step-000009.pt", marker)
    refused_in_process(capsys, ws, tmp_path, base_flags(ws, run, "--max-steps", "2", "--resume", run),
                       "step-000009.pt: refused", "could run code")
    assert not marker.exists()
