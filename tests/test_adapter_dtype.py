"""One dtype policy for trainable parameters: float32 unless asked otherwise, in apply_peft (the training run),
load_adapter and tools/generate.py. So the logits generate.py computes for a saved adapter are exactly those of
the run's own final evaluation, on the shipped tiny-llama, which is stored in float16."""

import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bad_input_helpers import tool_main  # noqa: E402

from minipeft import assets_dir  # noqa: E402
from minipeft.checkpoint import load_model  # noqa: E402
from minipeft.peft import AdapterConfig, LoRAConfig, PrefixConfig, apply_peft, load_adapter  # noqa: E402
from minipeft.peft.inference import load_model_with_adapter  # noqa: E402
from minipeft.train import TrainConfig, build_trainer, prepare_run  # noqa: E402

SHIPPED = assets_dir() / "tiny-llama"


def stored_dtype(folder: Path) -> str:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return str(f.get_slice(next(iter(f.keys()))).get_dtype())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A few steps of LoRA and of prefix tuning on the shipped model, as finetune.py runs them."""
    runs = {}
    for method in ("lora", "prefix"):
        cfg = TrainConfig(method=method, max_steps=3, progress=False, exact_match=False, device="cpu",
                          out=str(tmp_path_factory.mktemp(method) / "run"))
        cfg, ds_config, base, tokenizer, data = prepare_run(cfg)
        trainer = build_trainer(cfg, base, tokenizer, data, ds_config)
        trainer.train()
        trainer.evaluate(with_exact_match=False)          # the run's own final evaluation: eval mode
        runs[method] = (trainer, trainer.save_final())
    return runs


def tokens_of(trainer) -> torch.Tensor:
    return torch.tensor([trainer.data.val[0].input_ids[:40], trainer.data.val[1].input_ids[:40]])


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_generate_tool_logits_equal_the_runs_final_evaluation(trained, method):
    assert stored_dtype(SHIPPED) == "F16"
    trainer, folder = trained[method]
    tokens = tokens_of(trainer)
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(tokens)
        model = load_model_with_adapter(SHIPPED, folder, device="cpu")
        got = model(tokens)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert torch.equal(got, expected)
        # what the tool did before: the base in its stored float16, the adapter made in the base's dtype
        old = load_adapter(load_model(SHIPPED), folder, trainable_dtype=None)
        assert old.base.tok_embeddings.weight.dtype == torch.float16
        assert not torch.equal(old(tokens).float(), expected)


def test_generate_tool_prints_the_runs_greedy_text(trained, capsys):
    trainer, folder = trained["lora"]
    record = trainer.data.val_records[0]
    from minipeft.data import format_prompt
    from minipeft.generate import generate
    text = format_prompt(record.instruction)                     # the shipped tiny-llama's format: Alpaca
    with torch.no_grad():
        expected = generate(trainer.model, [trainer.tokenizer.encode(text, bos=True)], 6,
                            eos_id=trainer.tokenizer.eos_id, pad_id=trainer.tokenizer.pad_id)[0]
    assert tool_main("generate").main([str(SHIPPED), "--prompt", record.instruction, "--alpaca",
                                       "--adapter", str(folder), "--max-new-tokens", "6", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == text + trainer.tokenizer.decode(expected) + "\n"


@pytest.mark.parametrize("config", [LoRAConfig(), PrefixConfig(prefix_len=3, reparam_hidden=None),
                                    AdapterConfig(bottleneck=4)], ids=["lora", "prefix", "adapter"])
def test_method_parameters_are_float32_beside_a_half_base(config):
    model = apply_peft(load_model(SHIPPED), config, generator=torch.Generator().manual_seed(0))
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.float16} and trainable == {torch.float32}
    kept = apply_peft(load_model(SHIPPED), config, trainable_dtype=None)
    assert {p.dtype for p in kept.parameters()} == {torch.float16}


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_a_half_base_with_an_adapter_generates_under_autocast(trained, tmp_path, capsys, method):
    """--dtype bfloat16: the base in bf16, the adapter float32 beside it under autocast (as a bf16 run evaluates;
    a Houlsby adapter's float32 Linear could not take bf16 inputs without it)."""
    if method == "lora":
        folder = trained["lora"][1]
    else:
        from minipeft.peft import save_adapter
        folder = save_adapter(apply_peft(load_model(SHIPPED), AdapterConfig(bottleneck=4)), tmp_path / "adapter")
    assert tool_main("generate").main([str(SHIPPED), "--prompt", "hi", "--adapter", str(folder), "--dtype",
                                       "bfloat16", "--max-new-tokens", "3", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip()
