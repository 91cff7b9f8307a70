"""A seventh method, registered by a file outside the package (tests/plugins/output_scale_plugin.py, imported here
as the tools import a plugin; no package file edited): in-process, it trains, saves, reloads and resumes through
the normal Trainer, and its flags reach the command line. (tests/test_plugins.py drives the tools with it.)

The toy method, "output_scale": every attention.wo output is multiplied by a trainable per-feature scale s
(init 1, so the model starts as the base): y = s * (W x).
"""

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers_plugin import output_scale_registered  # noqa: E402
from train_helpers import MAX_SEQ_LEN, make_workspace  # noqa: E402

from minipeft.checkpoint import load_model  # noqa: E402
from minipeft.peft import load_adapter  # noqa: E402
from minipeft.train import (TrainConfig, TrainError, build_arg_parser, build_trainer, config_from_args,  # noqa: E402
                            evaluate_loss, prepare_run)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("ws"))


@pytest.fixture()
def registered():
    with output_scale_registered() as plugin:
        yield plugin


def make_cfg(ws, out, **overrides):
    values = dict(model=ws["model"], train_data=ws["train"], val_data=ws["val"], max_seq_len=MAX_SEQ_LEN,
                  peft=None, method="output_scale", lr=1e-1, batch_size=4, max_steps=6, warmup_steps=1, seed=0,
                  device="cpu", out=str(out), progress=False, exact_match=False, eval_batch_size=8)
    values.update(overrides)
    return TrainConfig(**values)


def build(cfg):
    cfg, ds_config, base, tokenizer, data = prepare_run(cfg)
    return build_trainer(cfg, base, tokenizer, data, ds_config)


def test_toy_method_trains_saves_reloads(registered, ws, tmp_path):
    trainer = build(make_cfg(ws, tmp_path / "run"))
    names = [n for n, _ in trainer.trainable]
    assert names == [f"base.layers.{i}.attention.wo.scale" for i in range(2)]
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    before = trainer.evaluate()["val_loss"]
    losses = [h["loss"] for h in trainer.train()]
    after = trainer.evaluate()["val_loss"]
    assert after < before - 0.05, (before, after, losses)
    assert all(torch.equal(p, frozen[n]) for n, p in trainer.model.named_parameters() if n in frozen)
    folder = trainer.save_final()
    reloaded = load_adapter(load_model(ws["model"]), folder, method="output_scale")
    assert torch.equal(reloaded.base.layers[1].attention.wo.scale, trainer.model.base.layers[1].attention.wo.scale)
    loss = evaluate_loss(reloaded, trainer.data.val, batch_size=8, pad_id=trainer.pad_id, device="cpu")
    assert loss == pytest.approx(after, abs=1e-6)


def test_toy_method_resumes_bit_identically_and_refuses_a_changed_setting(registered, ws, tmp_path):
    whole = build(make_cfg(ws, tmp_path / "a", save_every=3))
    history = whole.train()
    resumed = build(make_cfg(ws, tmp_path / "b"))
    resumed.resume(tmp_path / "a" / "checkpoints" / "step-000003.pt")
    assert [h["loss"] for h in resumed.train()] == [h["loss"] for h in history[3:]]
    assert all(torch.equal(p, q) for (_, p), (_, q) in zip(whole.trainable, resumed.trainable))
    other = build(make_cfg(ws, tmp_path / "c", peft=registered.OutputScaleConfig(init=2.0), method=None))
    with pytest.raises(TrainError, match="peft.init"):
        other.resume(tmp_path / "a")


def test_toy_method_flags_reach_the_command_line(registered):
    parser = build_arg_parser()
    assert "--scale-init" in parser.format_help()
    cfg = config_from_args(parser.parse_args(["--method", "output_scale", "--scale-init", "0.5", "--lr", "1e-2"]))
    assert cfg.peft == registered.OutputScaleConfig(init=0.5) and cfg.method == "output_scale"
    with pytest.raises(TrainError, match="--scale-init must be > 0"):
        config_from_args(parser.parse_args(["--method", "output_scale", "--scale-init", "-1"]))
    assert dataclasses.asdict(cfg)["peft"] == {"init": 0.5}
