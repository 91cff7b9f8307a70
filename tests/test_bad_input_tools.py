"""Bad input to tools/prepare_data.py, extend_vocab.py, convert_checkpoint.py and generate.py, each run as a
user would (`python tools/X.py ...` in a subprocess, several bad inputs per tool in one test), and to the
public API: each is refused with a non-zero exit (or a project error) and one line naming the file, flag or
field, no traceback, and nothing that existed before changed (every file hashed before and after). Also: a
pickle that would run code is refused wherever a checkpoint is read (Meta .pth, HF .bin; the resume case is
in test_bad_input_finetune.py), and stale temporaries of dead processes are cleaned where outputs are written."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bad_input_helpers import assert_refused, run_in_process, run_tool, snapshot, write_evil_pickle  # noqa: E402
from train_helpers import make_workspace  # noqa: E402

from minipeft.checkpoint import CheckpointError, convert_checkpoint, load_model, save_model  # noqa: E402
from minipeft.config import ConfigError, ModelConfig  # noqa: E402
from minipeft.peft import LoRAConfig, PeftConfigError, apply_peft, export_lora_to_hf_peft, save_adapter  # noqa: E402


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("bad_tools_ws"))


def refused(done: subprocess.CompletedProcess, roots, before, *fragments):
    return assert_refused(done.returncode, done.stderr, *fragments, before=before, roots=roots)


def refused_all(capsys, tool, cases, roots, before):
    """The first case as a subprocess (`python tools/<tool>.py`), the others through main() in-process."""
    for i, (args, fragments) in enumerate(cases):
        if i == 0:
            done = run_tool(tool, *args)
            code, err = done.returncode, done.stderr
        else:
            code, err = run_in_process(capsys, tool, *args)
        assert_refused(code, err, *fragments, before=before, roots=roots)


def test_prepare_data(ws, tmp_path, capsys):
    roots = (Path(ws["model"]).parent, tmp_path)
    data = tmp_path / "data.json"
    shutil.copy(ws["train"], data)
    text = tmp_path / "notes.txt"
    text.write_text("these are my notes\nnot JSON at all\n")
    existing = tmp_path / "done.tokenized.jsonl"
    existing.write_text("keep me\n")
    before = snapshot(*roots)
    cases = [
        ([data, "--out", data], [f"--out {data}: is the input data"]),
        ([text, "--out", tmp_path / "t.jsonl"], [f"{text}: no usable records", "record 0: line is not valid JSON"]),
        ([data, "--out", existing], [f"{existing}: output file already exists", "--overwrite"]),
        ([data, "--out", tmp_path / "x.jsonl", "--tokenizer", ws["train"]], [ws["train"]]),
    ]
    refused_all(capsys, "prepare_data", cases, roots, before)
    # a UTF-8 byte-order mark is accepted; the header names the tokenizer by its SHA-256
    with_bom = tmp_path / "bom.json"
    with_bom.write_bytes(b"\xef\xbb\xbf" + data.read_bytes())
    code, err = run_in_process(capsys, "prepare_data", with_bom, "--out", tmp_path / "bom.jsonl", "--tokenizer",
                               ws["tokenizer"])
    assert code == 0, err
    assert len(json.loads((tmp_path / "bom.jsonl").read_text().splitlines()[0])["tokenizer_sha256"]) == 64


def test_extend_vocab(ws, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(ws["model"], ckpt)
    other = tmp_path / "other_out"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    corpus = tmp_path / "zh.txt"
    corpus.write_text("今天天气很好\n我们去公园\n" * 20, encoding="utf-8")
    roots = (Path(ws["model"]).parent, tmp_path)
    before = snapshot(*roots)
    common = ["--corpus", corpus, "--vocab-size", "320"]
    cases = [
        (["--base-tokenizer", ckpt / "tokenizer.model", "--out", ckpt / "tokenizer.model"], ["is also an input"]),
        (["--base-tokenizer", ws["tokenizer"], "--out", ckpt / "tokenizer.model", "--checkpoint", ckpt,
          "--checkpoint-out", tmp_path / "new"], [f"is inside --checkpoint {ckpt}"]),
        (["--base-tokenizer", ws["tokenizer"], "--out", tmp_path / "ext.model", "--checkpoint", ckpt,
          "--checkpoint-out", other], [f"{other}: output folder already exists", "--overwrite"]),
        (["--base-tokenizer", ws["tokenizer"], "--out", corpus], [f"--out {corpus}: is also an input"]),
    ]
    refused_all(capsys, "extend_vocab", [(args + common, fragments) for args, fragments in cases], roots, before)


def test_convert_checkpoint_and_code_in_pickles(ws, tmp_path, capsys):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "weights.bin").write_bytes(b"precious")
    marker = tmp_path / "pwned"
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "params.json").write_text(json.dumps({"dim": 32, "n_layers": 2, "n_heads": 4, "norm_eps": 1e-5,
                                                  "multiple_of": 16, "vocab_size": 300}))
    write_evil_pickle(meta / "consolidated.00.pth", marker)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2,
                                                "num_attention_heads": 4, "intermediate_size": 96, "vocab_size": 300}))
    write_evil_pickle(hf / "pytorch_model.bin", marker)
    float_layers = tmp_path / "float_layers"
    shutil.copytree(ws["model"], float_layers)
    cfg = json.loads((float_layers / "config.json").read_text())
    (float_layers / "config.json").write_text(json.dumps({**cfg, "n_layers": 2.0}))
    string_dim = tmp_path / "string_dim"
    shutil.copytree(ws["model"], string_dim)
    (string_dim / "config.json").write_text(json.dumps({**cfg, "dim": "32"}))
    roots = (Path(ws["model"]).parent, tmp_path)
    before = snapshot(*roots)
    cases = [
        ([ws["model"], existing], [f"{existing}: output folder already exists", "--overwrite"]),
        ([ws["model"], ws["model"]], ["not over its source"]),
        ([meta, tmp_path / "o1"], ["consolidated.00.pth: refused", "could run code", "posix.system"]),
        ([hf, tmp_path / "o2"], ["pytorch_model.bin: refused", "could run code"]),
        ([float_layers, tmp_path / "o3"], [str(float_layers / "config.json"), "ModelConfig.n_layers must be an int"]),
        ([string_dim, tmp_path / "o4"], [str(string_dim / "config.json"), "ModelConfig.dim must be an int"]),
        ([ws["model"], tmp_path / "o5", "--max-shard-size", "lots"], ["lots"]),
    ]
    refused_all(capsys, "convert_checkpoint", cases, roots, before)
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):     # the API reads them the same way
        load_model(hf)
    assert not marker.exists()


def test_generate(ws, tmp_path, capsys):
    roots = (Path(ws["model"]).parent, tmp_path)
    before = snapshot(*roots)
    refused_all(capsys, "generate", [
        ([ws["model"], "--prompt", "hi", "--device", "cuda"], ["--device cuda"]),
        ([ws["model"], "--prompt", "hi", "--adapter", tmp_path / "nope"], [str(tmp_path / "nope")]),
        ([tmp_path, "--prompt", "hi"], [str(tmp_path)]),
    ], roots, before)
    code, err = run_in_process(capsys, "generate", ws["model"], "--prompt", "cat dog " * 80, "--max-new-tokens", "2")
    assert code == 0 and "--prompt 1" in err and "max_seq_len 128" in err


# ---- the public API ---------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, message", [
    (dict(n_heads=0), "ModelConfig.n_heads must be positive"),
    (dict(dim=0), "ModelConfig.dim must be positive"),
    (dict(n_layers=4.0), "ModelConfig.n_layers must be an int, got 4.0"),
    (dict(dim="192"), "ModelConfig.dim must be an int, got '192'"),
    (dict(vocab_size=True), "ModelConfig.vocab_size must be an int"),
    (dict(norm_eps=float("nan")), "ModelConfig.norm_eps must be positive"),
])
def test_model_config_rejects_bad_fields(fields, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        ModelConfig(**{**dict(dim=192, n_layers=4, n_heads=6, vocab_size=100), **fields})


def test_api_writers_refuse_to_overwrite(ws, tmp_path):
    model = load_model(ws["model"])
    target = tmp_path / "mine"
    shutil.copytree(ws["model"], target)
    (target / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError, match=f"{target}: output folder already exists"):
        save_model(model, model.config, target)
    with pytest.raises(PeftConfigError, match=f"{target}: output folder already exists"):
        save_adapter(apply_peft(load_model(ws["model"]), LoRAConfig()), target)
    from minipeft.peft import FullConfig
    with pytest.raises(PeftConfigError, match="already exists"):
        save_adapter(apply_peft(load_model(ws["model"]), FullConfig()), target)
    with pytest.raises(CheckpointError, match="already exists"):
        convert_checkpoint(ws["model"], target)
    both = apply_peft(load_model(ws["model"]), LoRAConfig(targets=("wq", "output"), extra_trainable=("output",)))
    with pytest.raises(PeftConfigError, match="output is both a LoRA target and trained in full"):
        export_lora_to_hf_peft(both, tmp_path / "hf_export")
    assert snapshot(tmp_path) == before
    # with overwrite the folder is replaced as a whole; the adapter's two files get the same mode
    save_adapter(apply_peft(load_model(ws["model"]), LoRAConfig()), target, overwrite=True)
    modes = {p.name: p.stat().st_mode & 0o777 for p in target.iterdir()}
    assert set(modes) == {"adapter_config.json", "adapter.safetensors"} and len(set(modes.values())) == 1


def test_stale_temporaries_of_dead_processes_are_removed(ws, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale_file = tmp_path / f".model.safetensors.tmp-{dead_pid}"
    stale_file.write_bytes(b"x" * 1000)
    stale_folder = tmp_path / f".ckpt.tmp-{dead_pid}-abc"
    stale_folder.mkdir()
    (stale_folder / "model.safetensors").write_bytes(b"y")
    live = tmp_path / f".other.tmp-{os.getpid()}"
    live.write_bytes(b"in use")
    model = load_model(ws["model"])
    save_model(model, model.config, tmp_path / "ckpt")
    assert not stale_file.exists() and not stale_folder.exists() and live.exists()
    assert torch.equal(load_model(tmp_path / "ckpt").output.weight, model.output.weight)
