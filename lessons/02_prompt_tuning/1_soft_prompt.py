"""Lesson 02: prompt tuning (提示微调). A hard prompt (硬提示) is text; a soft prompt (软提示) is P free
vectors in embedding space, prepended to the input embeddings and trained while the model stays frozen.

Run from the repository root:
    PYTHONPATH=. python lessons/02_prompt_tuning/1_soft_prompt.py

Library: minipeft.peft.SoftPrompt, apply_peft(model, PromptConfig(prompt_len, init, init_text)).
"""

import copy

import torch

from minipeft.config import ModelConfig
from minipeft.model import Transformer
from minipeft.peft import PromptConfig, SoftPrompt, apply_peft
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # lessons/, for checks.py
from checks import check, check_equal  # noqa: E402


class LetterTokenizer:
    """A stand-in tokenizer for this lesson: one id per lowercase letter (a = 1, ..., z = 26)."""

    def encode(self, text, bos=True, eos=False):
        return [ord(c) - ord("a") + 1 for c in text if c.isalpha()]


torch.manual_seed(0)
cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16)
base = Transformer(cfg).eval()
base.init_weights(std=0.3)
frozen_copy = copy.deepcopy(base)                                   # to prove the base never changes
tokens = torch.randint(0, cfg.vocab_size, (2, 5))                   # (B=2, n=5) the real input
E = base.tok_embeddings.weight.detach()                             # (V, d) embedding table

# ------------------------------------------------------------------------------------------------
print("1. A hard prompt is token ids; its embeddings are rows of E. A soft prompt initialised from the")
print("   same text is the same P x d matrix, so both give the same outputs (before any training)")
text = "solve"
hard_ids = torch.tensor(LetterTokenizer().encode(text, bos=False))  # (P,) = s o l v e -> 19 15 12 22 5
P = len(hard_ids)
model = apply_peft(copy.deepcopy(base), PromptConfig(prompt_len=P, init="text", init_text=text),
                   tokenizer=LetterTokenizer())
check("init='text': prompt == E[ids of the text]", model.soft_prompt.weight, E[hard_ids], 0)
with_hard_prompt = frozen_copy(torch.cat([hard_ids.expand(2, P), tokens], dim=1))     # (2, P+n, V)
check("soft prompt model(tokens) == base([text ids ; tokens]) at the n real positions",
      model(tokens), with_hard_prompt[:, P:], 1e-5)

# ------------------------------------------------------------------------------------------------
print("2. Shapes: the P x d prompt goes in front of the n x d input embeddings: n -> n + P")
prompt = SoftPrompt(P, cfg.dim, torch.randn(P, cfg.dim))
embeds = base.tok_embeddings(tokens)                                # (2, n, d)
labels = tokens.clone()
mask = torch.ones_like(tokens)
joined, joined_labels, joined_mask = prompt.prepend(embeds, labels, mask)
check_equal("embeds (B, n, d) -> (B, n + P, d)", tuple(joined.shape), (2, 5 + P, cfg.dim))
check("the first P rows of every example are the prompt", joined[:, :P], prompt.weight.expand(2, P, cfg.dim), 0)
check("then the real embeddings, unchanged", joined[:, P:], embeds, 0)
check("labels get -100 (no loss) at the P prompt positions", joined_labels[:, :P], torch.full((2, P), -100), 0)
check("the attention mask gets P ones in front", joined_mask[:, :P], torch.ones(2, P), 0)
text_model = apply_peft(copy.deepcopy(base), PromptConfig(prompt_len=P, init="text", init_text=text),
                        tokenizer=LetterTokenizer())
logits, cache = text_model(tokens, use_cache=True)
check_equal("logits are returned for the n real tokens only", tuple(logits.shape), (2, 5, cfg.vocab_size))
check_equal("but every layer's KV cache holds n + P entries", cache[0][0].shape[2], 5 + P)

# ------------------------------------------------------------------------------------------------
print("3. Only the prompt gets gradients, and its gradient is the input-embedding gradient at 0..P-1")
model = apply_peft(copy.deepcopy(base), PromptConfig(prompt_len=P, init="vocab"),
                   generator=torch.Generator().manual_seed(0))
print(f"   {model.report}")
check_equal("trainable == P * d", model.report.trainable, P * cfg.dim)
target = torch.randint(0, cfg.vocab_size, (2, 5))
loss = model.loss(tokens, target)
loss.backward()
without_grad = [name for name, p in model.named_parameters() if p.grad is not None and name != "soft_prompt.weight"]
check_equal("parameters other than the prompt with a gradient", without_grad, [])
# Independent: the frozen base, fed [prompt ; E[tokens]] as input_embeds, differentiated w.r.t. those embeds.
inputs = torch.cat([model.soft_prompt.weight.detach()[None].expand(2, P, cfg.dim), E[tokens]], dim=1)
inputs = inputs.clone().requires_grad_(True)                        # (2, P + n, d)
logits = frozen_copy(input_embeds=inputs)[:, P:]                    # predictions at the real positions
reference_loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, cfg.vocab_size),
                                                   target[:, 1:].reshape(-1))
reference_loss.backward()
check("loss == cross-entropy of the base fed [prompt ; E[tokens]]", loss, reference_loss, 1e-6)
check("prompt gradient == sum over the batch of d loss / d input_embeds[:, :P]", model.soft_prompt.weight.grad,
      inputs.grad[:, :P].sum(0), 1e-6)

optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
start_loss = loss.item()
for step in range(30):                                              # fit the prompt to the target
    optimizer.zero_grad()
    loss = model.loss(tokens, target)
    loss.backward()
    optimizer.step()
print(f"   30 Adam steps on the prompt alone: loss {start_loss:.3f} -> {loss.item():.3f}")
assert loss.item() < 0.8 * start_loss, "training the prompt alone should lower the loss"
base_after = {name.removeprefix("base."): p for name, p in model.named_parameters() if name.startswith("base.")}
changed = [name for name, p in frozen_copy.named_parameters() if not torch.equal(p, base_after[name])]
check_equal("base weights changed by training (must be none)", changed, [])

# ------------------------------------------------------------------------------------------------
print("4. Initialisations: random (the embedding table's scale), sampled vocabulary rows, or a text")
random_init = apply_peft(copy.deepcopy(base), PromptConfig(prompt_len=200, init="random"),
                         generator=torch.Generator().manual_seed(0)).soft_prompt.weight.detach()
check("random: std of the prompt ~ std of E", random_init.std() / E.std(), 1.0, 0.05)
vocab_init = apply_peft(copy.deepcopy(base), PromptConfig(prompt_len=P, init="vocab"),
                        generator=torch.Generator().manual_seed(0)).soft_prompt.weight.detach()
rows = [int(((E - row).abs().sum(-1) == 0).nonzero()[0]) for row in vocab_init]
check_equal("vocab: each prompt row is a row of E, all distinct", len(set(rows)), P)
print(f"   (rows of E used: {rows}; text init above used {hard_ids.tolist()})")

# ------------------------------------------------------------------------------------------------
print("5. LLaMA-7B: P = 20 virtual tokens")
with torch.device("meta"):
    model7 = apply_peft(Transformer(ModelConfig.from_name("llama-7b")), PromptConfig(prompt_len=20, init="random"))
print(f"   {model7.report}")
check_equal("trainable == 20 * 4096 = 81,920", model7.report.trainable, 20 * 4096)

print("all checks passed")
