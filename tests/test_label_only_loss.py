"""label_only_loss (the output layer and softmax only where labels count, chunked, gradients computed in the
forward) against independent computations: a float64 log-softmax over the full logits of the plain forward,
for every method, with right padding + attention mask, gradient checkpointing and bf16/fp16 autocast; the
gradients too; and the tensors a step keeps for backward grow with the label tokens, not with T x V."""

from __future__ import annotations

import weakref

import pytest
import torch

from minipeft.config import ModelConfig
from minipeft.loss import IGNORE_INDEX, causal_lm_loss, label_only_loss
from minipeft.model import Transformer
from minipeft.peft import (AdapterConfig, FullConfig, LlamaAdapterConfig, LoRAConfig, PrefixConfig, PromptConfig,
                           apply_peft)
from minipeft.train import batch_loss

METHODS = {
    "base": None,
    "full": FullConfig(),
    "lora": LoRAConfig(rank=4, alpha=8, targets=("wq", "wv", "output")),   # LoRA on the head itself too
    "prompt": PromptConfig(prompt_len=3, init="random"),
    "prefix": PrefixConfig(prefix_len=3, reparam_hidden=16),
    "adapter": AdapterConfig(bottleneck=8),
    "llama_adapter": LlamaAdapterConfig(prompt_len=4, adapter_layers=1),
}
CFG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=211, multiple_of=16, max_seq_len=64)
CHUNK = 211 * 5                       # 5 rows per chunk: several chunks even in these small batches


def model_for(method, dtype=torch.float64):
    torch.manual_seed(0)
    base = Transformer(CFG)
    base.init_weights(std=0.1)
    model = base if METHODS[method] is None else apply_peft(base, METHODS[method],
                                                             generator=torch.Generator().manual_seed(1))
    model = model.to(dtype).train()
    with torch.no_grad():                              # trained-looking method parameters (B != 0, gates open)
        g = torch.Generator().manual_seed(2)
        for name, p in model.named_parameters():
            if p.requires_grad and METHODS[method] is not None and method != "full":
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def batch():
    """3 rows of 14, right padded (row 1 has 9 real tokens), a prompt labelled -100, padding -100."""
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(1, CFG.vocab_size, (3, 14), generator=g)
    mask = torch.ones_like(tokens)
    mask[1, 9:] = 0
    tokens[1, 9:] = 0
    labels = tokens.clone()
    labels[:, :5] = IGNORE_INDEX
    labels[mask == 0] = IGNORE_INDEX
    return tokens, labels, mask


def reference_f64(model, tokens, labels, mask):
    """Mean over counted positions of -log softmax(logits)[next label], all in float64, full logits."""
    logits = model(tokens, attention_mask=mask).double()                               # (B, T, V)
    logp = logits[:, :-1].log_softmax(-1)
    targets = labels[:, 1:]
    counted = targets != IGNORE_INDEX
    return -logp[counted].gather(-1, targets[counted][:, None]).mean()


def grads(loss, model):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


def assert_close(ours, reference, rel):
    scale = reference.abs().max().item() + 1e-12
    err = (ours.double() - reference.double()).abs().max().item()
    assert err <= rel * scale, f"|diff| {err:.3g} > {rel} * {scale:.3g}"


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("method", list(METHODS))
def test_equals_float64_full_logits_loss_and_gradients(method, checkpointing):
    model = model_for(method)
    model.gradient_checkpointing = checkpointing
    tokens, labels, mask = batch()
    expected = reference_f64(model, tokens, labels, mask)
    expected_grads = grads(expected, model)
    loss = label_only_loss(model, tokens, labels, attention_mask=mask, chunk_elements=CHUNK)
    assert_close(loss, expected, 1e-6)                 # the CE is float32 by design; the model is float64
    for ours, ref in zip(grads(loss, model), expected_grads):
        assert_close(ours, ref, 1e-5)
    summed = label_only_loss(model, tokens, labels, attention_mask=mask, reduction="sum")
    assert_close(summed, expected * int((labels[:, 1:] != IGNORE_INDEX).sum()), 1e-6)


@pytest.mark.parametrize("method", ["base", "lora", "prompt", "prefix"])
def test_trainer_and_peft_paths_use_it(method):
    model = model_for(method)
    tokens, labels, mask = batch()
    expected = reference_f64(model, tokens, labels, None)                          # batch_loss passes no mask
    assert_close(batch_loss(model, {"input_ids": tokens, "labels": labels}), expected, 1e-6)
    if method != "base":
        assert_close(model.loss(tokens, labels, attention_mask=mask), reference_f64(model, tokens, labels, mask), 1e-6)
    with torch.no_grad():                                                          # evaluation: no gradients
        assert_close(batch_loss(model, {"input_ids": tokens, "labels": labels}, reduction="sum"),
                     expected * int((labels[:, 1:] != IGNORE_INDEX).sum()), 1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("method", ["full", "lora", "prompt"])
def test_autocast_equals_full_logits_path(method, dtype):
    """Under autocast the output layer runs in half precision either way; the two paths agree to the
    half-precision rounding of a matmul over fewer rows, and both approximate the float64 loss."""
    model = model_for(method, torch.float32)
    tokens, labels, mask = batch()
    with torch.autocast("cpu", dtype=dtype):
        plain = causal_lm_loss(model(tokens, attention_mask=mask), labels)
        plain_grads = grads(plain, model)
        ours = label_only_loss(model, tokens, labels, attention_mask=mask, chunk_elements=CHUNK)
        our_grads = grads(ours, model)
    assert_close(ours, plain, 2e-3)
    for a, b in zip(our_grads, plain_grads):
        assert_close(a, b, 3e-2)
    assert_close(ours, reference_f64(model.double(), tokens, labels, mask), 2e-2)


def saved_bytes(run) -> int:
    """Bytes of the tensors autograd still keeps for backward once `run()` returns (parameters excluded)."""
    class Held:
        def __init__(self, tensor):
            self.tensor = tensor
    held = []

    def pack(tensor):
        box = Held(tensor)
        held.append(weakref.ref(box))
        return box
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.tensor):
        out = run()
    storages = {}
    for ref in held:
        box = ref()
        if box is not None and not isinstance(box.tensor, torch.nn.Parameter):
            storage = box.tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    del out
    return sum(storages.values())


def test_saved_activations_grow_with_label_tokens_not_with_T_times_V():
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=4000, multiple_of=16, max_seq_len=64)
    torch.manual_seed(0)
    model = apply_peft(Transformer(cfg), LoRAConfig(rank=4, alpha=8, targets=("wq", "wv"))).train()
    tokens = torch.randint(0, cfg.vocab_size, (2, 64))
    body = saved_bytes(lambda: model(tokens, return_hidden=True))
    per_row_logits = cfg.vocab_size * 4

    def with_labels(n):
        labels = torch.full_like(tokens, IGNORE_INDEX)
        labels[:, 64 - n // 2:] = tokens[:, 64 - n // 2:]                            # n counted positions
        return saved_bytes(lambda: label_only_loss(model, tokens, labels, chunk_elements=per_row_logits * 16))
    few, many, every = with_labels(8), with_labels(64), with_labels(128)
    assert few < many < every
    assert every - body <= 128 * (cfg.dim * 4 + 64) + 4096          # about one float32 row of h per label
    plain = saved_bytes(lambda: causal_lm_loss(model(tokens), tokens))
    assert plain - body >= 2 * 63 * per_row_logits                   # the full-logits path keeps (B, T-1, V)
