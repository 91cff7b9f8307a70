"""tools/compare_methods.py (minipeft.compare) end to end on a tiny random model (train_helpers' workspace), 2-3
steps per method.

Checks: every method is in the JSON and the Markdown table with finite numbers; each method's trainable count
equals apply_peft's report on a fresh copy of the base, and its closed form (minipeft.memory); the shared token
budget (same steps, same training tokens for every method); the best validation loss is the minimum of the
curve; the PNG is written; the computed 7B rows equal lesson 07's hand formulas; bad flags give a clear error.
"""

import dataclasses
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_helpers import MAX_SEQ_LEN, make_workspace  # noqa: E402

from minipeft import compare  # noqa: E402
from minipeft.checkpoint import load_model  # noqa: E402
from minipeft.peft import apply_peft  # noqa: E402
from minipeft.train import TrainConfig, peft_config_from  # noqa: E402

METHODS = ("full", "lora", "llama_adapter", "prompt", "prefix", "adapter")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare")
    ws = make_workspace(folder / "ws")
    out = folder / "out"
    # 24 training records: 16 train (2 steps of 8 per epoch), the last 8 are the sweep's validation.
    argv = ["--base", ws["model"], "--data", ws["train"], "--val-data", ws["val"], "--max-seq-len", str(MAX_SEQ_LEN),
            "--max-train-examples", "16", "--epochs", "1", "--batch-size", "8", "--evals-per-epoch", "2",
            "--sweep", "--sweep-epochs", "0.5", "--sweep-val-examples", "8", "--sweep-extend", "1", "--threads", "1", "--device", "cpu",
            "--out", str(out)]
    for method in METHODS:
        argv += ["--sweep-lrs", f"{method}=1e-2,1e-1"]
    assert compare.main(argv) == 0
    return ws, out, json.loads((out / "results.json").read_text())


def test_every_method_has_finite_numbers(run):
    _, out, results = run
    table = (out / "results.md").read_text()
    assert set(results["results"]) == set(METHODS)
    for method in METHODS:
        r = results["results"][method]
        for key in ("final_train_loss", "initial_val_loss", "best_val_loss", "final_val_loss", "tokens_per_s",
                    "exact_match", "peak_memory_bytes", "trainable_percent"):
            assert r[key] is not None and math.isfinite(r[key]), f"{method}: {key} = {r[key]}"
        assert 0.0 <= r["exact_match"] <= 1.0 and r["peak_memory_bytes"] > 0
        assert r["best_val_loss"] == min(v for _, v in r["curves"]["val"][1:])
        assert compare.title(method) in table
    assert (out / "loss_curves.png").stat().st_size > 1000


def test_same_token_budget_and_sweep(run):
    _, _, results = run
    per_method = results["results"]
    assert {r["steps"] for r in per_method.values()} == {2}
    assert len({r["train_tokens"] for r in per_method.values()}) == 1       # same examples, same order
    for method in METHODS:
        tried = results["sweep"][method]
        assert results["lr"][method] == float(min(tried, key=tried.get))
        # A two-rate grid has its best at an edge, so --sweep-extend 1 adds one rate, x10 beyond that edge.
        rates = sorted(float(lr) for lr in tried)
        assert rates == pytest.approx([1e-3, 1e-2, 1e-1]) or rates == pytest.approx([1e-2, 1e-1, 1.0]), rates
        assert per_method[method]["lr"] == results["lr"][method]


def test_trainable_counts_match_apply_peft(run):
    ws, _, results = run
    from minipeft.peft import closed_form_trainable
    settings_cfg = TrainConfig(model=ws["model"])
    for method in METHODS:
        peft_config = peft_config_from(dataclasses.replace(settings_cfg, method=method))
        base = load_model(ws["model"])
        report = apply_peft(base, peft_config).report
        r = results["results"][method]
        assert (r["trainable"], r["total"]) == (report.trainable, report.total), method
        assert r["trainable"] == closed_form_trainable(base.config, peft_config), method


def test_7b_table_against_hand_formulas(run):
    _, _, results = run
    rows = results["table_7b"]["rows"]
    psi = 6_738_415_616
    assert rows["full"]["trainable"] == psi and rows["lora"]["trainable"] == 4_194_304
    assert rows["llama_adapter"]["trainable"] == 1_229_760 and rows["prompt"]["trainable"] == 81_920
    for method, r in rows.items():
        t = r["trainable"]
        assert r["optimizer_state_bytes"] == 12 * t
        assert r["total"] == psi + (0 if method == "full" else t)     # the method's parameters join the base
        assert r["cpu_node_bytes"] == 2 * r["total"] + 14 * t         # ZeRO-3, both offloaded: all on the CPU
        assert r["model_states_gpu_bytes"] == 0
    # Full fine-tuning activations, batch 4 x 512: 32 trainable blocks of 26d + 8f + 4H + 8 bytes per token.
    d, f, H, hd = 4096, 11008, 32, 128
    full_act = 4 * 512 * (32 * (26 * d + 8 * f + 4 * H + 8) + 4 * hd + 8 + 8 * d + 4)
    assert rows["full"]["activation_bytes"] == full_act
    lora_act = 4 * 512 * (32 * (16 * d + 6 * f + 4 * H + 8) + 4 * hd + 8 + 8 * d + 4)
    assert rows["lora"]["activation_bytes"] == lora_act


def test_bad_flags_give_clear_errors(capsys, tmp_path):
    assert compare.main(["--methods", "lora,bogus", "--out", str(tmp_path)]) == 2
    assert "--methods" in capsys.readouterr().err
    assert compare.main(["--lr", "lora", "--out", str(tmp_path)]) == 2
    assert "METHOD=VALUE" in capsys.readouterr().err
    assert compare.main(["--lr", "lora=-1", "--out", str(tmp_path)]) == 2
    assert "> 0" in capsys.readouterr().err
    assert compare.main(["--data", str(tmp_path / "missing.json"), "--base", str(tmp_path),
                                 "--out", str(tmp_path)]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_lr_flags():
    from minipeft.peft import METHODS as REGISTERED                 # "all": every registered method
    assert compare.parse_method_values(["all=1e-4", "prompt=0.1"], "--lr") == {
        **{m: 1e-4 for m in REGISTERED}, "prompt": 0.1}
    assert compare.parse_method_values(["lora=1e-3,3e-3"], "--sweep-lrs", many=True) == {"lora": (1e-3, 3e-3)}
