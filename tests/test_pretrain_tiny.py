"""tools/pretrain_tiny.py (minipeft.pretrain) on a very small corpus: it writes a loadable checkpoint folder with a
LLaMA-style tokenizer, the loss falls, and a run stopped and resumed ends with bit-identical weights."""

import json
import random

import pytest
import torch

from minipeft import pretrain
from minipeft.checkpoint import load_model
from minipeft.tokenizer import Tokenizer

WORDS = "the king said unto them go forth and speak of love and of the night my lord what light is this".split()
HANZI = "春风明月山水花落人归天地江南夜雨秋云白日长河"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    folder = tmp_path_factory.mktemp("corpus")
    english = "\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(1500))
    chinese = "\n".join("".join(rng.choice(HANZI) for _ in range(7)) for _ in range(800))
    (folder / "en.txt").write_text(english + "\n", encoding="utf-8")
    (folder / "zh.txt").write_text(chinese + "\n", encoding="utf-8")
    return folder


def run(corpus, out, *extra):
    argv = ["--corpus", str(corpus / "en.txt"), "--corpus", f"{corpus / 'zh.txt'}:0.3", "--out", str(out),
            "--steps", "8", "--batch-size", "4", "--seq-len", "32", "--lr", "1e-2", "--warmup", "2",
            "--vocab-size", "320", "--dim", "32", "--n-layers", "1", "--n-heads", "2", "--n-kv-heads", "1",
            "--eval-every", "4", "--save-every", "2", "--seed", "0", *extra]
    assert pretrain.main(argv) == 0


def test_writes_a_loadable_checkpoint_and_learns(corpus, tmp_path):
    run(corpus, tmp_path / "run")
    folder = tmp_path / "run" / "tiny-llama"
    model = load_model(folder)
    tokenizer = Tokenizer(folder / "tokenizer.model")
    assert (tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    assert tokenizer.vocab_size == model.config.vocab_size == 320
    assert tokenizer.decode(tokenizer.encode("the king 春风 2024")) == "the king 春风 2024"
    assert model.tok_embeddings.weight.dtype == torch.float16                      # shipped in fp16
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["final_val_loss"] < metrics["random_init"]["val_loss"] - 0.5            # it learned
    assert metrics["val_text_perplexity"] < metrics["random_init"]["val_text_perplexity"]
    assert (tmp_path / "run" / "loss_curve.png").is_file()


def test_resume_is_bit_identical(corpus, tmp_path):
    run(corpus, tmp_path / "straight")
    run(corpus, tmp_path / "resumed", "--stop-at-step", "4")
    run(corpus, tmp_path / "resumed", "--resume", str(tmp_path / "resumed" / "train_state.pt"))
    straight = load_model(tmp_path / "straight" / "tiny-llama").state_dict()
    resumed = load_model(tmp_path / "resumed" / "tiny-llama").state_dict()
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    # a run stopped at step 4 and not resumed differs: the equality above is not trivially true
    run(corpus, tmp_path / "stopped", "--stop-at-step", "4")
    stopped = load_model(tmp_path / "stopped" / "tiny-llama").state_dict()
    assert not torch.equal(stopped["output.weight"], straight["output.weight"])


def test_too_small_vocabulary_is_a_clear_error(corpus, tmp_path, capsys):
    with pytest.raises(pretrain.PretrainError, match="--vocab-size 40"):
        pretrain.main(["--corpus", str(corpus / "en.txt"), "--corpus", str(corpus / "zh.txt"),
                            "--out", str(tmp_path / "bad"), "--vocab-size", "40", "--steps", "1"])


def test_an_out_folder_with_files_is_not_overwritten(corpus, tmp_path):
    out = tmp_path / "used"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(pretrain.PretrainError, match=r"--out .*used: already holds files; continue it with --resume"):
        run(corpus, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    run(corpus, out, "--overwrite")                                   # explicit: starts afresh there
    assert not (out / "notes.txt").exists() and (out / "tiny-llama" / "config.json").is_file()


def test_glm_sample_layout_by_hand():
    """GLM's prefix LM: context w[:k], [gMASK] <sop>, then the rest; only what follows <sop> is scored."""
    layout = pretrain.SampleLayout("chatglm", seq_len=6, bos_id=None, gmask_id=90, sop_id=91)
    assert layout.window == 5
    inputs, targets = layout.layout(torch.tensor([10, 11, 12, 13, 14]), context=2)
    assert inputs.tolist() == [10, 11, 90, 91, 12, 13]
    assert targets.tolist() == [-100, -100, -100, 12, 13, 14]          # <sop> predicts w[2], ...
    inputs, targets = layout.layout(torch.tensor([10, 11, 12, 13, 14]))  # scoring: no context
    assert inputs.tolist() == [90, 91, 10, 11, 12, 13] and targets.tolist() == [-100, 10, 11, 12, 13, 14]
    causal = pretrain.SampleLayout("bloom", seq_len=4, bos_id=1)
    inputs, targets = causal.layout(torch.tensor([10, 11, 12, 13]))
    assert inputs.tolist() == [1, 10, 11, 12] and targets.tolist() == [10, 11, 12, 13]


@pytest.mark.parametrize("family, model_class, tokenizer_name, vocab", [("bloom", "Bloom", "tokenizer.json", 320),
                                                                        ("chatglm", "ChatGLM", "tokenizer.model", 420)])
def test_other_families_get_their_own_model_and_tokenizer(corpus, tmp_path, family, model_class, tokenizer_name, vocab):
    """(ChatGLM's 90 special and text pieces need a larger vocabulary than the others at this size.)"""
    from minipeft.families import tokenizer_for
    run(corpus, tmp_path / "run", "--family", family, "--n-kv-heads", "2", "--vocab-size", str(vocab))
    folder = tmp_path / "run" / f"tiny-{family}"
    model = load_model(folder)
    assert type(model).__name__ == model_class and model.config.family == family
    tokenizer = tokenizer_for(family, folder / tokenizer_name)
    assert tokenizer.vocab_size == model.config.vocab_size == vocab
    assert tokenizer.decode(tokenizer.encode("the king\n春风 2024", bos=False)) == "the king\n春风 2024"
    if family == "chatglm":        # GLM's marks are pieces of the model; the config knows their ids
        assert (model.config.gmask_id, model.config.sop_id) == (tokenizer.gmask_id, tokenizer.sop_id)
        assert tokenizer.encode("x", bos=True)[-2:] == [tokenizer.gmask_id, tokenizer.sop_id]
    else:                          # BLOOM's byte-level BPE with its special ids
        assert (tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2, 3)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["family"] == family
    assert metrics["final_val_loss"] < metrics["random_init"]["val_loss"] - 0.5


def test_init_from_continues_a_checkpoint_and_refuses_shape_flags(corpus, tmp_path):
    run(corpus, tmp_path / "base")
    base = tmp_path / "base" / "tiny-llama"
    argv = ["--init-from", str(base), "--corpus", str(corpus / "zh.txt"), "--out", str(tmp_path / "more"),
            "--name", "more", "--steps", "4", "--batch-size", "4", "--seq-len", "32", "--lr", "1e-2", "--warmup", "1",
            "--eval-every", "2", "--save-every", "2"]
    with pytest.raises(pretrain.PretrainError, match="--init-from .* drop --dim"):
        pretrain.main(argv + ["--dim", "64"])
    assert pretrain.main(argv) == 0
    metrics = json.loads((tmp_path / "more" / "metrics.json").read_text())
    start = load_model(base).state_dict()
    after = load_model(tmp_path / "more" / "more").state_dict()
    assert metrics["init_from"] == str(base) and "initial" in metrics
    assert metrics["initial"]["val_loss"] > metrics["final_val_loss"]                  # it trained on the new text
    assert start.keys() == after.keys() and not torch.equal(start["output.weight"], after["output.weight"])
