"""ModelConfig: the shape of a LLaMA-style decoder, with presets and readers for Meta / Hugging Face configs.

The feed-forward hidden size follows Meta's rule (llama/model.py):

    hidden = int(2 * (4 * dim) / 3)
    hidden = int(ffn_dim_multiplier * hidden)          # only when a multiplier is given
    hidden = multiple_of * ceil(hidden / multiple_of)

e.g. LLaMA-7B: dim 4096 -> 10922 -> rounded up to a multiple of 256 -> 11008.
A config read from Hugging Face carries `intermediate_size` explicitly; it is stored in `ffn_hidden_dim`
and then the rule is not applied.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .family_registry import FamilyError, get_family
from .fileio import read_json


class ConfigError(ValueError):
    """A config file or preset that cannot describe a model; the message names the file and key."""




@dataclass
class ModelConfig:
    family: str = "llama"                # which decoder: "llama" / "chatglm2" (model.py), "chatglm" (chatglm.py),
                                         # "bloom" (bloom.py): a registered Family (families.py)
    dim: int = 4096                      # model width d
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None     # grouped-query attention; None means n_heads (plain multi-head)
    vocab_size: int = 32000
    multiple_of: int = 256               # Meta's rounding for the FFN hidden size
    ffn_dim_multiplier: Optional[float] = None
    ffn_hidden_dim: Optional[int] = None  # filled from Meta's rule when None (BLOOM's check_config: 4 * dim)
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    qkv_bias: bool = False               # biases on wq/wk/wv (ChatGLM2; ChatGLM-6B's fused wqkv always has one)
    rotary_fraction: float = 1.0         # RoPE on the first rotary_fraction * head_dim dims of each head (ChatGLM2: 0.5)
    mask_id: Optional[int] = None        # ChatGLM-6B's [MASK], [gMASK] and <sop> ids: the model derives its 2D
    gmask_id: Optional[int] = None       #   positions and prefix-LM mask from them (chatglm.py)
    sop_id: Optional[int] = None

    def __post_init__(self):
        check_field_types(self)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads != 0:
            raise ConfigError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads != 0:
            raise ConfigError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.vocab_size <= 0:
            raise ConfigError(f"vocab_size must be positive, got {self.vocab_size}")
        try:
            family = get_family(self.family)
        except FamilyError as err:
            raise ConfigError(str(err)) from None
        family.check_config(self)          # the decoder's own fields (RoPE's even head_dim, BLOOM's MHA, ...)
        if self.ffn_hidden_dim is None:
            self.ffn_hidden_dim = meta_ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def rotary_dim(self) -> int:
        """How many leading dims of each query/key head RoPE rotates (the rest pass unrotated)."""
        return int(self.head_dim * self.rotary_fraction)

    @property
    def kv_dim(self) -> int:
        """Width of one layer's keys (or values): n_kv_heads * head_dim."""
        return self.n_kv_heads * self.head_dim

    # ---- presets -------------------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return cls(**{**PRESETS[name], **overrides})

    # ---- our own config.json -------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown keys {unknown}; expected some of {sorted(known)}")
        for key in ("dim", "n_layers", "n_heads", "vocab_size"):
            if key not in d:
                raise ConfigError(f"{source}: missing key {key!r}")
        try:
            return cls(**d)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path) -> "ModelConfig":
        return cls.from_dict(_read_json(path), source=str(path))

    # ---- Meta's params.json --------------------------------------------------------------------
    @classmethod
    def from_params_json(cls, path, vocab_size: Optional[int] = None) -> "ModelConfig":
        """Meta's params.json. Its vocab_size is -1 in the released files: then `vocab_size` (from the
        tokenizer) must be given."""
        params = _read_json(path)
        for key in ("dim", "n_layers", "n_heads", "norm_eps"):
            if key not in params:
                raise ConfigError(f"{path}: missing key {key!r} (a Meta params.json has dim, n_layers, "
                                  f"n_heads, multiple_of, norm_eps, vocab_size)")
        file_vocab = params.get("vocab_size", -1)
        if file_vocab is None or file_vocab <= 0:
            if vocab_size is None:
                raise ConfigError(f"{path}: vocab_size is {file_vocab}; pass the tokenizer's vocabulary size")
            file_vocab = vocab_size
        return cls(
            dim=params["dim"],
            n_layers=params["n_layers"],
            n_heads=params["n_heads"],
            n_kv_heads=params.get("n_kv_heads"),
            vocab_size=file_vocab,
            multiple_of=params.get("multiple_of", 256),
            ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
            norm_eps=params["norm_eps"],
            rope_theta=params.get("rope_theta", 10000.0),
            max_seq_len=params.get("max_seq_len", 2048),
        )

    def to_params_json(self) -> dict:
        """The inverse of from_params_json (used to write Meta-format checkpoints)."""
        params = {"dim": self.dim, "n_layers": self.n_layers, "n_heads": self.n_heads,
                  "multiple_of": self.multiple_of, "norm_eps": self.norm_eps, "vocab_size": self.vocab_size,
                  "rope_theta": self.rope_theta}
        if self.n_kv_heads != self.n_heads:
            params["n_kv_heads"] = self.n_kv_heads
        if self.ffn_dim_multiplier is not None:
            params["ffn_dim_multiplier"] = self.ffn_dim_multiplier
        return params

    # ---- Hugging Face config.json --------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, path_or_dict) -> "ModelConfig":
        if isinstance(path_or_dict, dict):
            hf, source = path_or_dict, "Hugging Face config"
        else:
            hf, source = _read_json(path_or_dict), str(path_or_dict)
        if hf.get("model_type") != "llama":
            raise ConfigError(f"{source}: model_type is {hf.get('model_type')!r}, expected 'llama'")
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
            if key not in hf:
                raise ConfigError(f"{source}: missing key {key!r}")
        if hf.get("rope_scaling"):
            raise ConfigError(f"{source}: rope_scaling {hf['rope_scaling']!r} is not supported (plain RoPE only)")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ConfigError(f"{source}: attention_bias/mlp_bias are not supported (LLaMA has no biases)")
        if hf.get("tie_word_embeddings"):
            raise ConfigError(f"{source}: tie_word_embeddings=true is not supported (LLaMA unties them)")
        head_dim = hf.get("head_dim")
        if head_dim is not None and head_dim != hf["hidden_size"] // hf["num_attention_heads"]:
            raise ConfigError(f"{source}: head_dim {head_dim} != hidden_size / num_attention_heads")
        return cls(
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads"),
            vocab_size=hf["vocab_size"],
            ffn_hidden_dim=hf["intermediate_size"],
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=hf.get("rope_theta", 10000.0),
            max_seq_len=hf.get("max_position_embeddings", 2048),
        )

    def fingerprint(self) -> dict:
        """The fields that decide weight shapes and numerics: an adapter trained on one base refuses a
        base whose fingerprint differs. (Adapters saved before `family` existed lack it: they are "llama".)"""
        return {k: v for k, v in self.to_dict().items() if k != "max_seq_len"}


_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}
POSITIVE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_hidden_dim",
                   "max_seq_len", "norm_eps", "rope_theta", "ffn_dim_multiplier")


def check_field_types(cfg) -> None:
    """Each field has its declared type (an int field takes no 4.0 and no "192"; bool is not an int) and the
    sizes are positive; ConfigError naming the field otherwise."""
    for f in dataclasses.fields(cfg):
        value, declared = getattr(cfg, f.name), str(f.type)
        optional = declared.startswith("Optional[")
        base = declared.removeprefix("Optional[").removesuffix("]") if optional else declared
        if base not in _TYPES or (optional and value is None):
            continue
        wrong = not isinstance(value, _TYPES[base]) or (base != "bool" and isinstance(value, bool))
        if wrong:
            raise ConfigError(f"ModelConfig.{f.name} must be {'an' if base == 'int' else 'a'} {base}"
                              f"{' or null' if optional else ''}, got {value!r} ({type(value).__name__})")
        if f.name in POSITIVE_FIELDS and not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"ModelConfig.{f.name} must be positive, got {value!r}")


def meta_ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float] = None) -> int:
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


def _read_json(path) -> dict:
    return read_json(path, ConfigError)


PRESETS = {
    # Meta LLaMA-1 shapes (params.json of the released 7B / 13B).
    "llama-7b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256, norm_eps=1e-6),
    "llama-13b": dict(dim=5120, n_layers=40, n_heads=40, vocab_size=32000, multiple_of=256, norm_eps=1e-6),
    # Chinese-LLaMA-7B: the 7B body with the vocabulary extended by Chinese pieces to 49953.
    "chinese-llama-7b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=49953, multiple_of=256, norm_eps=1e-6),
    # BigScience bloom-7b1 (its config.json): ALiBi, LayerNorm, GELU MLP of 4d, tied output; 7,069,016,064
    # parameters. multiple_of / rope_theta do not apply to BLOOM.
    "bloom-7b1": dict(family="bloom", dim=4096, n_layers=30, n_heads=32, vocab_size=250880,
                      ffn_hidden_dim=16384, norm_eps=1e-5, max_seq_len=2048),
    # The small model the package ships (minipeft/assets/tiny-llama) and the tests build at random.
    # ChatGLM2-6B (THUDM/chatglm2-6b config.json): multi-query attention with 2 groups, QKV bias, half rotary.
    "chatglm2-6b": dict(family="chatglm2", dim=4096, n_layers=28, n_heads=32, n_kv_heads=2, vocab_size=65024,
                        ffn_hidden_dim=13696, norm_eps=1e-5, qkv_bias=True, rotary_fraction=0.5, max_seq_len=32768),
    # ChatGLM-6B (THUDM/chatglm-6b config.json): 2D rotary, prefix-LM mask, GLM residuals, tied output.
    "chatglm-6b": dict(family="chatglm", dim=4096, n_layers=28, n_heads=32, vocab_size=130528, ffn_hidden_dim=16384,
                       norm_eps=1e-5, qkv_bias=True, mask_id=130000, gmask_id=130001, sop_id=130004),
    "tiny": dict(dim=192, n_layers=4, n_heads=6, n_kv_heads=3, vocab_size=4096, multiple_of=32,
                 norm_eps=1e-5, max_seq_len=512),
}
