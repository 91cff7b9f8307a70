"""The defaults of a run are decided once (train.config.resolve_defaults, called by prepare_run): the shipped
tiny model and demo data when none is named, the method's config, RUN_DEFAULTS, and the learning rate from the
PEFT registry (tiny_base for the shipped model, real_base otherwise). tools/finetune.py only parses and calls;
its plugins are imported before its parser, and a method without a tuned rate asks for --lr in one line."""

import dataclasses
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_helpers import MAX_SEQ_LEN, make_workspace  # noqa: E402
from bad_input_helpers import tool_main  # noqa: E402
from helpers_plugin import MODULE_NAME as PLUGIN_MODULE, PLUGIN_FILE  # noqa: E402

from minipeft import assets_dir  # noqa: E402
from minipeft.checkpoint import load_model  # noqa: E402
from minipeft.peft import METHODS, get_method, unregister  # noqa: E402
from minipeft.train import (RUN_DEFAULTS, Trainer, TrainConfig, TrainError, is_resolved, load_run_data,  # noqa: E402
                            resolve_defaults)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = str(assets_dir() / "tiny-llama")

@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("ws"))


@pytest.fixture()
def plugin():
    """tests/plugins/output_scale_plugin.py: a method with no tuned learning rate; the tools import it here."""
    yield str(PLUGIN_FILE)
    unregister("output_scale")
    sys.modules.pop(PLUGIN_MODULE, None)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_shipped_model_demo_data_and_its_tuned_rate(method):
    cfg = resolve_defaults(TrainConfig(method=method))
    assert cfg.model == SHIPPED and cfg.train_data == str(assets_dir() / "demo_data" / "train.json")
    assert cfg.val_data == str(assets_dir() / "demo_data" / "heldout.json")
    assert cfg.lr == get_method(method).learning_rate("tiny_base")
    assert cfg.peft == get_method(method).config_class() and is_resolved(cfg)
    assert all(getattr(cfg, name) == value for name, value in RUN_DEFAULTS.items())
    assert resolve_defaults(cfg) == cfg                                      # resolving twice changes nothing


def test_a_named_base_takes_the_real_base_rate_and_given_values_stay(ws):
    cfg = resolve_defaults(TrainConfig(model=ws["model"], method="prefix", batch_size=2))
    assert cfg.lr == get_method("prefix").learning_rate("real_base") and cfg.batch_size == 2
    assert cfg.train_data.endswith("train.json") and cfg.model == ws["model"]
    assert resolve_defaults(TrainConfig(model=ws["model"], lr=0.5)).lr == 0.5
    with_data = resolve_defaults(TrainConfig(train_data=ws["train"]))
    assert with_data.val_data is None and with_data.model == SHIPPED          # a split of the given data


def test_the_trainer_takes_only_a_resolved_config(ws, tmp_path):
    cfg = TrainConfig(model=ws["model"], train_data=ws["train"], val_data=ws["val"], max_seq_len=MAX_SEQ_LEN,
                      device="cpu", out=str(tmp_path / "run"))
    resolved = resolve_defaults(cfg)
    from minipeft.tokenizer import Tokenizer
    tokenizer = Tokenizer(ws["tokenizer"])
    data = load_run_data(resolved, tokenizer)
    with pytest.raises(TrainError, match="Trainer takes a resolved TrainConfig"):
        Trainer(cfg, load_model(ws["model"]), tokenizer, data)
    assert Trainer(resolved, load_model(ws["model"]), tokenizer, data).cfg is resolved


def test_finetune_has_no_path_edits_and_documents_plugin():
    for tool in ("finetune", "generate"):
        assert "sys.path" not in (ROOT / "tools" / f"{tool}.py").read_text()
    from minipeft.train import build_arg_parser
    assert "--plugin" in build_arg_parser().format_help()


def test_a_plugin_method_without_a_rate_asks_for_lr_then_trains_and_generates(plugin, tmp_path, capsys):
    finetune = tool_main("finetune")
    run = tmp_path / "run"
    flags = ["--plugin", plugin, "--method", "output_scale", "--max-steps", "1", "--no-progress", "--no-exact-match",
             "--eval-batch-size", "32", "--device", "cpu", "--out", str(run)]
    assert finetune.main(flags) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == ["finetune.py: error: --lr: method 'output_scale' has no default learning rate for the shipped tiny "
                   "base; give --lr"]
    assert not run.exists()
    assert finetune.main(flags + ["--lr", "1e-2"]) == 0
    generate = tool_main("generate")
    assert generate.main([SHIPPED, "--prompt", "hi", "--max-new-tokens", "2", "--plugin", plugin,
                          "--adapter", str(run / "adapter")]) == 0


@pytest.mark.parametrize("tool", ["finetune", "generate"])
def test_a_broken_plugin_is_one_line_and_exit_2(tool, tmp_path, capsys):
    bad = tmp_path / "broken_plugin.py"
    bad.write_text("raise RuntimeError('no luck')\n")
    argv = ["--plugin", str(bad)] + ([SHIPPED, "--prompt", "x"] if tool == "generate" else [])
    assert tool_main(tool).main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"{tool}.py: error: --plugin {bad}: importing it failed")
    sys.modules.pop("minipeft_plugin_broken_plugin", None)


def test_every_field_default_is_a_train_config_default():
    """resolve_defaults changes only values that were not given (None), plus LoRA's family targets."""
    given = TrainConfig(model=SHIPPED, train_data=str(assets_dir() / "demo_data" / "train.json"), lr=1.0,
                        **{k: v for k, v in RUN_DEFAULTS.items()})
    resolved = resolve_defaults(given)
    changed = [f.name for f in dataclasses.fields(TrainConfig) if getattr(given, f.name) != getattr(resolved, f.name)]
    assert changed == ["peft"]
