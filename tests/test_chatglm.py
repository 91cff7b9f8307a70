"""ChatGLM-6B: a random tiny checkpoint in the original's layout, converted, against a float64 reference written
from the formulas (tests/helpers_chatglm.py); cached generation against the no-cache one; the 6B count; bad folders."""

import json

import pytest
import torch

from helpers_chatglm import EOP, GMASK, MASK, PAD, SOP, chatglm_v1_folder, reference_logits
from minipeft import ModelConfig
from minipeft.chatglm import GLM_ALPHA, glm_position_ids
from minipeft.checkpoint import CheckpointError, convert_checkpoint, load_model
from minipeft.checkpoint.hf_chatglm import pairs_to_rotate_half, rotate_half_to_pairs
from minipeft.families import build_model
from minipeft.generate import generate
from helpers_generate import greedy_without_cache  # noqa: E402

# context [gMASK] <sop> response: rows of different lengths (one uses [MASK] instead of [gMASK])
ROWS = [[5, 17, 42, 8, GMASK, SOP, 33, 9, 61],
        [7, 70, GMASK, SOP, 12],
        [11, 4, MASK, 6, SOP, 30, 31]]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chatglm")
    folder, config, state = chatglm_v1_folder(tmp)
    convert_checkpoint(folder, tmp / "ours")
    return tmp / "ours", config, state


def left_pad(rows):
    T = max(len(r) for r in rows)
    tokens = torch.full((len(rows), T), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, T - len(r):], mask[i, T - len(r):] = torch.tensor(r), 1
    return tokens, mask


def test_chatglm_6b_preset_parameter_count():
    with torch.device("meta"):
        model = build_model(ModelConfig.from_name("chatglm-6b"))
    assert model.num_parameters() == 6_173_286_400
    assert not hasattr(model, "output")                     # tied: the embedding is the output layer


def test_alpha_is_the_original_codes_not_the_papers():
    assert GLM_ALPHA == pytest.approx(56 ** 0.5)            # fixed at 28 layers' value, whatever the layer count


def test_position_ids_follow_the_original_rule():
    pos = glm_position_ids(torch.tensor([ROWS[0]]), ModelConfig(family="chatglm", dim=64, n_layers=1, n_heads=4,
                                                                vocab_size=120, gmask_id=GMASK, sop_id=SOP, mask_id=MASK))
    assert pos[0, 0].tolist() == [0, 1, 2, 3, 4, 4, 4, 4, 4]
    assert pos[0, 1].tolist() == [0, 0, 0, 0, 0, 1, 2, 3, 4]


def test_permutation_round_trip():
    w = torch.randn(3 * 4 * 16, 5)
    assert torch.equal(pairs_to_rotate_half(rotate_half_to_pairs(w, 4), 4), w)


def test_matches_float64_reference_one_row_at_a_time(converted):
    folder, config, state = converted
    model = load_model(folder, dtype=torch.float64)
    for row in ROWS:
        with torch.no_grad():
            got = model(torch.tensor([row]))[0]
        want = reference_logits(state, config, row)
        assert (got - want).abs().max().item() < 1e-6


def test_left_padded_batch_matches_reference(converted):
    folder, config, state = converted
    tokens, mask = left_pad(ROWS)
    for dtype, tol in ((torch.float64, 1e-6), (torch.float32, 1e-4)):
        model = load_model(folder, dtype=dtype)
        with torch.no_grad():
            logits = model(tokens, attention_mask=mask)
        for i, row in enumerate(ROWS):
            got = logits[i, tokens.shape[1] - len(row):].double()
            assert (got - reference_logits(state, config, row)).abs().max().item() < tol


def test_cached_generation_equals_no_cache(converted):
    folder, _, _ = converted
    model = load_model(folder)
    prompts = [[5, 17, 42, 8, GMASK, SOP], [7, 70, GMASK, SOP]]
    cached = generate(model, prompts, max_new_tokens=6)
    for prompt, new in zip(prompts, cached):
        assert new == greedy_without_cache(model, prompt, 6)


def test_bad_chatglm_folders(tmp_path):
    folder, config, _ = chatglm_v1_folder(tmp_path)
    no_2d = {k: v for k, v in config.items() if k != "position_encoding_2d"}
    cases = [(no_2d, "position_encoding_2d"), ({**config, "position_encoding_2d": False}, "position_encoding_2d"),
             ({**config, "quantization_bit": 4}, "quantization_bit"), ({**config, "pre_seq_len": 8}, "pre_seq_len")]
    for i, (bad, needle) in enumerate(cases):
        (folder / "config.json").write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=needle) as err:
            convert_checkpoint(folder, tmp_path / f"out{i}")
        assert "config.json" in str(err.value) and "\n" not in str(err.value)
        assert not (tmp_path / f"out{i}").exists()


def test_forward_refuses_ambiguous_positions(converted):
    model = load_model(converted[0])
    _, cache = model(torch.tensor([ROWS[1]]), use_cache=True)
    with pytest.raises(ValueError, match="position_ids"):
        model(torch.tensor([[EOP]]), past_key_values=cache)
    with pytest.raises(ValueError, match=r"\(1, 2, 1\)"):
        model(torch.tensor([[EOP]]), past_key_values=cache, position_ids=torch.tensor([[4]]))


def test_folder_with_ice_text_converts_and_generates_through_the_tool(tmp_path, capsys):
    """A ChatGLM-6B folder with its ice_text.model: converted (the tokenizer comes along as tokenizer.model),
    then tools/generate.py --alpaca renders the ChatGLM prompt and stops at <eop>."""
    import importlib.util
    import shutil
    from pathlib import Path

    import sentencepiece as spm
    from helpers_chatglm import train_chatglm_sentencepiece
    from minipeft.families import get_family
    from minipeft.families import tokenizer_for

    sp_path = train_chatglm_sentencepiece(tmp_path / "sp", version=1)
    sp = spm.SentencePieceProcessor(model_file=sp_path)
    ids = {p: sp.piece_to_id(p) for p in ("[MASK]", "[gMASK]", "<sop>", "<eop>")}
    folder, config, _ = chatglm_v1_folder(tmp_path, vocab_size=sp.vocab_size() + 8)
    config.update(mask_token_id=ids["[MASK]"], gmask_token_id=ids["[gMASK]"], bos_token_id=ids["<sop>"],
                  eos_token_id=ids["<eop>"])
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copyfile(sp_path, folder / "ice_text.model")
    summary = convert_checkpoint(folder, tmp_path / "ours")
    assert summary["tokenizer"] and (tmp_path / "ours" / "tokenizer.model").is_file()

    model = load_model(tmp_path / "ours")
    tok = tokenizer_for("chatglm", tmp_path / "ours" / "tokenizer.model")
    prompt = tok.encode(get_family("chatglm").prompt_format.render("你好"), bos=True)
    assert prompt[-2:] == [ids["[gMASK]"], ids["<sop>"]]
    want = tok.decode(generate(model, [prompt], max_new_tokens=5, eos_id=tok.eos_id)[0])

    tool = Path(__file__).resolve().parents[1] / "tools" / "generate.py"
    spec = importlib.util.spec_from_file_location("generate_tool", tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([str(tmp_path / "ours"), "--prompt", "你好", "--alpaca", "--max-new-tokens", "5",
                        "--device", "cpu"]) == 0
    assert want in capsys.readouterr().out
