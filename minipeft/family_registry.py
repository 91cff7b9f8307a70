"""The model families minipeft knows, each declared once as a `Family` record (the twin of the PEFT method
registry, peft/registry.py). Everything that differs between families is a field here; no other module tests
`cfg.family == "..."`: it asks the record.

    family = get_family(cfg.family)
    model = build_model(cfg)                                  # family.decoder(cfg)
    tokenizer = tokenizer_for(cfg.family, "tokenizer.model")  # family.tokenizer(path)

A record (the built-in four are in families.py; a new family registers its own from anywhere, e.g. a plugin):
    name                      ModelConfig.family
    decoder                   the nn.Module class built from a ModelConfig: the common forward signature, cache
                              layout and attention seam (families.py's docstring)
    tokenizer                 the tokenizer class, called with the tokenizer file's path
    prompt_format             how an Alpaca record is rendered for this family (prompts.PromptFormat)
    check_config              ModelConfig -> None: the decoder's own checks of the config fields (and the defaults
                              only it knows, e.g. BLOOM's 4 d MLP); ModelConfig.__post_init__ calls it
    qkv_layout                where the attention's q/k/v projections live (attention_seam.QKVLayout: wq, wk, wv
                              or one fused wqkv, per head [q, k, v]); it decides `default_lora_targets`, what
                              LoRAConfig's default ("wq", "wv": query and value) means here (wqkv when fused)
    tokenizer_may_be_smaller  may the embedding have more rows than the tokenizer has pieces (padded vocabularies)?
    hf                        reading a Hugging Face folder of this family (checkpoint.readers.HFFamily), or None
    hf_names                  our module names in a Hugging Face model, both ways, for peft adapters out and in
                              (peft/hf_export.py, peft/hf_import.py: HFNames), or None
    hf_export                 writing a whole model as a Hugging Face folder (checkpoint.hf_export_model.
                              HFModelLayout), or None
    formulas                  the closed forms memory.py evaluates (FamilyFormulas), or None (then counted on the
                              meta device)

This module is at the bottom of the package (it imports only attention_seam and tokenizer's error), so the config, the checkpoint
readers, the data pipeline and memory.py can all look families up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from .attention_seam import SEPARATE_QKV, QKVLayout
from .tokenizer import TokenizerError


class FamilyError(ValueError):
    """An unknown family, or a family record that cannot work; the message names what was given."""


@dataclass(frozen=True)
class FamilyFormulas:
    """A family's closed forms (memory.py holds the built-in ones; lessons 07 and 08 derive them)."""
    linear_shapes: Callable             # cfg -> {Linear name LoRA may target: (d_in, d_out)}
    gated_mlp: bool                     # SwiGLU (three f-wide tensors kept) or a plain GELU MLP (one or two)
    position_bytes_per_token: Callable  # cfg -> bytes: the rotary table (4 hd) or the ALiBi bias (2 H)
    parameter_count: Optional[Callable] = None   # cfg -> {"embedding", "output", "blocks", "norms"} (memory adds
                                                 # "total"); None: counted on the meta device


@dataclass(frozen=True)
class HFNames:
    """How our module names and tensors map onto a Hugging Face model's (the model export's layout), so peft's
    adapter files can be written and read (peft/hf_export.py, peft/hf_import.py)."""
    module_to_hf: Callable             # "layers.0.attention.wq" -> "model.layers.0.self_attn.q_proj" (a module of
                                       # ours may be a row block of a fused HF module: ChatGLM2's w1 ; w3)
    lora_b_to_hf: Callable = None      # (module name, lora_B (d_out, r), cfg) -> rows as transformers orders them
    lora_b_from_hf: Callable = None    # its inverse
    hf_to_modules: Callable = None     # (HF module name, cfg) -> [(our module, its rows or None for all)], in row
                                       # order; may accept more than one naming (the original code's too)
    key_vectors_to_hf: Callable = None    # prefix keys (..., hd) in our order -> the HF model's (a rotary permutation)
    key_vectors_from_hf: Callable = None  # its inverse
    model_type: str = ""               # the transformers model_type of the exported folder (peft's configs name it)


def _no_checks(cfg) -> None:
    return None


@dataclass(frozen=True)
class Family:
    name: str
    decoder: type
    tokenizer: Callable
    prompt_format: object
    check_config: Callable = _no_checks
    qkv_layout: QKVLayout = SEPARATE_QKV
    tokenizer_may_be_smaller: bool = False
    hf: Optional[object] = None
    hf_names: Optional[HFNames] = None
    hf_export: Optional[object] = None
    formulas: Optional[FamilyFormulas] = None

    @property
    def default_lora_targets(self) -> Tuple[str, ...]:
        """The query and value projections, which LoRA targets by default (Hu et al.; peft's default)."""
        return ("wqkv",) if self.qkv_layout.fused else ("wq", "wv")


FAMILIES: Dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add a family (its name must be new). From then on ModelConfig(family=name) is valid and build_model,
    load_model, the tokenizer, the data pipeline and every PEFT method work on it."""
    if not isinstance(family, Family):
        raise FamilyError(f"register_family takes a Family record, got {type(family).__name__}")
    if family.name in FAMILIES:
        raise FamilyError(f"a model family named {family.name!r} is already registered")
    if not isinstance(family.decoder, type):
        raise FamilyError(f"register_family({family.name!r}): decoder must be a class (built as decoder(cfg))")
    for needed in ("tokenizer", "check_config"):
        if not callable(getattr(family, needed)):
            raise FamilyError(f"register_family({family.name!r}): {needed} must be callable")
    if not hasattr(family.prompt_format, "render"):
        raise FamilyError(f"register_family({family.name!r}): prompt_format needs render(instruction, input) "
                          f"(a prompts.PromptFormat)")
    FAMILIES[family.name] = family
    return family


def unregister_family(name: str) -> None:
    """Remove a family (for tests that register a toy one)."""
    FAMILIES.pop(name, None)


def get_family(name: str, source: str = "family") -> Family:
    if name not in FAMILIES:
        raise FamilyError(f"{source} {name!r}: expected one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def build_model(cfg):
    """The decoder of cfg.family, built from cfg (on the current default device; under torch.device("meta"):
    shapes only, no memory, as load_model does)."""
    return get_family(cfg.family).decoder(cfg)


def decoder_classes() -> Tuple[type, ...]:
    """The classes a model built by build_model can have (for isinstance checks)."""
    return tuple(dict.fromkeys(family.decoder for family in FAMILIES.values()))


def is_decoder(model) -> bool:
    return isinstance(model, decoder_classes())


def tokenizer_for(family: str, model_path):
    """The tokenizer of a model family on its file (LLaMA: SentencePiece tokenizer.model; BLOOM: tokenizer.json)."""
    if family not in FAMILIES:
        raise TokenizerError(f"no tokenizer for family {family!r}; expected one of {', '.join(FAMILIES)}")
    return FAMILIES[family].tokenizer(model_path)


def family_of_tokenizer(tokenizer) -> Family:
    """The family a tokenizer belongs to (its `family` attribute; a tokenizer without one is LLaMA's)."""
    return get_family(getattr(tokenizer, "family", "llama"), source="tokenizer family")


def hf_readers() -> Dict[str, object]:
    """transformers model_type -> how to read such a folder (checkpoint.readers.HFFamily), over every family
    that has one (ChatGLM-6B and ChatGLM2 share the model_type "chatglm" and its reader)."""
    readers = {}
    for family in FAMILIES.values():
        if family.hf is not None:
            readers.setdefault(family.hf.model_type, family.hf)
    return readers
