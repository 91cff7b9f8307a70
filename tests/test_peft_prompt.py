"""Prompt tuning (SoftPrompt): prepending, the three initialisations, gradients, positions, closed-form count,
bad input, and parity with HF peft prompt tuning (raw Transformer and through apply_peft)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers_peft import assert_logits_close, tiny_hf_pair
from minipeft.config import ModelConfig
from minipeft.model import Transformer
from minipeft.peft import PeftConfigError, PromptConfig, apply_peft
from minipeft.peft.soft_prompt import SoftPrompt, initial_weight


class ListTokenizer:
    """Stands in for minipeft.Tokenizer: maps each character of the text to a fixed id."""

    def __init__(self, ids_by_char):
        self.ids_by_char = ids_by_char
        self.calls = []

    def encode(self, text, bos=True, eos=False):
        self.calls.append((text, bos, eos))
        return [self.ids_by_char[c] for c in text]


def test_prepend_lengthens_by_p_with_ignored_labels_and_visible_mask():
    P, B, T, d = 3, 2, 4, 8
    weight = torch.randn(P, d)
    prompt = SoftPrompt(P, d, weight)
    x = torch.randn(B, T, d)
    labels = torch.tensor([[5, 6, 7, -100], [1, 2, 3, 4]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    embeds, new_labels, new_mask = prompt.prepend(x, labels, mask)
    assert embeds.shape == (B, P + T, d)
    for b in range(B):
        assert torch.equal(embeds[b, :P], weight) and torch.equal(embeds[b, P:], x[b])
    assert new_labels.tolist() == [[-100] * P + [5, 6, 7, -100], [-100] * P + [1, 2, 3, 4]]
    assert new_mask.tolist() == [[1] * P + [1, 1, 1, 0], [1] * P + [0, 1, 1, 1]]
    embeds_only, none_labels, none_mask = prompt.prepend(x)
    assert torch.equal(embeds_only, embeds) and none_labels is None and none_mask is None


def test_random_init_has_the_embedding_tables_scale():
    embedding = nn.Embedding(50, 64)
    nn.init.normal_(embedding.weight, std=0.3)
    weight = initial_weight(PromptConfig(prompt_len=40, init="random"), embedding,
                            generator=torch.Generator().manual_seed(0))
    assert weight.shape == (40, 64)
    table_std = embedding.weight.detach().std().item()
    assert abs(weight.std().item() / table_std - 1) < 0.05          # 2560 samples: std within ~3%
    assert abs(weight.mean().item()) < 0.05 * table_std
    again = initial_weight(PromptConfig(prompt_len=40, init="random"), embedding,
                           generator=torch.Generator().manual_seed(0))
    assert torch.equal(weight, again)


def test_vocab_init_rows_are_rows_of_the_embedding_table():
    embedding = nn.Embedding(30, 16)
    P = 12
    weight = initial_weight(PromptConfig(prompt_len=P, init="vocab"), embedding,
                            generator=torch.Generator().manual_seed(1))
    table = embedding.weight.detach()
    matches = [[i for i in range(30) if torch.equal(weight[p], table[i])] for p in range(P)]
    assert all(len(m) == 1 for m in matches), "each prompt row must be exactly one vocabulary row"
    assert len({m[0] for m in matches}) == P                          # sampled without replacement


@pytest.mark.parametrize("text, prompt_len, expected_ids", [
    ("abc", 7, [1, 2, 3, 1, 2, 3, 1]),       # shorter than P: repeated
    ("abcab", 3, [1, 2, 3]),                 # longer than P: cut
])
def test_text_init_equals_the_texts_embeddings(text, prompt_len, expected_ids):
    embedding = nn.Embedding(10, 6)
    tokenizer = ListTokenizer({"a": 1, "b": 2, "c": 3})
    weight = initial_weight(PromptConfig(prompt_len=prompt_len, init="text", init_text=text), embedding,
                            tokenizer=tokenizer)
    assert torch.equal(weight, embedding.weight.detach()[expected_ids])
    assert tokenizer.calls == [(text, False, False)]                  # the text's own tokens, no BOS/EOS


def test_only_the_prompt_gets_gradients_and_prompt_labels_are_ignored(small_model, small_cfg):
    torch.manual_seed(5)
    model = apply_peft(small_model, PromptConfig(prompt_len=4, init="random"),
                       generator=torch.Generator().manual_seed(0))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["soft_prompt.weight"]
    assert model.report.trainable == 4 * small_cfg.dim

    tokens = torch.randint(0, small_cfg.vocab_size, (2, 6))
    embeds, labels, _ = model.soft_prompt.prepend(model.base.tok_embeddings(tokens), tokens)
    logits = model.base(input_embeds=embeds)                                         # (B, P+T, V)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    # independent: the loss over the real tokens only; position P-1+t predicts real token t (so the last
    # prompt position predicts the first real token, and no position predicts a prompt slot)
    real = F.cross_entropy(logits[:, 4 - 1:-1].flatten(0, 1), tokens.flatten())
    torch.testing.assert_close(loss, real)
    loss.backward()
    assert model.soft_prompt.weight.grad is not None and model.soft_prompt.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.base.parameters())


def test_soft_prompt_count_at_llama7b_shape():
    """Prompt tuning trains P * d parameters: 20 * 4096 at the default P = 20."""
    cfg = ModelConfig.from_name("llama-7b")
    with torch.device("meta"):
        base = Transformer(cfg)
        model = apply_peft(base, PromptConfig())
    assert PromptConfig().prompt_len == 20
    assert model.report.trainable == 20 * 4096 == 81_920
    assert model.report.total == 6_738_415_616 + 20 * 4096


def test_bad_prompt_input_is_a_clear_error():
    embedding = nn.Embedding(10, 6)
    with pytest.raises(PeftConfigError, match="prompt_len"):
        initial_weight(PromptConfig(prompt_len=0, init="random"), embedding)
    with pytest.raises(PeftConfigError, match="prompt_len"):
        SoftPrompt(0, 6, torch.zeros(0, 6))
    with pytest.raises(PeftConfigError, match="tokenizer"):
        initial_weight(PromptConfig(prompt_len=3, init="text", init_text="hello"), embedding)
    with pytest.raises(PeftConfigError, match="init_text"):
        initial_weight(PromptConfig(prompt_len=3, init="text"), embedding, tokenizer=ListTokenizer({}))
    with pytest.raises(PeftConfigError, match="init"):
        initial_weight(PromptConfig(prompt_len=3, init="zeros"), embedding)
    with pytest.raises(PeftConfigError, match="vocabulary"):
        initial_weight(PromptConfig(prompt_len=3, init="text", init_text="a"), embedding,
                       tokenizer=ListTokenizer({"a": 99}))
    with pytest.raises(PeftConfigError, match=r"\(3, 6\)"):
        SoftPrompt(3, 6, torch.zeros(3, 5))
    assert issubclass(PeftConfigError, ValueError)


# ---- parity with Hugging Face peft ----------------------------------------------------------------
def test_soft_prompt_matches_hf_peft_prompt_tuning():
    from peft import PromptTuningConfig, get_peft_model

    hf, ours, cfg = tiny_hf_pair()
    P = 5
    peft_model = get_peft_model(copy.deepcopy(hf), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    peft_model.eval()
    prompt_weight = peft_model.prompt_encoder["default"].embedding.weight.detach().clone()    # (P, d)
    torch.manual_seed(6)
    tokens = torch.randint(0, cfg.vocab_size, (2, 6))
    with torch.no_grad():
        theirs = peft_model(input_ids=tokens, attention_mask=torch.ones_like(tokens)).logits      # (B, P+T, V)
        assert theirs.shape == (2, P + 6, cfg.vocab_size)
        theirs = theirs[:, P:]

        # raw Transformer: prompt embeddings in front, positions 0..P+T-1
        soft_prompt = SoftPrompt(P, cfg.dim, prompt_weight)
        embeds, _, _ = soft_prompt.prepend(ours.tok_embeddings(tokens))
        assert_logits_close(ours(input_embeds=embeds)[:, P:], theirs)

        # through apply_peft, which drops the prompt's logits itself
        wrapped = apply_peft(copy.deepcopy(ours), PromptConfig(prompt_len=P, init="random"))
        wrapped.soft_prompt.weight.copy_(prompt_weight)
        assert_logits_close(wrapped(tokens, attention_mask=torch.ones_like(tokens)), theirs)
        assert (ours(tokens) - theirs).abs().max() > 1e-2                # the prompt does matter
