"""QLoRA (minipeft/peft/qlora.py, minipeft/quant/nf4_linear.py) on a tiny decoder, against float64 references.

- NF4Linear: output and input gradient equal x W_hat^T + b and dL/dy W_hat in float64 (W_hat the NF4 round trip);
  autograd saves nothing for it (a plain F.linear would save the full weight);
- apply_peft(QLoRAConfig): every linear layer of the blocks is 4-bit, the embedding and the output layer are not;
  the logits and the LoRA gradients equal plain LoRA on a float64 copy of the base whose weights are the
  dequantised ones; the report and the stored bytes equal memory.py's closed forms;
- training: the loss goes down, the 4-bit buffers stay bit-identical, the adapter folder holds only A and B, and
  loading it re-quantises the base to the same bytes and gives the same logits;
- the tools: finetune.py --method qlora trains and writes the adapter, generate.py loads it, compare_methods.py
  runs --methods qlora with LoRA's closed-form count; bad flags give one line naming the flag;
- the 7B closed form against a hand count.
"""

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from train_helpers import MAX_SEQ_LEN, make_workspace  # noqa: E402

from minipeft import ModelConfig, Transformer, memory  # noqa: E402
from minipeft.peft import LoRAConfig, PeftConfigError, apply_peft, load_adapter, merge_lora, save_adapter  # noqa: E402
from minipeft.peft.config import QLoRAConfig  # noqa: E402
from minipeft.peft.qlora import QLoRALinear  # noqa: E402
from minipeft.quant import NF4Linear, dequantize_nf4, quantize_nf4  # noqa: E402

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32, max_seq_len=64)
BLOCK_LINEARS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def round_trip(weight, block_size=64, double_quant=True):
    return dequantize_nf4(quantize_nf4(weight, block_size, double_quant), weight.shape, block_size)


def test_nf4_linear_forward_backward_and_nothing_saved():
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(40, 48, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 40, generator=g) * 0.1)
    layer = NF4Linear(linear, block_size=32)
    x = torch.randn(3, 5, 40, generator=g, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = layer(x)
    assert sum(saved) == 0                                  # F.linear(x, W_hat) would keep W_hat: 1,920 numbers
    w_hat = round_trip(linear.weight, 32).double()
    expected = x.detach().double() @ w_hat.T + linear.bias.detach().double()
    assert torch.allclose(y.double(), expected, atol=1e-5, rtol=0)
    grad_y = torch.randn(3, 5, 48, generator=g)
    y.backward(grad_y)
    assert torch.allclose(x.grad.double(), grad_y.double() @ w_hat, atol=1e-5, rtol=0)
    assert layer.quantized_bytes() == memory.nf4_tensor_bytes(48 * 40, 32)


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    model = Transformer(CFG)
    model.init_weights(std=0.2)
    return model


def dequantised_copy(model, dtype=torch.float64):
    """The base with every block linear's weight replaced by its NF4 round trip (the reference QLoRA should equal)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in ref.named_modules():
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in BLOCK_LINEARS:
                m.weight.copy_(round_trip(m.weight))
    return ref.to(dtype)


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, CFG.vocab_size, (2, 12), generator=g)
    labels = tokens.clone()
    labels[:, :4] = -100
    return tokens, labels


def test_qlora_is_lora_on_the_dequantised_base(base):
    config = QLoRAConfig(rank=4, alpha=8, targets=("wq", "wv", "w2"))
    torch.manual_seed(5)
    model = apply_peft(copy.deepcopy(base), config)
    kinds = {name: type(m) for name, m in model.base.named_modules() if name.rsplit(".", 1)[-1] in BLOCK_LINEARS}
    assert all(kind is (QLoRALinear if name.rsplit(".", 1)[-1] in config.targets else NF4Linear)
               for name, kind in kinds.items()) and len(kinds) == 7 * CFG.n_layers
    assert type(model.base.output) is nn.Linear and model.base.tok_embeddings.weight.dtype == torch.float32

    trainable = memory.lora_trainable(CFG, 4, config.targets)
    assert model.report.trainable == trainable
    assert model.report.total == memory.parameter_count(CFG)["total"] + trainable
    stored = sum(m.quantized_bytes() for m in model.base.modules() if isinstance(m, NF4Linear))
    closed = memory.qlora_base_bytes(CFG, other_bytes=4)
    assert stored == closed["quantized"]
    others = sum(p.numel() * 4 for n, p in model.base.named_parameters() if "lora_" not in n)
    assert others == closed["other"]

    with torch.no_grad():                                 # B != 0, so the LoRA branch counts
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    reference = apply_peft(dequantised_copy(base), LoRAConfig(rank=4, alpha=8, targets=config.targets))
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_" in name:
                p.copy_(dict(model.named_parameters())[name].double())
    tokens, labels = batch()
    assert torch.allclose(model(tokens).double(), reference(tokens), atol=2e-5, rtol=0)
    model.loss(tokens, labels).backward()
    reference.loss(tokens, labels).backward()
    ours, theirs = dict(model.named_parameters()), dict(reference.named_parameters())
    for name in ours:
        if "lora_" in name:
            assert torch.allclose(ours[name].grad.double(), theirs[name].grad, atol=1e-5, rtol=1e-4), name


def test_training_keeps_the_4bit_base_and_the_adapter_reloads_bit_identically(base, tmp_path):
    model = apply_peft(copy.deepcopy(base), QLoRAConfig(rank=4, alpha=8, block_size=32))
    buffers_before = {k: v.clone() for k, v in model.named_buffers() if "layers." in k}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens, labels = batch(2)
    losses = []
    for _ in range(8):
        loss = model.loss(tokens, labels)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < losses[0] - 0.1, losses
    after = dict(model.named_buffers())
    assert buffers_before and all(torch.equal(v, after[k]) for k, v in buffers_before.items())

    folder = save_adapter(model, tmp_path / "adapter")
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved["method"] == "qlora" and saved["config"]["block_size"] == 32
    from safetensors.torch import load_file
    assert all(k.endswith(("lora_A", "lora_B")) for k in load_file(str(folder / "adapter.safetensors")))
    loaded = load_adapter(copy.deepcopy(base), folder, method="qlora")
    reloaded = dict(loaded.named_buffers())
    assert all(torch.equal(v, reloaded[k]) for k, v in buffers_before.items())
    assert torch.equal(loaded(tokens), model(tokens))
    with pytest.raises(PeftConfigError, match="needs a method that folds into the weights"):
        merge_lora(loaded)
    with pytest.raises(PeftConfigError, match="larger than min"):
        apply_peft(copy.deepcopy(base), QLoRAConfig(rank=65))


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("qlora_ws"))


def test_finetune_generate_and_compare_take_qlora(ws, tmp_path, capsys):
    import finetune
    import generate
    from minipeft import compare
    common = ["--model", ws["model"], "--train-data", ws["train"], "--val-data", ws["val"], "--max-seq-len",
              str(MAX_SEQ_LEN), "--method", "qlora", "--batch-size", "4", "--warmup-steps", "1", "--device", "cpu",
              "--no-progress", "--no-exact-match", "--samples", "0"]
    run = tmp_path / "run"
    assert finetune.main(common + ["--max-steps", "8", "--lr", "0.02", "--out", str(run)]) == 0
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3, evals
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["method"] == "qlora"

    assert generate.main([ws["model"], "--adapter", str(run / "adapter"), "--prompt", "say cat then dog", "--alpaca",
                          "--max-new-tokens", "3", "--device", "cpu"]) == 0
    assert "### Response:" in capsys.readouterr().out

    assert finetune.main(common + ["--max-steps", "1", "--qlora-block-size", "5", "--out", str(tmp_path / "x")]) == 2
    assert "--qlora-block-size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        finetune.main(common + ["--qlora-double-quant", "maybe", "--out", str(tmp_path / "y")])
    assert "--qlora-double-quant: expected on or off, got 'maybe'" in capsys.readouterr().err

    out = tmp_path / "cmp"
    assert compare.main(["--base", ws["model"], "--data", ws["train"], "--val-data", ws["val"], "--max-seq-len",
                         str(MAX_SEQ_LEN), "--max-train-examples", "8", "--epochs", "1", "--batch-size", "4",
                         "--evals-per-epoch", "1", "--threads", "1", "--device", "cpu", "--no-exact-match", "--no-plot",
                         "--methods", "qlora", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())["results"]["qlora"]
    from minipeft.checkpoint import load_model
    assert result["trainable"] == memory.lora_trainable(load_model(ws["model"]).config, 8, ("wq", "wv"))
    assert "QLoRA" in (out / "results.md").read_text()


def test_the_7b_closed_form_by_hand():
    cfg = ModelConfig.from_name("llama-7b")
    d, f, L = 4096, 11008, 32

    def nf4_bytes(n):                       # codes n/2, an int8 per 64, a float32 per 256 blocks, a mean
        blocks = n // 64
        return n // 2 + blocks + 4 * (blocks // 256) + 4
    quantized = L * (4 * nf4_bytes(d * d) + 3 * nf4_bytes(d * f))
    parts = memory.qlora_base_bytes(cfg)
    assert parts["quantized"] == quantized == 3_340_772_224
    assert parts["quantized_params"] == L * (4 * d * d + 3 * d * f)
    assert parts["other"] == 2 * (2 * 32000 * d + (2 * L + 1) * d)                 # bf16 embedding, output, norms
    bf16 = 2 * memory.parameter_count(cfg)["total"]
    assert parts["total"] / bf16 < 0.29                                            # 3.87 GB against 13.48 GB
    states = memory.qlora_training_bytes(cfg, 8, ("wq", "wv"))
    assert states["lora"] == 16 * 4_194_304 and states["total"] == parts["total"] + 16 * 4_194_304
