"""Resuming with any changed method hyper-parameter is refused with a message naming the setting: the run
identity is derived from the whole method config, not from a hand-written list."""

import dataclasses
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_helpers import MAX_SEQ_LEN, make_workspace  # noqa: E402

from minipeft.peft import (AdapterConfig, FullConfig, LlamaAdapterConfig, LoRAConfig, PrefixConfig,  # noqa: E402
                           PromptConfig)
from minipeft.train import TrainConfig, TrainError, build_trainer, prepare_run  # noqa: E402

SAVED = {"lora": LoRAConfig(rank=4), "prompt": PromptConfig(prompt_len=3, init="random"),
         "prefix": PrefixConfig(prefix_len=3, reparam_hidden=8), "adapter": AdapterConfig(bottleneck=4),
         "llama_adapter": LlamaAdapterConfig(prompt_len=3, adapter_layers=1), "full": FullConfig()}
CHANGES = [
    ("lora", "alpha", 32.0), ("lora", "dropout", 0.1), ("lora", "rank", 2), ("lora", "targets", ("wq", "wk")),
    ("lora", "extra_trainable", ("output",)),
    ("prompt", "init", "vocab"), ("prompt", "prompt_len", 4),
    ("prefix", "reparam_hidden", None), ("prefix", "prefix_len", 2),
    ("adapter", "bottleneck", 8),
    ("llama_adapter", "gate", "plain"), ("llama_adapter", "adapter_layers", 2), ("llama_adapter", "prompt_len", 2),
    ("full", "extra_trainable", ("output",)),
]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("ws"))


def trainer_for(ws, peft, out):
    cfg = TrainConfig(model=ws["model"], train_data=ws["train"], val_data=ws["val"], max_seq_len=MAX_SEQ_LEN,
                      peft=peft, lr=1e-2, batch_size=4, max_steps=1, save_every=1, device="cpu", out=str(out),
                      progress=False, exact_match=False)
    cfg, ds_config, base, tokenizer, data = prepare_run(cfg)
    return build_trainer(cfg, base, tokenizer, data, ds_config)


@pytest.fixture(scope="module")
def saved_runs(ws, tmp_path_factory):
    """One finished one-step run (with its checkpoint) per method."""
    folders = {}
    for method, peft in SAVED.items():
        folders[method] = tmp_path_factory.mktemp(f"saved-{method}")
        trainer_for(ws, peft, folders[method]).train()
    return folders


@pytest.mark.parametrize("method, field, value", CHANGES, ids=[f"{m}.{f}" for m, f, _ in CHANGES])
def test_resume_with_a_changed_setting_is_refused(ws, saved_runs, tmp_path, method, field, value):
    changed = dataclasses.replace(SAVED[method], **{field: value})
    trainer = trainer_for(ws, changed, tmp_path / "new")
    with pytest.raises(TrainError, match=rf"checkpoint has peft\.{field} = .* but this run has"):
        trainer.resume(saved_runs[method])


@pytest.mark.parametrize("method", sorted(SAVED))
def test_resume_with_the_same_settings_is_accepted(ws, saved_runs, tmp_path, method):
    trainer = trainer_for(ws, SAVED[method], tmp_path / "same")
    trainer.resume(saved_runs[method])
    assert trainer.step == 1
