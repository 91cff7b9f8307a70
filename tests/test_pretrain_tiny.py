"""tools/pretrain_tiny.py on a very small corpus: it writes a loadable checkpoint folder with a LLaMA-style
tokenizer, the loss falls, and a run stopped and resumed ends with bit-identical weights."""

import json
import random
import sys
from pathlib import Path

import pytest
import torch

from minipeft.checkpoint import load_model
from minipeft.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import pretrain_tiny  # noqa: E402

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
    assert pretrain_tiny.main(argv) == 0


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
    with pytest.raises(pretrain_tiny.PretrainError, match="--vocab-size 40"):
        pretrain_tiny.main(["--corpus", str(corpus / "en.txt"), "--corpus", str(corpus / "zh.txt"),
                            "--out", str(tmp_path / "bad"), "--vocab-size", "40", "--steps", "1"])


def test_an_out_folder_with_files_is_not_overwritten(corpus, tmp_path):
    out = tmp_path / "used"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(pretrain_tiny.PretrainError, match=r"--out .*used: already holds files; continue it with --resume"):
        run(corpus, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    run(corpus, out, "--overwrite")                                   # explicit: starts afresh there
    assert not (out / "notes.txt").exists() and (out / "tiny-llama" / "config.json").is_file()
