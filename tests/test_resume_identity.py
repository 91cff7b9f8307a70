"""Resuming with any changed setting that decides a step is refused with a message naming it: the run identity
is derived from every TrainConfig field but an explicit list of those that cannot change a step, and from
the whole method config; paths count by the content they name."""

import dataclasses
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_helpers import MAX_SEQ_LEN, make_workspace  # noqa: E402

from minipeft.peft import (AdapterConfig, FullConfig, LlamaAdapterConfig, LoRAConfig, PrefixConfig,  # noqa: E402
                           PromptConfig)
from minipeft.train import TrainConfig, TrainError, build_trainer, prepare_run  # noqa: E402
from minipeft.train.checkpoints import (BY_CONTENT, NOT_IN_IDENTITY, STEP_SETTINGS, identity_settings,  # noqa: E402
                                        run_identity)

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


def trainer_for(ws, peft, out, config_class=TrainConfig, **settings):
    values = dict(model=ws["model"], train_data=ws["train"], val_data=ws["val"], max_seq_len=MAX_SEQ_LEN, peft=peft,
                  lr=1e-2, batch_size=4, max_steps=1, save_every=1, device="cpu", out=str(out), progress=False,
                  exact_match=False)
    cfg = config_class(**{**values, **settings})
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


# ---- which TrainConfig fields are in the identity -------------------------------------------------------
def test_every_train_config_field_is_decided_once():
    """Each field is either a step setting (in the identity) or listed, with its reason, as one that cannot change
    a step. A new field is in the identity by itself (fail closed); this test asks for the decision."""
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    undecided = [name for name in fields if name not in STEP_SETTINGS and name not in NOT_IN_IDENTITY]
    twice = [name for name in fields if name in STEP_SETTINGS and name in NOT_IN_IDENTITY]
    assert not undecided, f"TrainConfig fields in neither list of checkpoints.py: {undecided}"
    assert not twice, f"TrainConfig fields in both lists of checkpoints.py: {twice}"
    assert set(STEP_SETTINGS) | set(NOT_IN_IDENTITY) == set(fields), "a list names a field TrainConfig lacks"
    assert len(STEP_SETTINGS) == len(set(STEP_SETTINGS))
    assert set(identity_settings()) == set(STEP_SETTINGS) and set(BY_CONTENT) <= set(STEP_SETTINGS)
    assert all(reason.strip() for reason in NOT_IN_IDENTITY.values())


def test_the_identity_holds_every_step_setting(ws, tmp_path):
    trainer = trainer_for(ws, SAVED["lora"], tmp_path / "run")
    identity = run_identity(trainer)
    for name in STEP_SETTINGS:
        if name == "peft":
            assert {f"peft.{f.name}" for f in dataclasses.fields(LoRAConfig)} <= set(identity)
        else:
            assert BY_CONTENT.get(name, name) in identity, name
    assert not set(identity) & set(NOT_IN_IDENTITY)
    assert identity["base_model"] and identity["tokenizer"] and identity["train_data"]      # digests, not paths
    assert ws["model"] not in identity.values()


@dataclass
class TrainConfigWithANewField(TrainConfig):
    """TrainConfig as it would be after someone adds a field and forgets the identity."""
    new_knob: int = 0


def test_a_new_field_is_in_the_identity_without_being_listed(ws, tmp_path):
    """The --lora-alpha class of bug: a setting no list names is still refused when it changed."""
    saved = tmp_path / "saved"
    trainer_for(ws, SAVED["lora"], saved, TrainConfigWithANewField, new_knob=1).train()
    trainer = trainer_for(ws, SAVED["lora"], tmp_path / "new", TrainConfigWithANewField, new_knob=2)
    with pytest.raises(TrainError, match=r"checkpoint has new_knob = 1 but this run has 2"):
        trainer.resume(saved)
    trainer_for(ws, SAVED["lora"], tmp_path / "same", TrainConfigWithANewField, new_knob=1).resume(saved)


@pytest.mark.parametrize("field, value", [("gradient_checkpointing", True), ("eval_every", 5), ("device", "cpu:0"),
                                          ("strict_data", True), ("keep_checkpoints", 5)])
def test_settings_that_cannot_change_a_step_may_change(ws, saved_runs, tmp_path, field, value):
    trainer = trainer_for(ws, SAVED["lora"], tmp_path / "new", **{field: value})
    trainer.resume(saved_runs["lora"])
    assert trainer.step == 1


def test_the_tokenizer_counts_by_content(ws, saved_runs, tmp_path):
    """--tokenizer was never in the old list: a copy of the same file resumes, another tokenizer is refused."""
    copy = tmp_path / "copy" / "tokenizer.model"
    copy.parent.mkdir()
    shutil.copy(ws["tokenizer"], copy)
    trainer_for(ws, SAVED["lora"], tmp_path / "a", tokenizer=str(copy)).resume(saved_runs["lora"])
    from helpers_tokenizer import train_tiny_sentencepiece
    other = train_tiny_sentencepiece(tmp_path / "other", with_pad=True)
    trainer = trainer_for(ws, SAVED["lora"], tmp_path / "b", tokenizer=other)
    with pytest.raises(TrainError, match=r"checkpoint has tokenizer = '[0-9a-f]{16}' but this run has '[0-9a-f]{16}'"):
        trainer.resume(saved_runs["lora"])
