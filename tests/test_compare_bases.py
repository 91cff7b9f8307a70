"""tools/compare_methods.py --bases (minipeft.compare) end to end on tiny random models of all four kinds (LLaMA, a LLaMA with an
extended Chinese vocabulary, ChatGLM-6B, BLOOM), the six methods, a two-rate sweep on every base.

Checks, each against numbers computed here: every base x method has finite numbers and its trainable count is
apply_peft's on a fresh copy of that base (so BLOOM's and ChatGLM's LoRA sits on their fused wqkv, and the
extended vocabulary shows in full fine-tuning); every base runs the same steps; exact match, per-task accuracy
and mean answer length equal what the saved generations give; the gap is val - train; the tables and the answers
side by side name every base and method; the computed 7B tables hold each preset's parameter count written out
by hand; and a rerun in two worker processes (--jobs 2) gives the same tables and numbers bit for bit.
"""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))          # for extend_vocab
from helpers_bloom import make_bloom_workspace  # noqa: E402
from helpers_chatglm import train_chatglm_sentencepiece  # noqa: E402
from train_helpers import INIT_STD, MAX_SEQ_LEN, make_workspace  # noqa: E402

import extend_vocab  # noqa: E402
from minipeft.compare import main as compare_main, title  # noqa: E402
from minipeft.checkpoint import load_model  # noqa: E402
from minipeft.peft import apply_peft  # noqa: E402
from minipeft.train import TrainConfig, peft_config_from  # noqa: E402
from minipeft.train.prepare import with_family_defaults  # noqa: E402

METHODS = ("full", "lora", "llama_adapter", "prompt", "prefix", "adapter")
FAMILIES = {"llama": "llama", "chinese-llama": "llama", "chatglm": "chatglm", "bloom": "bloom"}
TIMING_KEYS = {"tokens_per_s", "train_seconds", "peak_memory_bytes", "peak_memory_kind", "wall_seconds", "machine",
               "command", "jobs"}


def make_chatglm(folder: Path) -> str:
    """A tiny random ChatGLM-6B in our folder format with a SentencePiece tokenizer set up like ice_text.model."""
    import sentencepiece as spm
    from minipeft.checkpoint import save_model
    from minipeft.config import ModelConfig
    from minipeft.families import build_model
    sp_path = train_chatglm_sentencepiece(folder / "sp", version=1)
    sp = spm.SentencePieceProcessor(model_file=sp_path)
    cfg = ModelConfig(family="chatglm", dim=32, n_layers=2, n_heads=4, vocab_size=sp.vocab_size(), ffn_hidden_dim=64,
                      qkv_bias=True, norm_eps=1e-5, max_seq_len=128, mask_id=sp.piece_to_id("[MASK]"),
                      gmask_id=sp.piece_to_id("[gMASK]"), sop_id=sp.piece_to_id("<sop>"))
    torch.manual_seed(4321)
    model = build_model(cfg)
    model.init_weights(std=INIT_STD)
    save_model(model, cfg, folder / "model", tokenizer_path=sp_path)
    return str(folder / "model")


def make_chinese_llama(llama_model: str, folder: Path) -> str:
    """The tiny LLaMA with Chinese pieces appended by tools/extend_vocab.py (new rows = mean of the old)."""
    folder.mkdir(parents=True)
    corpus = folder / "zh.txt"
    corpus.write_text("\n".join(["春风明月照山河", "白云青山绿水长", "秋风落叶满天飞", "江南夜雨打芭蕉"] * 30) + "\n",
                      encoding="utf-8")
    assert extend_vocab.main(["--base-tokenizer", str(Path(llama_model) / "tokenizer.model"), "--corpus", str(corpus),
                              "--vocab-size", "320", "--out", str(folder / "tokenizer.model"),
                              "--checkpoint", llama_model, "--checkpoint-out", str(folder / "model")]) == 0
    return str(folder / "model")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bases")
    llama = make_workspace(folder / "llama")
    folders = {"llama": llama["model"], "chinese-llama": make_chinese_llama(llama["model"], folder / "chinese"),
               "chatglm": make_chatglm(folder / "chatglm"), "bloom": make_bloom_workspace(folder / "bloom")["model"]}
    return folder, llama, folders


def compare(bases, out, *extra):
    folder, llama, folders = bases
    argv = ["--bases", ",".join(f"{label}={path}" for label, path in folders.items()), "--data", llama["train"],
            "--val-data", llama["val"], "--max-seq-len", str(MAX_SEQ_LEN), "--max-train-examples", "16",
            "--epochs", "1", "--batch-size", "8", "--evals-per-epoch", "2", "--sweep", "--sweep-epochs", "0.5",
            "--sweep-val-examples", "8", "--sweep-extend", "0", "--threads", "1", "--device", "cpu",
            "--out", str(out), *extra]
    for method in METHODS:
        argv += ["--sweep-lrs", f"{method}=1e-2,1e-1"]
    assert compare_main(argv) == 0
    return json.loads((out / "results.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def run(bases):
    out = bases[0] / "out"
    return out, compare(bases, out)


def test_every_base_and_method_has_finite_numbers_and_its_own_trainable_count(bases, run):
    _, folders = bases[0], bases[2]
    _, results = run
    assert list(results["bases"]) == list(FAMILIES)
    steps = set()
    for label, base_run in results["bases"].items():
        assert base_run["settings"]["family"] == FAMILIES[label]
        assert set(base_run["sweep"]) == set(METHODS)                # the same sweep on every base
        for method in METHODS:
            r = base_run["results"][method]
            for key in ("final_train_loss", "final_val_loss", "best_val_loss", "train_val_gap", "answer_chars_mean"):
                assert math.isfinite(r[key]), (label, method, key)
            steps.add(r["steps"])
            cfg = with_family_defaults(TrainConfig(model=folders[label], method=method).filled(), FAMILIES[label])
            report = apply_peft(load_model(folders[label]), peft_config_from(cfg)).report
            assert (r["trainable"], r["total"]) == (report.trainable, report.total), (label, method)
        targets = base_run["settings"]["method_hyper"]["lora"]["targets"]
        assert targets == (["wq", "wv"] if FAMILIES[label] == "llama" else ["wqkv"]), label
    assert len(steps) == 1                                              # the same budget everywhere
    full = {label: results["bases"][label]["results"]["full"]["trainable"] for label in ("llama", "chinese-llama")}
    rows = load_model(folders["chinese-llama"]).config.vocab_size - load_model(folders["llama"]).config.vocab_size
    assert rows > 0 and full["chinese-llama"] - full["llama"] == 2 * rows * 32     # embedding + output rows


def test_scores_follow_from_the_generations(run):
    _, results = run
    records = results["records"]
    assert len(records) == 8
    for label, base_run in results["bases"].items():
        for method, r in base_run["results"].items():
            texts = r["generations"]
            hits = [t.strip() == rec["output"].strip() for t, rec in zip(texts, records)]
            assert len(texts) == len(records)
            assert r["exact_match"] == pytest.approx(sum(hits) / len(hits))
            assert r["per_task"] == {"other": pytest.approx(sum(hits) / len(hits))}    # not demo tasks
            assert r["answer_chars_mean"] == pytest.approx(sum(len(t.strip()) for t in texts) / len(texts))
            assert r["expected_chars_mean"] == pytest.approx(sum(len(x["output"]) for x in records) / len(records))
            assert r["train_val_gap"] == pytest.approx(r["final_val_loss"] - r["final_train_loss"])


def test_tables_and_side_by_side(run):
    out, results = run
    markdown = (out / "results.md").read_text(encoding="utf-8")
    generations = (out / "generations.md").read_text(encoding="utf-8")
    for label in FAMILIES:
        for method in METHODS:
            assert f"| {label} | {title(method)} |" in markdown
        assert f"| {label} |" in generations
        assert (out / label / "results.json").is_file() and (out / label / "loss_curves.png").is_file()
    assert (out / "loss_curves.png").stat().st_size > 10_000


def test_7b_tables_hold_each_presets_parameter_count(run):
    _, results = run
    tables = results["tables_7b"]
    assert set(tables) == {"llama-7b", "chinese-llama-7b", "chatglm-6b", "bloom-7b1"}

    def llama(V, d=4096, L=32, f=11008):
        return 2 * V * d + d + L * (4 * d * d + 3 * d * f + 2 * d)

    d, L, f, V = 4096, 28, 16384, 130528                 # ChatGLM-6B: tied output, biases everywhere, 2 LayerNorms
    chatglm = V * d + 2 * d + L * (4 * d + 3 * d * d + 3 * d + d * d + d + 2 * d * f + f + d)
    d, L, f, V = 4096, 30, 16384, 250880                 # BLOOM-7B1: tied output, embedding LayerNorm
    bloom = V * d + 2 * d + 2 * d + L * (4 * d + 3 * d * d + 3 * d + d * d + d + 2 * d * f + f + d)
    expected = {"llama-7b": llama(32000), "chinese-llama-7b": llama(49953), "chatglm-6b": chatglm, "bloom-7b1": bloom}
    assert expected["llama-7b"] == 6_738_415_616 and expected["bloom-7b1"] == 7_069_016_064
    for name, table in tables.items():
        assert table["rows"]["full"]["trainable"] == expected[name], name
        lora = table["rows"]["lora"]
        assert lora["cpu_node_bytes"] == 2 * lora["total"] + 14 * lora["trainable"]


def test_a_rerun_in_two_processes_is_bit_identical(bases, run, tmp_path):
    out, first = run
    second = compare(bases, tmp_path / "again", "--jobs", "2")

    def numbers(obj):
        if isinstance(obj, dict):
            return {k: numbers(v) for k, v in obj.items() if k not in TIMING_KEYS}
        return [numbers(v) for v in obj] if isinstance(obj, list) else obj

    assert numbers(first) == numbers(second)
    sections = lambda text: text.split("## Costs")[0].split("\n", 3)[3]  # noqa: E731  (after the command line)
    assert sections((out / "results.md").read_text()) == sections((tmp_path / "again" / "results.md").read_text())


def test_resume_keeps_the_bases_run_with_the_same_settings(bases, run, capsys):
    out, first = run
    again = compare(bases, out, "--resume")
    printed = capsys.readouterr().out
    assert printed.count("was made with these settings; kept") == 4
    assert again["bases"] == first["bases"]
