"""Lesson 11 (QLoRA), try this: the NF4 block size (块大小) against bits per weight and what 4 bits cost the base.

Quantise every linear layer of the shipped tiny LLaMA's blocks to NF4 with block sizes 16, 64, 256 and 1024 (with
double quantisation, and 64 without), and to a plain 4-bit integer code (absmax, round(7 w / absmax) / 7: 15
evenly spaced levels) with block 64. For each, measure the bits per weight the stored tensors take, the relative
error ||W - W_hat|| / ||W|| over all block weights, and the loss of the quantised base on the pretraining text it
was validated on (val_text.txt, next-token loss), against the full-precision base.

    PYTHONPATH=. python lessons/11_beyond_the_note/qlora_try_block_size.py       # ~10 s on one core
Try BLOCK_SIZES = (8, 4096), or put the int4 code on block 16: does a finer scale rescue a uniform grid?
"""

import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # lessons/
from checks import check, check_equal, check_true  # noqa: E402
from tiny_training import TINY, load_tiny  # noqa: E402

from minipeft import memory
from minipeft.peft import apply_peft
from minipeft.peft.config import QLoRAConfig
from minipeft.quant import NF4Linear

BLOCK_SIZES = (16, 64, 256, 1024)
torch.set_num_threads(1)


@torch.no_grad()
def text_loss(model, ids, window=128) -> float:
    """Mean next-token cross-entropy over consecutive windows of the text."""
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor(ids[start:start + window + 1])[None]                     # (1, <= window + 1)
        logits = model(chunk[:, :-1]).float()
        total += nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    return total / count


def block_weights(model) -> dict:
    return {n: m.weight.detach() for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and not n.endswith("output")}


def int4_round_trip(w: torch.Tensor, block_size: int = 64) -> torch.Tensor:
    """Absmax int4: 15 evenly spaced levels k / 7, k = -7..7, times each block's absmax."""
    blocks = w.reshape(-1, block_size)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    return (torch.round(blocks / absmax * 7) / 7 * absmax).view(w.shape)


def relative_error(originals: dict, round_trips: dict) -> float:
    num = sum(((originals[n] - round_trips[n]) ** 2).sum() for n in originals)
    return (num / sum((w ** 2).sum() for w in originals.values())).sqrt().item()


base, tokenizer = load_tiny()
base.eval()
ids = tokenizer.encode((TINY / "val_text.txt").read_text(encoding="utf-8"), bos=True)
weights = block_weights(base)
n_weights = sum(w.numel() for w in weights.values())
full_loss = text_loss(base, ids)
print(f"tiny LLaMA: {n_weights:,} weights in the block linears; {len(ids):,} tokens of val_text.txt; "
      f"fp32 loss {full_loss:.4f}\n")

rows = {}
for block_size, double_quant in [(b, True) for b in BLOCK_SIZES] + [(64, False)]:
    model, _ = load_tiny()
    model = apply_peft(model.eval(), QLoRAConfig(block_size=block_size, double_quant=double_quant)).eval()
    layers = {n: m for n, m in model.base.named_modules() if isinstance(m, NF4Linear)}
    bits = 8 * sum(m.quantized_bytes() for m in layers.values()) / n_weights
    round_trips = {n: layers[n].dequantized_weight(torch.float32) for n in weights}
    rows[(block_size, double_quant)] = (bits, relative_error(weights, round_trips), text_loss(model, ids))
    print(f"NF4 block {block_size:4d}{' + double quant' if double_quant else ' (fp32 absmax)  '}: "
          f"{bits:.3f} bits/weight, relative error {rows[(block_size, double_quant)][1]:.4f}, "
          f"text loss {rows[(block_size, double_quant)][2]:.4f}")
    closed = sum(memory.nf4_tensor_bytes(w.numel(), block_size, double_quant) for w in weights.values())
    check_equal("  stored bytes == memory.nf4_tensor_bytes summed over the layers",
                sum(m.quantized_bytes() for m in layers.values()), closed)

model, _ = load_tiny()
model.eval()
with torch.no_grad():
    for name, module in model.named_modules():
        if name in weights:
            module.weight.copy_(int4_round_trip(module.weight))
int4 = (4 + 32 / 64, relative_error(weights, block_weights(model)), text_loss(model, ids))
print(f"int4 block   64 (fp32 absmax)  : {int4[0]:.3f} bits/weight, relative error {int4[1]:.4f}, "
      f"text loss {int4[2]:.4f}\n")

print("the table of lessons/11_beyond_the_note/qlora.md (bits / weight, relative error, text loss):")
check("fp32 base, text loss", full_loss, 4.6620, 1e-3)
EXPECTED = {(16, True): (4.508, 0.0809, 4.6637), (64, True): (4.128, 0.0921, 4.6669), (256, True): (4.033, 0.0992, 4.6728),
            (1024, True): (4.009, 0.1058, 4.6626), (64, False): (4.500, 0.0921, 4.6668)}
for (block_size, double_quant), expected in EXPECTED.items():
    check(f"NF4 block {block_size}{' + double quant' if double_quant else ', fp32 absmax'}", rows[(block_size, double_quant)],
          expected, 1e-3)
check("int4 block 64, fp32 absmax", int4, (4.5, 0.1076, 4.6896), 1e-3)
check("block 64 + double quant: the paper's 4.127 bits (+ padding and a mean per tensor)", rows[(64, True)][0], 4.127,
      2e-3)
errors = [rows[(b, True)][1] for b in BLOCK_SIZES]
bits = [rows[(b, True)][0] for b in BLOCK_SIZES]
check_true("larger blocks: fewer bits", bits, "decreasing", all(a > b for a, b in zip(bits, bits[1:])))
check_true("larger blocks: larger error", errors, "increasing", all(a < b for a, b in zip(errors, errors[1:])))
check_true("double quantisation changes the error by less than 1 %", rows[(64, True)][1] / rows[(64, False)][1],
           "within 1 % of 1", abs(rows[(64, True)][1] / rows[(64, False)][1] - 1) < 0.01)
check_true("NF4 beats int4 at the same block: error", rows[(64, False)][1], f"< int4's {int4[1]:.4f}",
           rows[(64, False)][1] < int4[1])
check_true("... and text loss", rows[(64, False)][2], f"< int4's {int4[2]:.4f}", rows[(64, False)][2] < int4[2])
print("all checks passed")
