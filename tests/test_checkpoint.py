"""Checkpoints: parity with Hugging Face transformers through every reader, our folder's exact round trip,
and a clear error (naming the file / key) for each kind of bad input."""

import importlib.util
import io
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from minipeft.checkpoint import (CheckpointError, convert_checkpoint, detect_format, hf_tensor_to_ours,
                                 load_model, save_model)
from minipeft.config import ModelConfig
from minipeft.model import Transformer

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parent.parent


# ---- helpers ------------------------------------------------------------------------------------

def make_hf_llama(hidden, heads, kv_heads, intermediate, vocab, layers=2, seed=0):
    """A random float32 LlamaForCausalLM; norms randomised too so a mixed-up norm would show."""
    config = transformers.LlamaConfig(
        hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
        intermediate_size=intermediate, vocab_size=vocab, num_hidden_layers=layers,
        max_position_embeddings=64, rms_norm_eps=1e-5, initializer_range=0.1,
        tie_word_embeddings=False, attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return model


def padded_batch(vocab, lengths=(9, 6, 3), seed=1):
    """Right-padded tokens (B, T) and attention_mask (B, T) with 1 for real tokens."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    tokens = torch.randint(0, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
        tokens[row, n:] = 0
    return tokens, mask


def assert_same_logits(ours_model, hf_model, vocab):
    tokens, mask = padded_batch(vocab)
    with torch.no_grad():
        theirs = hf_model(input_ids=tokens, attention_mask=mask).logits              # (B, T, V)
        ours = ours_model(tokens, attention_mask=mask)                                 # (B, T, V)
    real = mask.bool()
    error = (ours[real] - theirs[real]).abs().max() / theirs[real].abs().max()
    assert error < 1e-5, f"relative logit error {error:.2e}"


def train_sentencepiece(path: Path, vocab_size: int) -> Path:
    """A small BPE SentencePiece model with exactly vocab_size pieces, trained on random words."""
    import sentencepiece as spm
    rng = random.Random(vocab_size)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 6))) for _ in range(200)]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)]
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buffer, vocab_size=vocab_size,
                                   model_type="bpe", minloglevel=2)
    path.write_bytes(buffer.getvalue())
    return path


# Meta's model parallelism (fairscale): column-parallel layers split their output rows (dim 0), row-parallel
# layers and the parallel embedding split dim 1; RMSNorm weights are replicated on every shard.
SPLIT_ON_ROWS = ("wq", "wk", "wv", "w1", "w3", "output")
SPLIT_ON_COLUMNS = ("wo", "w2", "tok_embeddings")


def write_meta_checkpoint(our_state, params: dict, folder: Path, n_shards: int):
    """params.json + consolidated.00.pth .. consolidated.{n-1}.pth, split the way Meta's release is."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(params))
    shards = [{} for _ in range(n_shards)]
    for key, tensor in our_state.items():
        module = key.removesuffix(".weight").split(".")[-1]
        if module in SPLIT_ON_ROWS:
            pieces = tensor.chunk(n_shards, dim=0)
        elif module in SPLIT_ON_COLUMNS:
            pieces = tensor.chunk(n_shards, dim=1)
        else:
            pieces = [tensor] * n_shards
        for shard, piece in zip(shards, pieces):
            shard[key] = piece.clone()
    for i, shard in enumerate(shards):
        shard["rope.freqs"] = torch.ones(8)             # Meta's buffer; readers must skip it
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")
    return folder


def hf_state_in_our_layout(hf_model, cfg):
    return dict(hf_tensor_to_ours(k, v, cfg) for k, v in hf_model.state_dict().items())


def no_leftovers(parent: Path, name: str) -> bool:
    """Neither the output folder nor a temporary folder for it exists."""
    return not any(p.name == name or p.name.startswith(f".{name}.") for p in parent.iterdir())


# ---- parity with transformers ---------------------------------------------------------------------

HF_SHAPES = {
    "mha-odd": dict(hidden=72, heads=6, kv_heads=6, intermediate=100, vocab=97),
    "gqa": dict(hidden=64, heads=8, kv_heads=2, intermediate=96, vocab=97),
}


@pytest.fixture(scope="module", params=sorted(HF_SHAPES))
def hf_model(request):
    return make_hf_llama(**HF_SHAPES[request.param])


@pytest.mark.parametrize("variant", ["safetensors", "sharded-safetensors", "bin", "sharded-bin"])
def test_hf_folder_converts_to_same_logits(hf_model, variant, tmp_path):
    hf_dir = tmp_path / "hf"
    if variant == "safetensors":
        hf_model.save_pretrained(hf_dir)
        assert (hf_dir / "model.safetensors").is_file()
    elif variant == "sharded-safetensors":
        hf_model.save_pretrained(hf_dir, max_shard_size="40KB")
        assert (hf_dir / "model.safetensors.index.json").is_file()
    elif variant == "bin":
        hf_model.save_pretrained(hf_dir, safe_serialization=False)
        assert (hf_dir / "pytorch_model.bin").is_file()
    else:
        hf_model.save_pretrained(hf_dir, safe_serialization=False, max_shard_size="40KB")
        assert (hf_dir / "pytorch_model.bin.index.json").is_file()
    assert detect_format(hf_dir) == "hf"

    summary = convert_checkpoint(hf_dir, tmp_path / "ours")
    assert summary["format"] == "hf"
    assert summary["num_parameters"] == sum(p.numel() for p in hf_model.parameters())
    model = load_model(tmp_path / "ours")
    assert_same_logits(model, hf_model, hf_model.config.vocab_size)
    # an HF folder also loads directly, without converting first
    assert_same_logits(load_model(hf_dir), hf_model, hf_model.config.vocab_size)


@pytest.mark.parametrize("n_kv_heads,n_shards", [(4, 1), (2, 2)])
def test_meta_checkpoint_converts_to_same_logits(tmp_path, n_kv_heads, n_shards):
    # dim 64 -> Meta's rule int(2*4*64/3) = 170, rounded up to a multiple of 16 = 176, so params.json
    # (which has no FFN size) describes the same model as the HF config with intermediate_size 176.
    vocab = 96
    hf = make_hf_llama(hidden=64, heads=4, kv_heads=n_kv_heads, intermediate=176, vocab=vocab)
    cfg = ModelConfig.from_hf_config(hf.config.to_dict())
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 16, "norm_eps": 1e-5, "vocab_size": -1}
    if n_kv_heads != 4:
        params["n_kv_heads"] = n_kv_heads
    meta_dir = write_meta_checkpoint(hf_state_in_our_layout(hf, cfg), params, tmp_path / "meta", n_shards)
    train_sentencepiece(meta_dir / "tokenizer.model", vocab)   # vocab_size -1 is read from here

    summary = convert_checkpoint(meta_dir, tmp_path / "ours")
    assert summary["format"] == "meta" and summary["tokenizer"]
    assert (tmp_path / "ours" / "tokenizer.model").read_bytes() == (meta_dir / "tokenizer.model").read_bytes()
    model = load_model(tmp_path / "ours")
    assert model.config.ffn_hidden_dim == 176 and model.config.vocab_size == vocab
    assert_same_logits(model, hf, vocab)


def test_convert_cli_prints_summary_and_casts(tmp_path, capsys):
    hf = make_hf_llama(hidden=32, heads=4, kv_heads=2, intermediate=48, vocab=50, layers=1)
    hf.save_pretrained(tmp_path / "hf")
    spec = importlib.util.spec_from_file_location("convert_checkpoint", REPO / "tools" / "convert_checkpoint.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "out"
    assert cli.main([str(tmp_path / "hf"), str(out), "--dtype", "bfloat16", "--max-shard-size", "10KB"]) == 0
    printed = capsys.readouterr().out
    assert "hf" in printed and "bfloat16" in printed and str(out) in printed
    assert f"{sum(p.numel() for p in hf.parameters()):,}" in printed
    assert (out / "model.safetensors.index.json").is_file()
    model = load_model(out)
    for key, tensor in hf_state_in_our_layout(hf, model.config).items():
        assert torch.equal(model.state_dict()[key], tensor.to(torch.bfloat16)), key
    # bad input exits 2 with a message, and leaves no output
    assert cli.main([str(tmp_path / "nothing-here"), str(tmp_path / "out2")]) == 2
    assert "not found" in capsys.readouterr().err and not (tmp_path / "out2").exists()


# ---- our folder: exact round trip -------------------------------------------------------------------

@pytest.mark.parametrize("max_shard_size", ["5GB", "20KB"])
def test_save_load_round_trip_is_exact(small_model, small_cfg, tmp_path, max_shard_size):
    tokenizer = train_sentencepiece(tmp_path / "sp.model", small_cfg.vocab_size)
    folder = save_model(small_model, small_cfg, tmp_path / "ckpt", tokenizer_path=tokenizer,
                        max_shard_size=max_shard_size)
    files = sorted(p.name for p in folder.iterdir())
    if max_shard_size == "5GB":
        assert files == ["config.json", "model.safetensors", "tokenizer.model"]
    else:
        assert "model.safetensors.index.json" in files and "model-00001-of-" in " ".join(files)
    loaded = load_model(folder)
    assert loaded.config == small_cfg
    assert not loaded.training
    original = small_model.state_dict()
    assert set(loaded.state_dict()) == set(original)
    for key, tensor in loaded.state_dict().items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, original[key]), key
    # saving again over the same folder is refused; with overwrite=True it replaces it cleanly
    with pytest.raises(CheckpointError, match="already exists.*--overwrite"):
        save_model(small_model.state_dict(), small_cfg, folder)
    save_model(small_model.state_dict(), small_cfg, folder, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert no_leftovers(tmp_path, "ckpt.tmp")


def test_dtype_on_save_and_on_load(small_model, small_cfg, tmp_path):
    save_model(small_model, small_cfg, tmp_path / "bf16", dtype=torch.bfloat16)
    loaded = load_model(tmp_path / "bf16")
    for key, tensor in small_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor.to(torch.bfloat16)), key
    save_model(small_model, small_cfg, tmp_path / "f32")
    half = load_model(tmp_path / "f32", dtype=torch.float16)
    for key, tensor in small_model.state_dict().items():
        assert torch.equal(half.state_dict()[key], tensor.to(torch.float16)), key


# ---- bad input: each a CheckpointError naming the file / key --------------------------------------

def test_folder_of_unknown_format(tmp_path):
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"not a checkpoint folder.*params\.json.*model_type"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="folder not found"):
        convert_checkpoint(tmp_path / "missing", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture
def meta_state(small_cfg):
    torch.manual_seed(0)
    return Transformer(small_cfg).state_dict()


META_PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 16, "norm_eps": 1e-5,
               "vocab_size": 97}


def test_meta_missing_shard(meta_state, tmp_path):
    meta = write_meta_checkpoint(meta_state, META_PARAMS, tmp_path / "meta", n_shards=4)
    (meta / "consolidated.01.pth").unlink()
    with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth is missing"):
        convert_checkpoint(meta, tmp_path / "out")
    assert no_leftovers(tmp_path, "out")


def test_meta_extra_shard(meta_state, tmp_path):
    meta = write_meta_checkpoint(meta_state, META_PARAMS, tmp_path / "meta", n_shards=2)
    shutil.copyfile(meta / "consolidated.01.pth", meta / "consolidated.02.pth")
    with pytest.raises(CheckpointError, match=r"3 shard.*consolidated\.02\.pth.*gives shape \(97, 96\).*implies \(97, 64\)"):
        convert_checkpoint(meta, tmp_path / "out")
    assert no_leftovers(tmp_path, "out")


def test_meta_norms_must_agree(meta_state, tmp_path):
    meta = write_meta_checkpoint(meta_state, META_PARAMS, tmp_path / "meta", n_shards=2)
    shard = torch.load(meta / "consolidated.01.pth", weights_only=True)
    shard["layers.1.ffn_norm.weight"] = shard["layers.1.ffn_norm.weight"] + 1
    torch.save(shard, meta / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth.*layers\.1\.ffn_norm\.weight.*replicated"):
        load_model(meta)


def test_meta_params_missing_key(meta_state, tmp_path):
    params = {k: v for k, v in META_PARAMS.items() if k != "n_layers"}
    meta = write_meta_checkpoint(meta_state, params, tmp_path / "meta", n_shards=1)
    with pytest.raises(CheckpointError, match=r"params\.json.*missing key 'n_layers'"):
        convert_checkpoint(meta, tmp_path / "out")


def test_meta_vocab_from_tokenizer(meta_state, tmp_path):
    meta = write_meta_checkpoint(meta_state, {**META_PARAMS, "vocab_size": -1}, tmp_path / "meta", n_shards=1)
    with pytest.raises(CheckpointError, match=r"params\.json.*vocab_size is -1.*no tokenizer\.model"):
        load_model(meta)
    train_sentencepiece(meta / "tokenizer.model", 97)
    assert load_model(meta).config.vocab_size == 97
    # a tokenizer that disagrees with the vocabulary params.json states
    train_sentencepiece(meta / "tokenizer.model", 90)
    (meta / "params.json").write_text(json.dumps(META_PARAMS))
    with pytest.raises(CheckpointError, match=r"tokenizer\.model.*90 pieces.*97"):
        convert_checkpoint(meta, tmp_path / "out")


def test_meta_unexpected_key(meta_state, tmp_path):
    meta_state = {**meta_state, "layers.0.attention.bias": torch.zeros(3)}
    meta = write_meta_checkpoint(meta_state, META_PARAMS, tmp_path / "meta", n_shards=1)
    with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth.*unexpected key 'layers\.0\.attention\.bias'"):
        load_model(meta)


def test_hf_index_names_missing_shard(tmp_path):
    hf = make_hf_llama(hidden=32, heads=4, kv_heads=4, intermediate=48, vocab=50, layers=1)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="10KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / "hf" / victim).unlink()
    with pytest.raises(CheckpointError, match=rf"index\.json: names shard '{victim}', which is missing"):
        convert_checkpoint(tmp_path / "hf", tmp_path / "out")
    assert no_leftovers(tmp_path, "out")


def test_hf_wrong_shape_names_file_and_key(tmp_path):
    hf = make_hf_llama(hidden=32, heads=4, kv_heads=4, intermediate=48, vocab=50, layers=1)
    hf.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "intermediate_size": 64}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: 'layers\.0\.feed_forward\.w2\.weight' has shape "
                                              r"\(32, 48\).*config\.json implies \(32, 64\)"):
        convert_checkpoint(tmp_path / "hf", tmp_path / "out")
    assert no_leftovers(tmp_path, "out")


def test_hf_config_missing_key(tmp_path):
    hf = make_hf_llama(hidden=32, heads=4, kv_heads=4, intermediate=48, vocab=50, layers=1)
    hf.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    del config["num_hidden_layers"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json.*missing key 'num_hidden_layers'"):
        load_model(tmp_path / "hf")


def test_ours_missing_unexpected_and_wrong_shape(small_model, small_cfg, tmp_path):
    from safetensors.torch import save_file
    folder = save_model(small_model, small_cfg, tmp_path / "ckpt")
    state = dict(small_model.state_dict())

    without = {k: v for k, v in state.items() if k != "layers.1.attention.wo.weight"}
    save_file(without, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing key\(s\) layers\.1\.attention\.wo\.weight"):
        load_model(folder)

    save_file({**state, "layers.0.lora_A": torch.zeros(2, 2)}, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected key 'layers\.0\.lora_A'"):
        load_model(folder)

    save_file({**state, "norm.weight": torch.ones(65)}, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: 'norm\.weight' has shape \(65,\)"):
        load_model(folder)

    with pytest.raises(CheckpointError, match="unexpected key 'extra'"):
        save_model({**state, "extra": torch.zeros(1)}, small_cfg, tmp_path / "other")
    assert no_leftovers(tmp_path, "other")


def test_truncated_files_name_the_file(small_model, small_cfg, tmp_path):
    folder = save_model(small_model, small_cfg, tmp_path / "ckpt")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: .*truncated or corrupt"):
        load_model(folder)
    (folder / "model.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: .*truncated or corrupt"):
        load_model(folder)

    meta = write_meta_checkpoint(small_model.state_dict(), META_PARAMS, tmp_path / "meta", n_shards=2)
    data = (meta / "consolidated.01.pth").read_bytes()
    (meta / "consolidated.01.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth: .*truncated or corrupt"):
        convert_checkpoint(meta, tmp_path / "out")
    assert no_leftovers(tmp_path, "out")


def test_tokenizer_must_match_vocab(small_model, small_cfg, tmp_path):
    wrong = train_sentencepiece(tmp_path / "sp.model", 90)
    with pytest.raises(CheckpointError, match=r"sp\.model: tokenizer has 90 pieces.*97"):
        save_model(small_model, small_cfg, tmp_path / "ckpt", tokenizer_path=wrong)
    folder = save_model(small_model, small_cfg, tmp_path / "ckpt")
    shutil.copyfile(wrong, folder / "tokenizer.model")
    with pytest.raises(CheckpointError, match=r"ckpt/tokenizer\.model: tokenizer has 90 pieces.*97"):
        load_model(folder)


def test_convert_refuses_existing_output(small_model, small_cfg, tmp_path):
    folder = save_model(small_model, small_cfg, tmp_path / "ckpt")
    (tmp_path / "out").mkdir()
    with pytest.raises(CheckpointError, match="out: output folder already exists"):
        convert_checkpoint(folder, tmp_path / "out")


def test_saved_folder_has_the_umask_permissions(small_model, small_cfg, tmp_path):
    """The folder is built under a private temp name, but the finished checkpoint gets the modes a plain
    mkdir / open would give under the umask (here 022: folder 755, files 644)."""
    import os
    old = os.umask(0o022)
    try:
        save_model(small_model, small_cfg, tmp_path / "ckpt", max_shard_size=10_000)
    finally:
        os.umask(old)
    assert (tmp_path / "ckpt").stat().st_mode & 0o777 == 0o755
    files = list((tmp_path / "ckpt").iterdir())
    assert len(files) > 2 and all(f.stat().st_mode & 0o777 == 0o644 for f in files)
