"""(IA)^3, DoRA and the LoRA variants (rsLoRA, PiSSA, LoRA+) against Hugging Face peft on the same tiny random
transformers models: LLaMA (GQA, so q and k use different row permutations) and BLOOM (a fused query_key_value =
our wqkv). The same nonzero adapter values go into both; logits agree to 1e-6 of the largest logit, before and after
one AdamW step on the same batch, and after merging. PiSSA is initialised by each side from its own SVD: the
residual weights and s B A agree, and the step agrees because Adam is sign-equivariant (an SVD's signs are its
own). Then: identity at init, save/load round trips, merge/unmerge, the 7B counts against hand-derived numbers,
and the command-line flags."""

import copy

import pytest
import torch

from minipeft.checkpoint import unpermute_hf_rotary
from minipeft.config import ModelConfig
from minipeft.family_registry import build_model
from minipeft.peft import (DoRAConfig, IA3Config, LoRAConfig, PeftConfigError, apply_peft, closed_form_trainable,
                           export_lora_to_hf_peft, load_adapter, merge_lora, save_adapter)
from minipeft.train.config import peft_for_family

TOL = 1e-6
LLAMA_HF = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "w2": "mlp.down_proj"}
BLOOM_HF = {"wqkv": "self_attention.query_key_value", "w2": "mlp.dense_4h_to_h"}


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def llama():
    from helpers_peft import tiny_hf_pair
    hf, ours, cfg = tiny_hf_pair(n_layers=2)
    return hf, ours, torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def bloom():
    from helpers_bloom import tiny_bloom_pair
    hf, ours = tiny_bloom_pair()
    return hf, ours, torch.randint(4, 120, (2, 9), generator=torch.Generator().manual_seed(0))


def pair(request, family):
    """(hf model, our model, tokens, {our target: HF module path}, blocks of peft's model)."""
    hf, ours, tokens = request.getfixturevalue(family)
    return copy.deepcopy(hf), copy.deepcopy(ours), tokens, LLAMA_HF if family == "llama" else BLOOM_HF


def hf_blocks(peft_model):
    inner = peft_model.base_model.model
    return inner.model.layers if hasattr(inner, "model") else inner.transformer.h


def to_ours_rows(tensor, target, cfg):
    """An HF tensor whose first dim is a projection's output rows -> our (Meta) row order (q/k of LLaMA only)."""
    heads = {"wq": cfg.n_heads, "wk": cfg.n_kv_heads}.get(target) if cfg.family == "llama" else None
    if heads is None:
        return tensor
    flat = tensor.reshape(tensor.shape[0], -1)
    return unpermute_hf_rotary(flat, heads).reshape(tensor.shape)


# ---- how each method's peft config and adapter values are set on both sides --------------------------------
def make_peft(method, targets_hf):
    from peft import IA3Config as HFIA3, LoraConfig
    ff = [t for t in targets_hf if t.endswith(("down_proj", "dense_4h_to_h"))]
    return {"ia3": lambda: HFIA3(target_modules=targets_hf, feedforward_modules=ff),
            "dora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=targets_hf, use_dora=True),
            "rslora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=targets_hf, use_rslora=True),
            "pissa": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=targets_hf, init_lora_weights="pissa"),
            }[method]()


def make_ours(method, targets):
    return {"ia3": lambda: IA3Config(targets=targets, feedforward=("w2",)),
            "dora": lambda: DoRAConfig(rank=4, alpha=8, targets=targets),
            "rslora": lambda: LoRAConfig(rank=4, alpha=8, targets=targets, rslora=True),
            "pissa": lambda: LoRAConfig(rank=4, alpha=8, targets=targets, init="pissa")}[method]()


@torch.no_grad()
def copy_random_values(method, peft_model, mine, names, seed=5):
    """Random nonzero adapter values set in peft's modules and the same values (rows reordered) in ours."""
    g = torch.Generator().manual_seed(seed)
    cfg = mine.base.config
    for i, block in enumerate(mine.base.layers):
        for ours_name, hf_path in names.items():
            theirs = hf_blocks(peft_model)[i].get_submodule(hf_path)
            module = getattr(block.attention if ours_name.startswith("wq") or ours_name in ("wk", "wv")
                             else block.feed_forward, ours_name)
            if method == "ia3":
                vector = theirs.ia3_l["default"]
                vector.copy_(1 + 0.3 * torch.randn(vector.shape, generator=g))
                flat = vector.flatten()
                module.ia3_scale.copy_(flat if module.scales_input else to_ours_rows(flat, ours_name, cfg))
                continue
            A, B = theirs.lora_A["default"].weight, theirs.lora_B["default"].weight
            A.copy_(0.1 * torch.randn(A.shape, generator=g))
            B.copy_(0.1 * torch.randn(B.shape, generator=g))
            module.lora_A.copy_(A)
            module.lora_B.copy_(to_ours_rows(B, ours_name, cfg))
            if method == "dora":
                m = theirs.lora_magnitude_vector["default"].weight
                m.mul_(1 + 0.2 * torch.randn(m.shape, generator=g))
                module.lora_magnitude.copy_(to_ours_rows(m, ours_name, cfg))


@torch.no_grad()
def spread_spectra(hf, ours, names, seed=7):
    """Give every target weight singular values 2 * 0.8^i (HF's and ours the same matrix, rows reordered): a
    random matrix has near-ties (gaps of 1e-3) where a float32 SVD of the row-permuted copy picks a slightly
    different top-r subspace (errors ~ eps / gap), while a trained weight's spectrum decays, as PiSSA assumes."""
    g = torch.Generator().manual_seed(seed)
    blocks = hf.model.layers if hasattr(hf, "model") else hf.transformer.h
    for i, block in enumerate(ours.layers):
        for ours_name, hf_path in names.items():
            theirs = blocks[i].get_submodule(hf_path).weight                          # (d_out, d_in)
            k = min(theirs.shape)
            left = torch.linalg.qr(torch.randn(theirs.shape[0], k, generator=g))[0]
            right = torch.linalg.qr(torch.randn(theirs.shape[1], k, generator=g))[0]
            theirs.copy_(left @ torch.diag(2 * 0.8 ** torch.arange(k, dtype=torch.float32)) @ right.T)
            mine = getattr(block.attention if ours_name != "w2" else block.feed_forward, ours_name).weight
            mine.copy_(to_ours_rows(theirs, ours_name, ours.config))


def adam_step(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    loss.backward()
    optimizer.step()


def targets_for(family):
    return ("wq", "wk", "wv", "w2") if family == "llama" else ("wqkv", "w2")


@pytest.mark.parametrize("family", ["llama", "bloom"])
@pytest.mark.parametrize("method", ["ia3", "dora", "rslora", "pissa"])
def test_matches_peft_on_logits_after_a_step_and_merged(request, family, method):
    from peft import get_peft_model
    hf, ours, tokens, names = pair(request, family)
    targets = targets_for(family)
    if method == "ia3":
        targets = tuple(t for t in targets if t != "wq")          # the paper's k, v and MLP (all of wqkv on BLOOM)
    names = {t: names[t] for t in targets}
    if method == "pissa":
        spread_spectra(hf, ours, names)
    base_logits = ours(tokens)
    peft_model = get_peft_model(hf, make_peft(method, [p.rsplit(".", 1)[-1] for p in names.values()])).eval()
    mine = apply_peft(ours, make_ours(method, targets)).eval()
    if method == "pissa":                       # each side from its own SVD: the residual and s B A agree
        for i, block in enumerate(mine.base.layers):
            for ours_name, hf_path in names.items():
                theirs = hf_blocks(peft_model)[i].get_submodule(hf_path)
                module = getattr(block.attention if ours_name != "w2" else block.feed_forward, ours_name)
                residual = to_ours_rows(theirs.base_layer.weight, ours_name, mine.base.config)
                delta = to_ours_rows(theirs.get_delta_weight("default"), ours_name, mine.base.config)
                scale = torch.linalg.matrix_norm(delta, ord=2)     # ||W0||_2: an SVD is exact to eps ||W0||_2
                if ours_name in ("wq", "wk"):                      # an SVD of the row-permuted matrix: rounding
                    assert (module.weight - residual).abs().max() < TOL * scale
                    assert (module.delta_weight() - delta).abs().max() < TOL * scale
                else:                                              # the same matrix: the same bits
                    assert torch.equal(module.weight, residual) and torch.equal(module.delta_weight(), delta)
        assert relative_error(mine(tokens), base_logits) < TOL                    # the model starts as the base
    else:
        copy_random_values(method, peft_model, mine, names)
    theirs = peft_model(input_ids=tokens).logits
    assert relative_error(mine(tokens), theirs) < TOL
    if method != "pissa":
        assert relative_error(base_logits, theirs) > 1e-3                        # the adapter values matter

    loss_ours, loss_theirs = mine.loss(tokens, tokens), peft_model(input_ids=tokens, labels=tokens).loss
    assert abs(loss_ours.item() - loss_theirs.item()) < TOL * abs(loss_theirs.item())
    adam_step(mine, loss_ours)
    adam_step(peft_model, loss_theirs)
    with torch.no_grad():
        theirs = peft_model(input_ids=tokens).logits
        assert relative_error(mine(tokens), theirs) < TOL
        merged_theirs = peft_model.merge_and_unload()(input_ids=tokens).logits     # every method here merges
        assert relative_error(merge_lora(mine)(tokens), merged_theirs) < TOL
        assert relative_error(merged_theirs, theirs) < 1e-5                       # (merging rounds differently)


def test_identity_at_init_and_the_inits_are_peft_s(llama):
    """(IA)^3's ones and DoRA's m = ||W0||_row give the base's logits bit for bit; DoRA's m is peft's (rows)."""
    from peft import LoraConfig, get_peft_model
    hf, ours, tokens = llama
    base_logits = ours(tokens)
    for config in (IA3Config(), DoRAConfig(rank=4, targets=("wq", "wk", "wv", "w2"))):
        model = apply_peft(copy.deepcopy(ours), config).eval()
        assert torch.equal(model(tokens), base_logits), config
    peft_model = get_peft_model(copy.deepcopy(hf), LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                              target_modules=["k_proj"]))
    mine = apply_peft(copy.deepcopy(ours), DoRAConfig(rank=4, alpha=8, targets=("wk",)))
    for i, block in enumerate(mine.base.layers):
        theirs = hf_blocks(peft_model)[i].self_attn.k_proj.lora_magnitude_vector["default"].weight
        expected = to_ours_rows(theirs.detach(), "wk", mine.base.config)
        torch.testing.assert_close(block.attention.wk.lora_magnitude.detach(), expected, rtol=1e-6, atol=0)
        torch.testing.assert_close(expected, torch.linalg.norm(block.attention.wk.weight, dim=1), rtol=1e-6, atol=0)


def test_lora_plus_groups_and_step_match_peft(llama):
    """LoRA+: our param_groups put exactly the B matrices at ratio x lr, as peft's create_loraplus_optimizer; one
    step of each gives the same logits."""
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer
    hf, ours, tokens = llama
    peft_model = get_peft_model(copy.deepcopy(hf), LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"]))
    mine = apply_peft(copy.deepcopy(ours), LoRAConfig(rank=4, alpha=8, targets=("wv",), lora_plus_ratio=16.0))
    copy_random_values("lora", peft_model, mine, {"wv": LLAMA_HF["wv"]})
    groups = mine.param_groups(1e-3)
    names = {id(p): n for n, p in mine.named_parameters()}
    by_lr = {g["lr"]: sorted(names[id(p)] for p in g["params"]) for g in groups}
    assert sorted(by_lr) == [1e-3, 16e-3] and all(n.endswith("lora_B") for n in by_lr[16e-3])
    assert all(n.endswith("lora_A") for n in by_lr[1e-3]) and len(by_lr[16e-3]) == mine.base.config.n_layers
    theirs_opt = create_loraplus_optimizer(peft_model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0)
    ours_opt = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.0)
    for model, optimizer, loss in ((mine, ours_opt, mine.loss(tokens, tokens)),
                                   (peft_model, theirs_opt, peft_model(input_ids=tokens, labels=tokens).loss)):
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        assert relative_error(mine(tokens), peft_model(input_ids=tokens).logits) < TOL


def test_rslora_export_loads_into_peft_and_pissa_export_is_refused(llama, tmp_path):
    from peft import PeftModel
    hf, ours, tokens = llama
    mine = apply_peft(copy.deepcopy(ours), LoRAConfig(rank=4, alpha=8, targets=("wq", "wv"), rslora=True)).eval()
    assert mine.base.layers[0].attention.wq.scaling == 8 / 2                    # alpha / sqrt(r)
    with torch.no_grad():
        for p in mine.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    loaded = PeftModel.from_pretrained(copy.deepcopy(hf), str(export_lora_to_hf_peft(mine, tmp_path / "rs"))).eval()
    with torch.no_grad():
        assert relative_error(mine(tokens), loaded(input_ids=tokens).logits) < TOL
    pissa = apply_peft(copy.deepcopy(ours), LoRAConfig(rank=4, init="pissa"))
    with pytest.raises(PeftConfigError, match="PiSSA adapter"):
        export_lora_to_hf_peft(pissa, tmp_path / "pissa")


@pytest.mark.parametrize("config", [IA3Config(), DoRAConfig(rank=4, targets=("wq", "wv", "w2"), rslora=True),
                                    LoRAConfig(rank=4, targets=("wq", "wv"), init="pissa")],
                         ids=["ia3", "dora", "pissa"])
def test_save_load_round_trip_and_merge_unmerge(llama, tmp_path, config):
    """A trained adapter reloads onto the original base with the same logits (PiSSA recomputes its residual from
    the original weights: the same bits on one machine); each module's merge() then unmerge() restores W0."""
    _, ours, tokens = llama
    model = apply_peft(copy.deepcopy(ours), config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(1 + 0.2 * torch.randn_like(p)).add_(0.05 * torch.randn_like(p))
        trained = model(tokens)
    loaded = load_adapter(copy.deepcopy(ours), save_adapter(model, tmp_path / "adapter"))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(tokens), trained)
        modules = [m for m in model.base.modules() if hasattr(m, "adapter_params")]
        before = [m.weight.detach().clone() for m in modules]
        for m in modules:
            m.merge()
        assert relative_error(model(tokens), trained) < TOL
        for m, weight in zip(modules, before):
            m.unmerge()
            assert relative_error(m.weight, weight) < TOL
        assert relative_error(model(tokens), trained) < TOL


def test_7b_counts_against_hand_derived_numbers():
    """LLaMA-7B: (IA)^3 32 * (4096 + 4096 + 11008) = 614,400; DoRA r 8 on wq, wv = LoRA's 4,194,304 + 32 * 2 * 4096
    magnitudes = 4,456,448. BLOOM-7B1's (IA)^3 on wqkv (3 * 4096) and w2's input (16384): 30 * 28,672 = 860,160."""
    cases = [("llama-7b", IA3Config(), 614_400), ("llama-7b", DoRAConfig(rank=8, alpha=16), 4_456_448),
             ("bloom-7b1", peft_for_family(IA3Config(), "bloom"), 860_160)]
    for name, config, expected in cases:
        cfg = ModelConfig.from_name(name)
        assert closed_form_trainable(cfg, config) == expected
        with torch.device("meta"):
            assert apply_peft(build_model(cfg), config, trainable_dtype=None).report.trainable == expected


def test_configs_and_flags_refuse_bad_values():
    from minipeft.train import build_arg_parser, config_from_args
    args = build_arg_parser().parse_args(["--method", "lora", "--lora-rslora", "--lora-init", "pissa",
                                          "--lora-plus-ratio", "16"])
    assert config_from_args(args).peft == LoRAConfig(rslora=True, init="pissa", lora_plus_ratio=16.0)
    args = build_arg_parser().parse_args(["--method", "ia3", "--ia3-targets", "wv,w2", "--ia3-feedforward", "w2"])
    assert config_from_args(args).peft == IA3Config(targets=("wv", "w2"), feedforward=("w2",))
    assert peft_for_family(DoRAConfig(), "bloom").targets == ("wqkv",)
    for make, message in ((lambda: LoRAConfig(init="svd"), "LoRAConfig.init must be one of"),
                          (lambda: DoRAConfig(lora_plus_ratio=0), "DoRAConfig.lora_plus_ratio must be"),
                          (lambda: LoRAConfig(rslora="yes"), "LoRAConfig.rslora must be"),
                          (lambda: IA3Config(feedforward=("w1",)), "IA3Config.feedforward: \\['w1'\\] are not")):
        with pytest.raises(PeftConfigError, match=message):
            make()
