"""Vocabulary extension (minipeft/vocab.py, tools/extend_vocab.py) and trainable embeddings (extra_trainable).

Checked against independent computations: the merged model's pieces against the two source protobufs read
here, its segmentation against a small BPE encoder written in this file, new rows against a float64 mean,
logits against the unresized model, the 7B count against the closed-form formula.
"""

import importlib.util
import json
import re
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from sentencepiece import sentencepiece_model_pb2

from helpers_tokenizer import train_tiny_sentencepiece
from minipeft.checkpoint import CheckpointError, load_model, save_model
from minipeft.config import ModelConfig
from minipeft.model import Transformer
from minipeft.peft import LoRAConfig, PeftConfigError, PrefixConfig, apply_peft, load_adapter, save_adapter
from minipeft.vocab import (VocabError, check_extends, has_cjk, merge_sentencepiece_models, resize_checkpoint,
                            resize_vocab, tokens_per_char, train_sentencepiece)

REPO = Path(__file__).resolve().parent.parent

# A small Chinese corpus written for this test (with a little English, as real Chinese text has), and held-out
# Chinese lines that are not in it, to measure tokens per character on.
CHINESE_TRAIN = [
    "今天天气很好，我们一起去公园散步吧。",
    "机器学习是人工智能的一个分支，研究计算机怎样从数据中学习。",
    "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "他说：“我们明天再见。”然后就回家了。",
    "中文分词是自然语言处理的基础任务之一。",
    "GPT 模型和 BERT 模型都很有名，很多人在学习它们。",
    "请用一句话回答这个问题：一年有几个月？",
    "我喜欢在周末读书、写字和听音乐。",
    "这个城市的春天很美，到处都是花。",
    "你好，世界！欢迎来到这个美丽的世界。",
] * 20
CHINESE_HELDOUT = [
    "明天我们去图书馆学习自然语言处理。",
    "春天来了，公园里的花都开了。",
    "请回答：一个星期有几天？",
    "他喜欢在家里听音乐和读书。",
]
ENGLISH = [
    "the cat sat on the mat and the dog sat on the log.",
    "Hello, World! The answer is 42, not 7.",
    "GPT and BERT are models; we are learning how a model splits a line into pieces.",
    "  two spaces, a tab\tand (brackets) [here] {there} 'quotes' \"double\" 100%",
    "Ünïcödé café naïve — dash… “curly quotes” €5",
]
MIXED = [
    "The answer is 42. 答案是 42。",
    "Hello, world! 你好，世界！",
    "GPT 模型 and BERT 模型 are famous.",
    "明天 we go to the 公园 at 9 o'clock.",
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """(base, extra, merged) model paths: base = the tests' tiny English+Chinese BPE model, extra = a Chinese
    BPE model trained on CHINESE_TRAIN, merged = base + extra's new CJK pieces."""
    folder = tmp_path_factory.mktemp("vocab")
    base = train_tiny_sentencepiece(folder, vocab_size=300)
    extra = train_sentencepiece(CHINESE_TRAIN, folder / "zh.model", vocab_size=420)
    merged = folder / "merged.model"
    stats = merge_sentencepiece_models(base, extra, merged)
    return base, str(extra), str(merged), stats


def proto(path):
    m = sentencepiece_model_pb2.ModelProto()
    m.ParseFromString(Path(path).read_bytes())
    return m


def processor(path):
    return spm.SentencePieceProcessor(model_file=str(path))


# ---- merging --------------------------------------------------------------------------------------
def test_merge_appends_exactly_the_new_cjk_pieces_after_unchanged_base_pieces(tokenizers):
    base, extra, merged, stats = tokenizers
    base_p, extra_p, merged_p = proto(base), proto(extra), proto(merged)
    V = len(base_p.pieces)
    # every base piece: same id, text, type and score
    for i, piece in enumerate(base_p.pieces):
        assert (merged_p.pieces[i].piece, merged_p.pieces[i].type, merged_p.pieces[i].score) == \
               (piece.piece, piece.type, piece.score)
    # the appended pieces: the extra model's NORMAL pieces with a CJK character that the base lacks, in order
    normal = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
    base_texts = {p.piece for p in base_p.pieces}
    expected = [p.piece for p in extra_p.pieces
                if p.type == normal and p.piece not in base_texts and any(
                    "\u3000" <= c <= "\u9fff" or "\uff00" <= c <= "\uffef" for c in p.piece)]
    appended = merged_p.pieces[V:]
    assert [p.piece for p in appended] == expected
    assert len(expected) > 50 and stats["added"] == len(expected) and stats["new_size"] == V + len(expected)
    assert stats["base_size"] == V and stats["extra_size"] == len(extra_p.pieces)
    assert (stats["added"] + stats["skipped_present"] + stats["skipped_special"] + stats["skipped_non_cjk"]
            == len(extra_p.pieces))
    assert stats["skipped_non_cjk"] > 0     # "▁GPT"-like pieces of the Chinese corpus are left out
    # NORMAL, scores below every base score, in the extra model's order
    lowest_base = min(p.score for p in base_p.pieces)
    assert all(p.type == normal and p.score < lowest_base for p in appended)
    assert all(a.score >= b.score for a, b in zip(appended, appended[1:]))
    assert processor(merged).vocab_size() == V + len(expected)
    assert merged_p.trainer_spec.vocab_size == V + len(expected)


@pytest.mark.parametrize("text", ENGLISH + CHINESE_TRAIN[:10] + MIXED)
def test_merged_segmentation_matches_a_reference_bpe_encoder(tokenizers, text):
    """SentencePiece's encoding with the merged model equals a plain BPE written here: repeatedly merge the
    adjacent pair whose concatenation is the highest-scoring piece (leftmost on ties), then spell symbols
    with no piece as UTF-8 byte pieces. So the appended scores act exactly as the docstring says."""
    _, _, merged, _ = tokenizers
    m = proto(merged)
    normal = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
    score = {p.piece: p.score for p in m.pieces if p.type == normal}
    ids = {p.piece: i for i, p in enumerate(m.pieces)}
    symbols = list("▁" + text.replace(" ", "▁"))      # dummy prefix, spaces as ▁ (identity normaliser)
    while True:
        candidates = [(score[a + b], -i) for i, (a, b) in enumerate(zip(symbols, symbols[1:])) if a + b in score]
        if not candidates:
            break
        _, neg_i = max(candidates)
        i = -neg_i
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    expected = []
    for s in symbols:
        expected += [ids[s]] if s in score else [ids[f"<0x{b:02X}>"] for b in s.encode("utf-8")]
    assert processor(merged).encode(text) == expected


@pytest.mark.parametrize("text", ENGLISH)
def test_english_text_is_tokenised_exactly_as_before(tokenizers, text):
    base, _, merged, _ = tokenizers
    assert processor(merged).encode(text) == processor(base).encode(text)


@pytest.mark.parametrize("text", MIXED)
def test_mixed_text_keeps_the_tokens_of_its_non_chinese_words(tokenizers, text):
    """Every token that covers an ASCII letter or digit is the same token (same id, same span of the text)
    before and after; only the Chinese parts change, and they get shorter."""
    base, _, merged, _ = tokenizers

    def latin_tokens(path):
        out = processor(path).encode(text, return_type="proto")
        return [(p.id, p.begin, p.end) for p in out.pieces if any(c.isascii() and c.isalnum() for c in p.surface)]

    assert latin_tokens(merged) == latin_tokens(base) and latin_tokens(base)
    assert len(processor(merged).encode(text)) < len(processor(base).encode(text))
    assert processor(merged).decode(processor(merged).encode(text)) == text


def test_without_the_cjk_rule_english_would_change(tokenizers, tmp_path):
    """Why require_cjk is the default: the Chinese corpus has Latin pieces (GPT, BERT) that the base lacks,
    and appending them changes how English is split, however low their scores."""
    base, extra, _, _ = tokenizers
    all_pieces = tmp_path / "all.model"
    stats = merge_sentencepiece_models(base, extra, all_pieces, require_cjk=False)
    assert stats["skipped_non_cjk"] == 0
    changed = [t for t in ENGLISH if processor(all_pieces).encode(t) != processor(base).encode(t)]
    assert changed


def test_chinese_takes_markedly_fewer_tokens(tokenizers):
    base, _, merged, _ = tokenizers
    before = tokens_per_char(processor(base), CHINESE_HELDOUT)
    after = tokens_per_char(processor(merged), CHINESE_HELDOUT)
    # tokens_per_char against a direct count
    n_chars = sum(len(t) for t in CHINESE_HELDOUT)
    assert before == sum(len(processor(base).encode(t)) for t in CHINESE_HELDOUT) / n_chars
    assert before > 1.5 and after < 0.6 * before
    for text in CHINESE_HELDOUT:
        assert processor(merged).decode(processor(merged).encode(text)) == text


def test_cjk_detection():
    assert has_cjk("▁你") and has_cjk("，") and has_cjk("。") and has_cjk("𠀀")
    assert not has_cjk("▁GPT") and not has_cjk("“") and not has_cjk("café")


def test_bad_merge_sources_give_clear_errors(tokenizers, tmp_path):
    base, extra, _, _ = tokenizers
    text_file = tmp_path / "notes.txt"
    text_file.write_text("this is not a SentencePiece model\n")
    json_file = tmp_path / "tokenizer.json"
    json_file.write_text(json.dumps({"model": {"type": "BPE"}}))
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"")
    for bad in (text_file, json_file, empty):
        with pytest.raises(VocabError, match=f"extra tokenizer {bad}.*not a SentencePiece model"):
            merge_sentencepiece_models(base, bad, tmp_path / "out.model")
        with pytest.raises(VocabError, match=f"base tokenizer {bad}.*not a SentencePiece model"):
            merge_sentencepiece_models(bad, extra, tmp_path / "out.model")
    with pytest.raises(VocabError, match="does not exist"):
        merge_sentencepiece_models(base, tmp_path / "missing.model", tmp_path / "out.model")
    assert not (tmp_path / "out.model").exists()


def test_check_extends_refuses_a_tokenizer_that_moves_base_ids(tokenizers, tmp_path):
    base, extra, merged, _ = tokenizers
    check_extends(base, merged)                       # fine
    with pytest.raises(VocabError, match="keep every base id"):
        check_extends(base, extra)


# ---- resizing ----------------------------------------------------------------------------------------
def small_model(vocab_size):
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, multiple_of=16,
                      norm_eps=1e-5, max_seq_len=64)
    return Transformer(cfg).eval()


def test_resize_keeps_old_rows_and_logits_and_initialises_new_rows_to_the_mean():
    V, V_new = 300, 416
    model = small_model(V)
    old_embed = model.tok_embeddings.weight.detach().clone()
    old_output = model.output.weight.detach().clone()
    tokens = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        old_logits = model(tokens)                                                   # (2, 11, V)
    resize_vocab(model, V_new)
    assert model.config.vocab_size == V_new
    assert model.tok_embeddings.weight.shape == model.output.weight.shape == (V_new, 32)
    assert torch.equal(model.tok_embeddings.weight[:V], old_embed)
    assert torch.equal(model.output.weight[:V], old_output)
    for new, old in ((model.tok_embeddings.weight[V:], old_embed), (model.output.weight[V:], old_output)):
        mean64 = old.double().sum(0) / V                                             # (d,)
        torch.testing.assert_close(new.double(), mean64.expand(V_new - V, -1), rtol=1e-6, atol=1e-8)
    with torch.no_grad():
        new_logits = model(tokens)                                                   # (2, 11, V_new)
    assert torch.equal(new_logits[..., :V], old_logits)                              # bit-identical
    # The mean output row gives each new token at most 1/V of the probability (Jensen; see vocab.py).
    probs = new_logits.double().softmax(-1)
    assert probs[..., V:].max() <= 1.0 / V


def test_resize_refuses_to_shrink_and_peft_models():
    model = small_model(300)
    with pytest.raises(VocabError, match="smaller than the model's 300"):
        resize_vocab(model, 299)
    with pytest.raises(VocabError, match="plain minipeft Transformer"):
        resize_vocab(apply_peft(model, LoRAConfig(rank=2)), 400)


def test_7b_parameter_count_after_resizing_to_chinese_llama_vocab():
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_name("llama-7b"))
        resize_vocab(model, 49953)
        preset = Transformer(ModelConfig.from_name("chinese-llama-7b"))
    expected = 6_738_415_616 + 2 * (49953 - 32000) * 4096
    assert model.num_parameters() == expected == preset.num_parameters()
    assert model.config == ModelConfig.from_name("chinese-llama-7b")
    # LoRA r=8 on wq, wv + trainable embeddings and output: 32 layers * 2 * r * (4096 + 4096) + 2 * V * d
    peft = apply_peft(model, LoRAConfig(rank=8, targets=("wq", "wv"), extra_trainable=("tok_embeddings", "output")))
    assert peft.report.trainable == 32 * 2 * 8 * (4096 + 4096) + 2 * 49953 * 4096
    assert peft.report.total == expected + 32 * 2 * 8 * (4096 + 4096)


def test_resize_checkpoint_round_trip_and_errors(tokenizers, tmp_path):
    base, extra, merged, stats = tokenizers
    V = stats["base_size"]
    model = small_model(V)
    save_model(model, model.config, tmp_path / "base", tokenizer_path=base)
    summary = resize_checkpoint(tmp_path / "base", tmp_path / "extended", merged)
    assert summary["old_vocab_size"] == V and summary["new_vocab_size"] == stats["new_size"]
    resized = load_model(tmp_path / "extended")
    assert resized.config.vocab_size == stats["new_size"]
    assert json.loads((tmp_path / "extended" / "config.json").read_text())["vocab_size"] == stats["new_size"]
    assert (tmp_path / "extended" / "tokenizer.model").read_bytes() == Path(merged).read_bytes()
    tokens = torch.tensor([processor(base).encode("the cat sat on the mat.")])
    with torch.no_grad():
        assert torch.equal(resized(tokens)[..., :V], load_model(tmp_path / "base")(tokens))

    # a tokenizer that does not keep the checkpoint's ids
    with pytest.raises(VocabError, match="keep every base id"):
        resize_checkpoint(tmp_path / "base", tmp_path / "x", extra)
    # a checkpoint whose vocabulary disagrees with its own tokenizer
    wrong = small_model(V + 5)
    save_model(wrong, wrong.config, tmp_path / "wrong")
    (tmp_path / "wrong" / "tokenizer.model").write_bytes(Path(base).read_bytes())
    with pytest.raises(CheckpointError, match=f"tokenizer has {V} pieces.*vocabulary of {V + 5}"):
        resize_checkpoint(tmp_path / "wrong", tmp_path / "x", merged)
    # a checkpoint (without tokenizer) larger than the new tokenizer
    big = small_model(stats["new_size"] + 10)
    save_model(big, big.config, tmp_path / "big")
    with pytest.raises(VocabError, match="at least as many pieces"):
        resize_checkpoint(tmp_path / "big", tmp_path / "x", merged)
    with pytest.raises(VocabError, match="not over its source"):
        resize_checkpoint(tmp_path / "base", tmp_path / "base", merged)
    not_sp = tmp_path / "not_sp.model"
    not_sp.write_text("hello")
    with pytest.raises(VocabError, match="not a SentencePiece model"):
        resize_checkpoint(tmp_path / "base", tmp_path / "x", not_sp)
    assert not (tmp_path / "x").exists()


# ---- fine-tuning with trainable embeddings -----------------------------------------------------------
def chinese_batch(tokenizer_path):
    sp = processor(tokenizer_path)
    rows = [[1] + sp.encode(t)[:15] for t in CHINESE_TRAIN[:4]]
    length = min(len(r) for r in rows)
    return torch.tensor([r[:length] for r in rows])                                   # (4, T)


def test_lora_with_trainable_embeddings_trains_saves_and_reloads(tokenizers, tmp_path):
    base, _, merged, stats = tokenizers
    V, V_new, d = stats["base_size"], stats["new_size"], 32
    model = resize_vocab(small_model(V), V_new)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = LoRAConfig(rank=4, alpha=8, targets=("wq", "wv"), extra_trainable=("tok_embeddings", "output"))
    peft = apply_peft(model, config)
    lora = 2 * (4 * (32 + 32) + 4 * (32 + 16))   # 2 layers x (wq: r (d + d), wv: r (d + kv_dim 16))
    assert peft.report.trainable == lora + 2 * V_new * d
    assert peft.base.tok_embeddings.weight.requires_grad and peft.base.output.weight.requires_grad

    tokens = chinese_batch(merged)
    assert tokens.max() >= V                                                          # uses new pieces
    optimizer = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = peft.loss(tokens, tokens)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < losses[0] - 0.5
    params = dict(peft.base.named_parameters())
    assert torch.equal(params["layers.0.attention.wq.weight"], frozen_before["layers.0.attention.wq.weight"])
    assert torch.equal(params["norm.weight"], frozen_before["norm.weight"])
    assert not torch.equal(params["tok_embeddings.weight"][V:], frozen_before["tok_embeddings.weight"][V:])

    save_adapter(peft, tmp_path / "adapter")
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "adapter" / "adapter.safetensors"))
    assert saved["tok_embeddings.weight"].shape == saved["output.weight"].shape == (V_new, d)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["config"]["extra_trainable"] == \
        ["tok_embeddings", "output"]
    reloaded = load_adapter(resize_vocab(small_model(V), V_new), tmp_path / "adapter")
    assert reloaded.peft_config.extra_trainable == ("tok_embeddings", "output")
    assert reloaded.report.trainable == peft.report.trainable
    with torch.no_grad():
        assert torch.equal(reloaded(tokens), peft(tokens))
    with pytest.raises(PeftConfigError, match="vocab_size"):                          # the unextended base
        load_adapter(small_model(V), tmp_path / "adapter")


def test_prefix_with_trainable_output_saves_and_reloads(tmp_path):
    model = small_model(50)
    peft = apply_peft(model, PrefixConfig(prefix_len=3, reparam_hidden=8, extra_trainable=("output",)))
    assert peft.base.output.weight.requires_grad and not peft.base.tok_embeddings.weight.requires_grad
    with torch.no_grad():
        peft.base.output.weight.add_(0.1)
    save_adapter(peft, tmp_path / "prefix")
    reloaded = load_adapter(small_model(50), tmp_path / "prefix")
    tokens = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens), peft(tokens), rtol=1e-5, atol=1e-6)
    assert torch.equal(reloaded.base.output.weight, peft.base.output.weight)


def test_bad_extra_trainable_names():
    for bad in (("embeddings",), "output", ("output", "norm"), None):
        with pytest.raises(PeftConfigError, match="extra_trainable"):
            apply_peft(small_model(50), LoRAConfig(extra_trainable=bad))


# ---- the command-line tool -----------------------------------------------------------------------------
def load_cli():
    spec = importlib.util.spec_from_file_location("extend_vocab", REPO / "tools" / "extend_vocab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_trains_merges_measures_and_resizes(tokenizers, tmp_path, capsys):
    base, _, _, _ = tokenizers
    corpus = tmp_path / "zh.txt"
    corpus.write_text("\n".join(CHINESE_TRAIN) + "\n")
    sample = tmp_path / "heldout.json"       # Alpaca records, as the demo data is
    sample.write_text(json.dumps([{"instruction": t, "input": "", "output": t} for t in CHINESE_HELDOUT]))
    model = small_model(processor(base).vocab_size())
    save_model(model, model.config, tmp_path / "ckpt", tokenizer_path=base)
    cli = load_cli()
    rc = cli.main(["--base-tokenizer", base, "--corpus", str(corpus), "--vocab-size", "420",
                   "--out", str(tmp_path / "new.model"), "--sample", str(sample),
                   "--checkpoint", str(tmp_path / "ckpt"), "--checkpoint-out", str(tmp_path / "ckpt_zh")])
    out = capsys.readouterr().out
    assert rc == 0, out
    added = int(out.split("pieces added    : ")[1].split()[0].replace(",", ""))
    new_size = processor(tmp_path / "new.model").vocab_size()
    assert added == new_size - processor(base).vocab_size() > 50
    before, after = map(float, re.search(r"tokens per char : ([\d.]+) before, ([\d.]+) after", out).groups())
    assert before == pytest.approx(tokens_per_char(processor(base), CHINESE_HELDOUT * 2), abs=5e-4)
    assert after < 0.6 * before
    assert load_model(tmp_path / "ckpt_zh").config.vocab_size == new_size

    rc = cli.main(["--base-tokenizer", base, "--extra-tokenizer", str(corpus), "--out", str(tmp_path / "y.model")])
    assert rc == 2 and "not a SentencePiece model" in capsys.readouterr().err
