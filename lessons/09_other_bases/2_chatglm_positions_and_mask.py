"""Lesson 09 (ChatGLM part): ChatGLM-6B's 2D positions (二维位置编码), its prefix-LM mask (前缀语言模型掩码), the GLM
residual scaling, and where prompt / prefix tuning may put their virtual tokens.

Run from the repository root:
    PYTHONPATH=. python lessons/09_other_bases/2_chatglm_positions_and_mask.py

Every library result (minipeft.chatglm) is compared with a computation written here.
"""

import copy
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from minipeft.chatglm import GLM_ALPHA, ChatGLM, glm_position_ids, glm_rope_cos_sin
from minipeft.checkpoint.hf_chatglm import rotate_half_to_pairs
from minipeft.config import ModelConfig
from minipeft.peft import PrefixConfig, PromptConfig, apply_peft

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # lessons/, for checks.py
from checks import check, check_equal  # noqa: E402

torch.manual_seed(0)
MASK, GMASK, SOP = 90, 91, 92
cfg = ModelConfig(family="chatglm", dim=64, n_layers=2, n_heads=4, vocab_size=100, ffn_hidden_dim=128,
                  norm_eps=1e-5, mask_id=MASK, gmask_id=GMASK, sop_id=SOP)
model = ChatGLM(cfg).double().eval()
with torch.no_grad():
    for p in model.parameters():
        p.add_(0.3 * torch.randn_like(p))                            # biases and norms away from 0 and 1 too
tokens = torch.tensor([[5, 17, 42, 8, GMASK, SOP, 33, 9]])           # context (5 tokens, [gMASK] last), <sop>, reply

# ------------------------------------------------------------------------------------------------
print("1. Position ids: the context counts 0..4; from <sop> on every token sits at [gMASK]'s position 4;")
print("   block ids are 0 over the context and 1, 2, 3 from <sop> (the reply is 'inside' the [gMASK] span)")
pos = glm_position_ids(tokens, cfg)
check_equal("positions", pos[0, 0].tolist(), [0, 1, 2, 3, 4, 4, 4, 4])
check_equal("block ids", pos[0, 1].tolist(), [0, 0, 0, 0, 0, 1, 2, 3])

# ------------------------------------------------------------------------------------------------
print("2. The prefix-LM mask: causal, except that every query sees the whole context (block id 0)")
mask = model.build_mask(pos[:, 1], 0, None)[0, 0]
by_hand = torch.tensor([[k <= q or k < 5 for k in range(8)] for q in range(8)])
check_equal("mask == (k <= q) or (k in context)", torch.equal(mask, by_hand), True)
with torch.no_grad():
    base = model(tokens)
    later_context = model(tokens.index_put((torch.tensor([0]), torch.tensor([3])), torch.tensor(60)))
    later_reply = model(tokens.index_put((torch.tensor([0]), torch.tensor([7])), torch.tensor(60)))
changed = (later_context[0, 0] - base[0, 0]).abs().max().item()
print(f"   changing context token 3 moves the logits at token 0 by {changed:.2f} (bidirectional context)")
assert changed > 1e-3
check("changing reply token 7 leaves tokens 0..6 alone (causal reply)", later_reply[0, :7], base[0, :7], 1e-12)

# ------------------------------------------------------------------------------------------------
print("3. 2D rotary: half of each head turns by the position, half by the block id. The original writes")
print("   each half in rotate-half form (pairs i, i + hd/4); conversion permutes rows to adjacent pairs")
hd, H = cfg.head_dim, cfg.n_heads
x = torch.randn(hd // 2, dtype=torch.float64)                       # one half of a query head, original layout
theta = torch.rand(hd // 4, dtype=torch.float64) * 3
x1, x2 = x[: hd // 4], x[hd // 4:]
original = torch.cat([x1 * theta.cos() - x2 * theta.sin(), x2 * theta.cos() + x1 * theta.sin()])
qkv_rows = torch.zeros(3 * H * hd, dtype=torch.float64)
qkv_rows[: hd // 2] = x                                             # head 0, q, first half
ours_in = rotate_half_to_pairs(qkv_rows[:, None], H)[: hd // 2, 0]
pairs = ours_in.view(-1, 2)
ours = torch.stack([pairs[:, 0] * theta.cos() - pairs[:, 1] * theta.sin(),
                    pairs[:, 1] * theta.cos() + pairs[:, 0] * theta.sin()], dim=-1).flatten()
check("rotate-half(x) permuted == adjacent-pair rotation of permuted x",
      rotate_half_to_pairs(torch.cat([original, torch.zeros(3 * H * hd - hd // 2, dtype=torch.float64)])[:, None], H)[: hd // 2, 0],
      ours, 1e-12)
shifted = pos.clone()
shifted[:, 0] += 7                                                  # every position + 7, block ids kept
with torch.no_grad():
    check("adding 7 to every position changes nothing (rotary is relative)", model(tokens, position_ids=shifted),
          base, 1e-9)
    moved_blocks = pos.clone()
    moved_blocks[:, 1] += 3                                         # block ids + 3: the context is no longer block 0
    moved = model(tokens, position_ids=moved_blocks)
print(f"   adding 3 to every block id moves the logits by {(moved - base).abs().max().item():.2f}: block 0 *is* the "
      f"context (the mask reads it), so block ids cannot be shifted like positions")
assert (moved - base).abs().max().item() > 1e-3

# ------------------------------------------------------------------------------------------------
print("4. GLM residuals scale the *normed* input: h' = alpha LN1(h) + Attn(LN1(h)), out = alpha LN2(h') + MLP(LN2(h'))")
print(f"   alpha = sqrt(2 * 28) = {GLM_ALPHA:.4f} for every depth: the original's GLMBlock keeps num_layers at its")
print("   default 28 (this model has 2 layers; the paper's sqrt(2 L) would give 2.0)")
check("alpha", GLM_ALPHA, math.sqrt(56), 0.0)
block, h = model.layers[0], torch.randn(1, 8, cfg.dim, dtype=torch.float64)
rotation = glm_rope_cos_sin(pos, hd, torch.float64)   # (cos, sin)
with torch.no_grad():
    got, _ = block(h, rotation, mask[None, None])
    x_in = F.layer_norm(h, (cfg.dim,), block.attention_norm.weight, block.attention_norm.bias, 1e-5)
    h_mid = math.sqrt(56) * x_in + block.attention(x_in, rotation, mask[None, None])[0]
    x_mid = F.layer_norm(h_mid, (cfg.dim,), block.ffn_norm.weight, block.ffn_norm.bias, 1e-5)
    want = math.sqrt(56) * x_mid + block.feed_forward(x_mid)
check("block(h) == the two GLM residual lines", got, want, 1e-12)

# ------------------------------------------------------------------------------------------------
print("5. Where virtual tokens may sit. Prefix (P-tuning v2, as the original's pre_seq_len): P keys/values in the")
print("   cache, seen by every token, not rotated; the real tokens keep positions 0..n-1 and block ids (no shift)")
P = 3
mask_with_prefix = model.build_mask(pos[:, 1], P, None)[0, 0]
check_equal("every real token sees all P prefix slots", bool(mask_with_prefix[:, :P].all()), True)
check_equal("and the prefix-LM pattern over the real tokens is unchanged", torch.equal(mask_with_prefix[:, P:], by_hand), True)
print("   Prompt tuning puts P virtual *tokens* in front of the context: they are context (block 0, positions 0..P-1),")
print("   the real tokens shift by P (so [gMASK]'s position, taken by the reply, shifts with them), block ids stay.")
prompt_pos = torch.cat([torch.stack([torch.arange(P), torch.zeros(P, dtype=torch.long)])[None], pos + torch.tensor([[P], [0]])], 2)
check_equal("prompt-tuning positions", prompt_pos[0, 0].tolist(), [0, 1, 2, 3, 4, 5, 6, 7, 7, 7, 7])
check_equal("prompt-tuning block ids", prompt_pos[0, 1].tolist(), [0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3])
print("   These are the model's own rules (ChatGLM.front_position_ids / shift_position_ids, with")
print("   cache_prefix_shifts_positions = False), which PeftModel reads: no `if family ==` in the PEFT code.")
rule_pos = torch.cat([ChatGLM.front_position_ids(1, P, pos.device), ChatGLM.shift_position_ids(pos, P)], 2)
check_equal("ChatGLM's rule gives the prompt-tuning positions above", torch.equal(rule_pos, prompt_pos), True)
virtual = torch.tensor([[20, 21, 22]])                               # a soft prompt equal to these tokens' embeddings
prompted = apply_peft(copy.deepcopy(model), PromptConfig(prompt_len=P, init="random"))
prefixed = apply_peft(copy.deepcopy(model), PrefixConfig(prefix_len=P, reparam_hidden=None))
with torch.no_grad():
    prompted.soft_prompt.weight.copy_(model.tok_embeddings.weight[virtual[0]])
    check("prompt tuning == the base reading the virtual tokens as context in front", prompted(tokens),
          model(torch.cat([virtual, tokens], 1))[:, P:], 1e-12)
    check("prefix tuning == the base with the prefix as past keys, positions unshifted", prefixed(tokens),
          model(tokens, past_key_values=prefixed.prefix(1), position_ids=pos), 1e-12)
print("all checks passed")
