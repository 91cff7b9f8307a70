"""The training loop: plain PyTorch on CPU / one GPU, or a DeepSpeed engine built from a JSON config.

One optimizer step s (0-based) of a run with accumulation A, micro-batch size b and W ranks:

    for a in 0..A-1:   micro-batch m = s*A + a  (on each rank: b examples of its share of the epoch order)
        loss_m = mean over the label tokens of the micro-batch of  -log p(label_{t+1} | tokens_{<=t})
        grad  += d(loss_m / A) / d(theta)            (theta = the trainable parameters only)
    grad       <- grad * min(1, max_grad_norm / ||grad||_2)                                  (clipping)
    theta      <- AdamW(theta, grad, lr_s)           betas (0.9, 0.999), eps 1e-8, decoupled weight decay
    lr_s        = lr * (s + 1) / warmup                                               for s < warmup
                = lr * (r + (1 - r) * (1 + cos(pi * (s - warmup) / (total - warmup))) / 2)    after
                  (r = min_lr_ratio)

Precision: fp32; bf16 (autocast, on CPU too; parameters stay fp32); fp16 (autocast + GradScaler: the loss
is multiplied by a scale S before backward, the gradients divided by S before clipping, and a step whose
gradients overflow (inf/nan) is skipped while S is halved).

Data order: the training examples of epoch e are visited in `epoch_order(n, seed, e)`, rank r of W taking
positions r, r+W, ...; micro-batch m is batch (m mod batches_per_epoch) of epoch m // batches_per_epoch.
So the whole data stream is a function of (seed, step) and a resumed run replays it exactly.

Checkpoints (every --save-every steps, temp file + rename): the trainable parameters, optimizer, scheduler,
grad scaler, step, and the RNG states (CPU, CUDA, Python), so that on CPU a run stopped after N steps and
resumed is bit-identical to one that never stopped. Under DeepSpeed the engine's own checkpoint is used
(engine.save_checkpoint / load_checkpoint, frozen parameters excluded).

DeepSpeed (--deepspeed CONFIG.json): "auto" values in the config are filled from the command line
(micro batch, accumulation, train batch = micro * accumulation * world size, lr, weight decay, clipping,
fp16/bf16, scheduler steps); a fixed value that contradicts the command line stops the run before any work.
DeepSpeed owns accumulation (engine.backward / engine.step after every micro-batch), clipping and loss
scaling. Under ZeRO-3 the base is built already partitioned and filled from the checkpoint tensor by tensor
(load_base_partitioned), so no rank ever holds the whole model. The final adapter is gathered on all ranks
(the fp32 master copy of each trainable parameter, full size, also under ZeRO-3) and written by rank 0.

Output in the run folder: train_config.json, metrics.jsonl (one JSON object per line: training steps and
evaluations), checkpoints/, and adapter/ (save_adapter; for "full" a complete checkpoint folder).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .data import (AlpacaEncoder, DataError, Example, Record, causal_lm_loss, collate, epoch_order, load_tokenized,
                   read_records, train_val_split)

METHODS = ("full", "lora", "prompt", "prefix", "adapter", "llama_adapter")

# Default peak learning rates per method for a real LLaMA base, the usual values at 7B: Alpaca's 2e-5 for full
# fine-tuning, alpaca-lora's 3e-4 for LoRA (the same for Houlsby adapters), the LLaMA-Adapter paper's 9e-3,
# 3e-2 for prompt tuning and 1e-2 for prefix tuning. Methods that train few parameters need larger rates.
METHOD_DEFAULT_LR = {"full": 2e-5, "lora": 3e-4, "prompt": 3e-2, "prefix": 1e-2, "adapter": 3e-4,
                     "llama_adapter": 9e-3}

# For the shipped tiny model (tools/finetune.py with no --model): the rates lessons/08_comparison's sweep
# chose on the demo tasks; LoRA's is the main job's (6e-3: validation loss 2.32 vs 2.96 at 2e-3).
TINY_MODEL_LR = {"full": 1e-3, "lora": 6e-3, "prompt": 1e-1, "prefix": 3e-3, "adapter": 1e-2, "llama_adapter": 0.27}

# Values that a DeepSpeed config may fix; None in TrainConfig means "not given on the command line".
RUN_DEFAULTS = {"batch_size": 8, "grad_accum": 1, "weight_decay": 0.0, "max_grad_norm": 1.0, "precision": "fp32"}


class TrainError(ValueError):
    """A training setup that cannot work (bad flag value, a DeepSpeed config contradicting the command line,
    a checkpoint of another run); the message names the flag, key or file."""


@dataclass
class TrainConfig:
    # data
    train_data: Optional[str] = None      # Alpaca JSON / JSON Lines, or a tokenized file from prepare_data.py
    val_data: Optional[str] = None        # None: a seeded split of train_data (val_fraction)
    val_fraction: float = 0.1
    max_seq_len: int = 256
    train_on_prompt: bool = False
    strict_data: bool = False
    # model
    model: Optional[str] = None           # our checkpoint folder; None = the shipped tiny model
    tokenizer: Optional[str] = None       # default: <model>/tokenizer.model
    # method and its hyper-parameters
    method: str = "lora"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: Tuple[str, ...] = ("wq", "wv")
    prompt_len: int = 20
    prompt_init: str = "vocab"
    prompt_init_text: Optional[str] = None
    prefix_len: int = 10
    prefix_hidden: Optional[int] = 512    # 0 / None: train the prefix directly (no reparameterisation)
    adapter_bottleneck: int = 64
    llama_adapter_len: int = 10
    llama_adapter_layers: Optional[int] = None
    llama_adapter_gate: str = "tanh"
    trainable_embeddings: bool = False    # also train tok_embeddings and output in full (after a vocab extension)
    base_dtype: str = "auto"              # frozen base weights: auto = float32 for fp32, else the half dtype
    # optimisation (None = not given: the default, or the DeepSpeed config's value)
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    batch_size: Optional[int] = None
    grad_accum: Optional[int] = None
    max_grad_norm: Optional[float] = None
    precision: Optional[str] = None
    epochs: float = 3.0
    max_steps: Optional[int] = None
    warmup_ratio: float = 0.05
    warmup_steps: Optional[int] = None
    min_lr_ratio: float = 0.0
    gradient_checkpointing: bool = False
    seed: int = 0
    device: Optional[str] = None          # default: cuda if available, else cpu
    # evaluation, logging, checkpoints
    out: Optional[str] = None             # run folder; default runs/<method>-<timestamp>
    eval_every: int = 0                   # 0: evaluate only at the end
    eval_batch_size: int = 16
    exact_match: bool = True              # greedy generation on the validation records at each evaluation
    save_every: int = 0                   # 0: no periodic checkpoints
    keep_checkpoints: int = 2
    resume: Optional[str] = None          # a checkpoint file, or a run folder (its latest checkpoint)
    progress: bool = True
    deepspeed: Optional[str] = None       # DeepSpeed JSON config
    local_rank: Optional[int] = None      # set by the deepspeed launcher

    def filled(self) -> "TrainConfig":
        """A copy with the defaults in place of the values not given."""
        values = {k: v for k, v in RUN_DEFAULTS.items() if getattr(self, k) is None}
        if self.lr is None:
            values["lr"] = METHOD_DEFAULT_LR[self.method]
        return dataclasses.replace(self, **values)


def check_config(cfg: TrainConfig) -> None:
    """Flag values that cannot work -> TrainError before anything is loaded."""
    def need(condition, message):
        if not condition:
            raise TrainError(message)
    need(cfg.method in METHODS, f"--method {cfg.method!r}: expected one of {', '.join(METHODS)}")
    need(cfg.precision in (None, "fp32", "bf16", "fp16"), f"--precision {cfg.precision!r}: expected fp32, bf16 or fp16")
    for name in ("batch_size", "grad_accum", "max_seq_len", "lora_rank", "prompt_len", "prefix_len",
                 "adapter_bottleneck", "llama_adapter_len", "eval_batch_size"):
        value = getattr(cfg, name)
        need(value is None or value >= 1, f"--{name.replace('_', '-')} must be >= 1, got {value}")
    need(cfg.max_steps is None or cfg.max_steps >= 1, f"--max-steps must be >= 1, got {cfg.max_steps}")
    need(cfg.epochs > 0, f"--epochs must be > 0, got {cfg.epochs}")
    need(cfg.lr is None or cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}")
    need(0.0 <= cfg.lora_dropout < 1.0, f"--lora-dropout must be in [0, 1), got {cfg.lora_dropout}")
    need(0.0 <= cfg.warmup_ratio < 1.0, f"--warmup-ratio must be in [0, 1), got {cfg.warmup_ratio}")
    need(0.0 <= cfg.min_lr_ratio <= 1.0, f"--min-lr-ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    need(cfg.save_every >= 0 and cfg.eval_every >= 0, "--save-every and --eval-every must be >= 0")
    need(cfg.prompt_init in ("random", "vocab", "text"), f"--prompt-init {cfg.prompt_init!r}: expected random, vocab or text")
    need(cfg.prompt_init != "text" or cfg.prompt_init_text, "--prompt-init text needs --prompt-init-text")
    need(cfg.base_dtype in BASE_DTYPES, f"--base-dtype {cfg.base_dtype!r}: expected one of {', '.join(BASE_DTYPES)}")
    need(cfg.llama_adapter_gate in ("tanh", "plain"), f"--llama-adapter-gate {cfg.llama_adapter_gate!r}: expected tanh or plain")
    for name in ("train_data", "val_data", "deepspeed"):
        path = getattr(cfg, name)
        need(path is None or Path(path).is_file(), f"--{name.replace('_', '-')} {path}: file not found")


BASE_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def base_dtype(cfg: TrainConfig) -> torch.dtype:
    """The dtype the frozen base weights are loaded in. "auto": float32 for fp32 training, else the
    precision's half dtype, so a 7B base takes 2 bytes per parameter. Trainable parameters are always kept
    in float32 (see Trainer), which autocast and the fp16 loss scaler need."""
    if cfg.base_dtype != "auto":
        return BASE_DTYPES[cfg.base_dtype]
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision, torch.float32)


def peft_config_from(cfg: TrainConfig):
    """The method's config dataclass from the flags."""
    config = _method_config(cfg)
    if cfg.trainable_embeddings:
        config = dataclasses.replace(config, extra_trainable=("tok_embeddings", "output"))
    return config


def _method_config(cfg: TrainConfig):
    from .peft import (AdapterConfig, FullConfig, LlamaAdapterConfig, LoRAConfig, PrefixConfig, PromptConfig)
    if cfg.method == "full":
        return FullConfig()
    if cfg.method == "lora":
        return LoRAConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                          targets=tuple(cfg.lora_targets))
    if cfg.method == "prompt":
        return PromptConfig(prompt_len=cfg.prompt_len, init=cfg.prompt_init, init_text=cfg.prompt_init_text)
    if cfg.method == "prefix":
        return PrefixConfig(prefix_len=cfg.prefix_len, reparam_hidden=cfg.prefix_hidden or None)
    if cfg.method == "adapter":
        return AdapterConfig(bottleneck=cfg.adapter_bottleneck)
    if cfg.method == "llama_adapter":
        return LlamaAdapterConfig(prompt_len=cfg.llama_adapter_len, adapter_layers=cfg.llama_adapter_layers,
                                  gate=cfg.llama_adapter_gate)
    raise TrainError(f"unknown method {cfg.method!r}")


# ---- pieces of the loop --------------------------------------------------------------------------
def lr_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based): linear warm-up, then cosine decay."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return min_lr_ratio + (1.0 - min_lr_ratio) * cosine


def autocast(device: torch.device, precision: str):
    """torch.autocast for bf16 / fp16 (parameters stay in their dtype), nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def batch_loss(model, batch: Dict[str, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    """Loss of one collated batch. The attention mask is not passed: padding is on the right, so causal
    masking already hides every padding key from every real token, and padding has label -100."""
    logits = model(batch["input_ids"])                                                # (B, T, V)
    return causal_lm_loss(logits, batch["labels"], reduction=reduction)


@torch.no_grad()
def evaluate_loss(model, examples: Sequence[Example], *, batch_size: int, pad_id: int, device,
                  precision: str = "fp32") -> float:
    """Mean next-token loss over all label tokens of `examples` (token-weighted, not batch-weighted)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start:start + batch_size], pad_id).items()}
        with autocast(device, precision):
            total += batch_loss(model, batch, reduction="sum").item()
        count += int((batch["labels"][:, 1:] != -100).sum())
    model.train(was_training)
    return total / max(1, count)


@torch.no_grad()
def exact_match(model, tokenizer, records: Sequence[Record], *, batch_size: int = 16, device="cpu",
                precision: str = "fp32", max_new_tokens: Optional[int] = None) -> Tuple[float, List[str]]:
    """Greedy-generate each record's response from its prompt; accuracy = share of records whose generated
    text (up to EOS, spaces at both ends stripped) equals the expected output (stripped). Returns
    (accuracy, generated texts). max_new_tokens defaults to the longest expected output's tokens + 1."""
    from .generate import generate
    if not records:
        return 0.0, []
    device = torch.device(device)
    if max_new_tokens is None:
        max_new_tokens = max(len(tokenizer.encode(r.output, bos=False)) for r in records) + 1
    was_training = model.training
    model.eval()
    texts = []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        prompts = [tokenizer.encode(r.prompt, bos=True) for r in chunk]
        with autocast(device, precision):
            new = generate(model, prompts, max_new_tokens, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
        for ids in new:
            if tokenizer.eos_id in ids:
                ids = ids[:ids.index(tokenizer.eos_id)]
            texts.append(tokenizer.decode(ids))
    model.train(was_training)
    correct = sum(t.strip() == r.output.strip() for t, r in zip(texts, records))
    return correct / len(records), texts


# ---- data ----------------------------------------------------------------------------------------
@dataclass
class RunData:
    train: List[Example]
    val: List[Example]
    val_records: List[Record] = field(default_factory=list)   # empty for tokenized files (no exact match)
    report: List[str] = field(default_factory=list)           # lines saying what was read, cut, skipped


def _read_examples(path, encoder: AlpacaEncoder, strict: bool, report: List[str]):
    """A data file -> (examples, records or None). Tokenized files (prepare_data.py) are used as written."""
    with open(path, encoding="utf-8") as f:
        first = f.readline()
    if '"minipeft_tokenized"' in first:
        examples, header = load_tokenized(path)
        if header.get("max_seq_len", 0) > encoder.max_seq_len:
            examples = [e for e in examples if len(e.input_ids) <= encoder.max_seq_len]
        report.append(f"{path}: {len(examples)} tokenized examples")
        return examples, None
    records, problems = read_records(path, strict=strict)
    for problem in problems:
        report.append(f"{path}: skipped {problem}")
    return records, problems


def load_run_data(cfg: TrainConfig, tokenizer) -> RunData:
    encoder = AlpacaEncoder(tokenizer, cfg.max_seq_len, train_on_prompt=cfg.train_on_prompt)
    report: List[str] = []

    def encode(records, name):
        examples, stats = encoder.encode_all(records)
        report.append(f"{name}: {stats.summary()}")
        if stats.dropped_indices:
            report.append(f"{name}: dropped records (too long for --max-seq-len {cfg.max_seq_len}): "
                          f"{stats.dropped_indices[:20]}")
        return examples

    train_items, train_problems = _read_examples(cfg.train_data, encoder, cfg.strict_data, report)
    train_is_records = train_problems is not None
    if cfg.val_data is not None:
        val_items, val_problems = _read_examples(cfg.val_data, encoder, cfg.strict_data, report)
        val_is_records = val_problems is not None
    else:
        train_items, val_items = train_val_split(train_items, cfg.val_fraction, cfg.seed)
        val_is_records = train_is_records
    train = encode(train_items, "train") if train_is_records else train_items
    val = encode(val_items, "validation") if val_is_records else val_items
    if not train:
        raise DataError(f"{cfg.train_data}: no usable training examples")
    return RunData(train=train, val=val, val_records=list(val_items) if val_is_records else [], report=report)


# ---- DeepSpeed configuration ---------------------------------------------------------------------
# (path in the DeepSpeed config, TrainConfig field) pairs that "auto" fills and that must agree otherwise
DS_LINKED_VALUES = [
    (("train_micro_batch_size_per_gpu",), "batch_size"),
    (("gradient_accumulation_steps",), "grad_accum"),
    (("gradient_clipping",), "max_grad_norm"),
    (("optimizer", "params", "lr"), "lr"),
    (("optimizer", "params", "weight_decay"), "weight_decay"),
]
FLAG_NAMES = {"batch_size": "--batch-size", "grad_accum": "--grad-accum", "max_grad_norm": "--max-grad-norm",
              "lr": "--lr", "weight_decay": "--weight-decay", "precision": "--precision"}


def load_deepspeed_config(path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise TrainError(f"--deepspeed {path}: file not found") from None
    except json.JSONDecodeError as err:
        raise TrainError(f"--deepspeed {path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise TrainError(f"--deepspeed {path}: expected a JSON object")
    return data


def _get(d: dict, path):
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _set(d: dict, path, value) -> None:
    for key in path[:-1]:
        d = d.setdefault(key, {})
    d[path[-1]] = value


def resolve_deepspeed_config(ds: dict, cfg: TrainConfig, world_size: int, source: str = "DeepSpeed config"
                             ) -> Tuple[dict, TrainConfig]:
    """Fill the config's "auto" values from the command line and the command line's missing values from
    the config. A fixed config value that differs from a value given on the command line, or a fixed
    train_batch_size != micro * accumulation * world size, raises TrainError. Returns (config, filled cfg)."""
    ds = json.loads(json.dumps(ds))                                                  # a deep copy
    taken = {}
    for path, name in DS_LINKED_VALUES:
        fixed = _get(ds, path)
        given = getattr(cfg, name)
        if fixed is None or fixed == "auto":
            continue
        if given is not None and float(given) != float(fixed):
            raise TrainError(f"{source}: {'.'.join(path)} is {fixed} but {FLAG_NAMES[name]} is {given}; "
                             f"make them agree, or set {'.'.join(path)} to \"auto\"")
        taken[name] = type(RUN_DEFAULTS.get(name, 1.0))(fixed) if name != "lr" else float(fixed)
    fp16_on, bf16_on = _get(ds, ("fp16", "enabled")), _get(ds, ("bf16", "enabled"))
    fixed_precision = "fp16" if fp16_on is True else "bf16" if bf16_on is True else None
    if fixed_precision and cfg.precision is not None and cfg.precision != fixed_precision:
        raise TrainError(f"{source}: {fixed_precision}.enabled is true but --precision is {cfg.precision}")
    if fixed_precision:
        taken["precision"] = fixed_precision
    cfg = dataclasses.replace(cfg, **taken).filled()

    for path, name in DS_LINKED_VALUES:
        if _get(ds, path) == "auto" or (path[-1] in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
                                        and _get(ds, path) is None):
            _set(ds, path, getattr(cfg, name))
    for key in ("fp16", "bf16"):
        if _get(ds, (key, "enabled")) in ("auto", None) and (key in ds or cfg.precision == key):
            _set(ds, (key, "enabled"), cfg.precision == key)
    expected = cfg.batch_size * cfg.grad_accum * world_size
    train_batch = ds.get("train_batch_size", "auto")
    if train_batch == "auto":
        ds["train_batch_size"] = expected
    elif int(train_batch) != expected:
        raise TrainError(f"{source}: train_batch_size is {train_batch} but micro batch {cfg.batch_size} x "
                         f"gradient accumulation {cfg.grad_accum} x world size {world_size} = {expected}; "
                         "set train_batch_size to \"auto\" or make them agree")
    return ds, cfg


def fill_deepspeed_schedule(ds: dict, cfg: TrainConfig, total_steps: int, warmup_steps: int,
                            source: str = "DeepSpeed config") -> dict:
    """Fill "auto" in a config scheduler's params, then refuse any "auto" left that this script does not fill."""
    params = _get(ds, ("scheduler", "params")) or {}
    fills = {"warmup_num_steps": warmup_steps, "total_num_steps": total_steps, "warmup_max_lr": cfg.lr,
             "warmup_min_lr": 0.0, "cos_min_ratio": cfg.min_lr_ratio, "warmup_min_ratio": 0.0}
    for key, value in params.items():
        if value == "auto" and key in fills:
            params[key] = fills[key]

    def find_auto(d, prefix=""):
        for key, value in d.items():
            if isinstance(value, dict):
                yield from find_auto(value, f"{prefix}{key}.")
            elif value == "auto":
                yield prefix + key
    left = list(find_auto(ds))
    if left:
        raise TrainError(f"{source}: \"auto\" at {left} is not a value this script fills; give a number")
    return ds


def init_distributed_for_deepspeed() -> None:
    """Start the process group for DeepSpeed: NCCL with CUDA, gloo on CPU (with DeepSpeed's shared-memory
    op switched off, so nothing compiles). Without a launcher, sets up a world of one process."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as dist
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        deepspeed.init_distributed()
    else:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="gloo")


def world_info() -> Tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) without one."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ---- the trainer ---------------------------------------------------------------------------------
class Trainer:
    """Builds the PEFT model, optimizer and schedule (or a DeepSpeed engine) and runs the loop.

        trainer = Trainer(cfg, base_model, tokenizer, data); trainer.train(); trainer.save_final()
    """

    def __init__(self, cfg: TrainConfig, base_model, tokenizer, data: RunData, ds_config: Optional[dict] = None):
        from .peft import apply_peft
        self.cfg = cfg = cfg.filled()
        self.tokenizer, self.data = tokenizer, data
        self.pad_id = tokenizer.pad_id if tokenizer is not None else 0
        self.rank, self.world_size = world_info()
        self.is_main = self.rank == 0
        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and cfg.deepspeed is not None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg.method)

        # The method's random init (LoRA A, a soft prompt, a prefix MLP) depends on the seed only.
        torch.manual_seed(cfg.seed)
        self.model = apply_peft(base_model, peft_config_from(cfg), tokenizer=tokenizer,
                                generator=torch.Generator().manual_seed(cfg.seed)).to(self.device)
        self.model.gradient_checkpointing = cfg.gradient_checkpointing
        self.trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        for _, p in self.trainable:      # fp32 trainables beside a half-precision frozen base (mixed precision)
            if not hasattr(p, "ds_id"):  # (a ZeRO-3 partitioned parameter holds only a shard: left as it is)
                p.data = p.data.float()

        # Data stream: each rank's share of an epoch, cut to equal lengths so all ranks step together.
        self.examples_per_rank = len(data.train) // self.world_size
        if self.examples_per_rank == 0:
            raise TrainError(f"{len(data.train)} training examples cannot be shared by {self.world_size} ranks")
        self.batches_per_epoch = math.ceil(self.examples_per_rank / cfg.batch_size)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.batches_per_epoch / cfg.grad_accum))
        self.warmup_steps = (cfg.warmup_steps if cfg.warmup_steps is not None
                             else round(cfg.warmup_ratio * self.total_steps))
        self.step = 0
        self._order_cache: Tuple[int, List[int]] = (-1, [])

        schedule = lambda s: lr_factor(s, self.total_steps, self.warmup_steps, cfg.min_lr_ratio)  # noqa: E731
        self.engine = None
        if cfg.deepspeed is not None:
            self._build_engine(ds_config, schedule)
        else:
            self.optimizer = torch.optim.AdamW([p for _, p in self.trainable], lr=cfg.lr, betas=(0.9, 0.999),
                                               eps=1e-8, weight_decay=cfg.weight_decay)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
            self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.forward_model = self.engine if self.engine is not None else self.model
        self.skipped_steps = 0

    # -- DeepSpeed
    def _build_engine(self, ds_config: dict, schedule) -> None:
        import deepspeed
        ds_config = fill_deepspeed_schedule(dict(ds_config), self.cfg, self.total_steps, self.warmup_steps,
                                            source=f"--deepspeed {self.cfg.deepspeed}")
        params = [p for _, p in self.trainable]
        optimizer = None
        if "optimizer" not in ds_config:       # a client AdamW (torch's: nothing to compile)
            optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                                          weight_decay=self.cfg.weight_decay)
            ds_config.setdefault("zero_force_ds_cpu_optimizer", False)
        half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.cfg.precision)
        if half is not None and any(hasattr(p, "ds_id") for p in self.model.parameters()):
            # DeepSpeed casts a model to its half dtype only when no part of it came from zero.Init; with a
            # partitioned base (already in `half`), cast the method's new parameters as it would have.
            for p in self.model.parameters():
                if not hasattr(p, "ds_id"):
                    p.data = p.data.to(half)
        client_scheduler = None
        if "scheduler" not in ds_config:       # our warm-up + cosine, built on DeepSpeed's optimizer
            client_scheduler = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule)  # noqa: E731
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model, model_parameters=params, optimizer=optimizer, lr_scheduler=client_scheduler,
            config=ds_config)
        self.ds_config = ds_config
        self.scaler = None

    # -- data
    def micro_batch(self, micro_index: int) -> Dict[str, torch.Tensor]:
        """Micro-batch number micro_index of this rank's data stream (see the module docstring)."""
        epoch, position = divmod(micro_index, self.batches_per_epoch)
        if self._order_cache[0] != epoch:
            order = epoch_order(len(self.data.train), self.cfg.seed, epoch)
            mine = order[self.rank::self.world_size][:self.examples_per_rank]
            self._order_cache = (epoch, mine)
        mine = self._order_cache[1]
        chosen = mine[position * self.cfg.batch_size:(position + 1) * self.cfg.batch_size]
        batch = collate([self.data.train[i] for i in chosen], self.pad_id)
        return {k: v.to(self.device) for k, v in batch.items()}

    # -- one optimizer step
    def train_step(self) -> dict:
        """A accumulated micro-batches and one optimizer update. Returns this step's metrics."""
        cfg = self.cfg
        self.forward_model.train()
        lr = self.optimizer.param_groups[0]["lr"]           # the lr this step uses
        losses, tokens = [], 0
        for a in range(cfg.grad_accum):
            batch = self.micro_batch(self.step * cfg.grad_accum + a)
            tokens += int(batch["attention_mask"].sum())
            if self.engine is not None:
                loss = batch_loss(self.engine, batch)
                self.engine.backward(loss)        # DeepSpeed scales by 1/accumulation and owns the step
                self.engine.step()
            else:
                with autocast(self.device, cfg.precision):
                    loss = batch_loss(self.model, batch)
                self.scaler.scale(loss / cfg.grad_accum).backward()
            losses.append(loss.item())

        if self.engine is not None:
            grad_norm = self.engine.get_global_grad_norm()
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            skipped = bool(getattr(self.engine, "skipped_steps", 0) > self.skipped_steps)
            self.skipped_steps = getattr(self.engine, "skipped_steps", 0)
        else:
            self.scaler.unscale_(self.optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_([p for _, p in self.trainable], cfg.max_grad_norm))
            scale_before = self.scaler.get_scale()
            self.scaler.step(self.optimizer)      # skipped when the gradients overflowed
            self.scaler.update()
            skipped = self.scaler.is_enabled() and self.scaler.get_scale() < scale_before
            self.optimizer.zero_grad(set_to_none=True)
            if not skipped:                       # as DeepSpeed does: a skipped update does not advance the lr
                self.scheduler.step()
            self.skipped_steps += int(skipped)
        self.step += 1
        loss = sum(losses) / len(losses)
        if self.world_size > 1:                   # the mean over ranks, for the log
            import torch.distributed as dist
            both = torch.tensor([loss, float(tokens)], dtype=torch.float64)
            dist.all_reduce(both)
            loss, tokens = both[0].item() / self.world_size, int(both[1].item())
        return {"step": self.step, "epoch": round(self.step * cfg.grad_accum / self.batches_per_epoch, 4),
                "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens, "skipped": skipped}

    # -- evaluation
    def evaluate(self, with_exact_match: Optional[bool] = None) -> dict:
        """Validation loss (and exact-match accuracy by greedy generation) with the current weights."""
        result = {"step": self.step}
        if not self.data.val:
            return result
        result["val_loss"] = evaluate_loss(self.forward_model, self.data.val, batch_size=self.cfg.eval_batch_size,
                                           pad_id=self.pad_id, device=self.device, precision=self._eval_precision())
        use_em = self.cfg.exact_match if with_exact_match is None else with_exact_match
        if use_em and self.data.val_records and self.tokenizer is not None:
            accuracy, texts = exact_match(self.forward_model, self.tokenizer, self.data.val_records,
                                          batch_size=self.cfg.eval_batch_size, device=self.device,
                                          precision=self._eval_precision())
            result["exact_match"] = accuracy
            self.last_generations = texts
        return result

    def _eval_precision(self) -> str:
        return "fp32" if self.engine is not None else self.cfg.precision   # DeepSpeed casts the model itself

    # -- the loop
    def train(self) -> List[dict]:
        """Run from self.step to total_steps; returns the metrics of every step."""
        from tqdm import tqdm
        cfg = self.cfg
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            _write_json_atomic(self.run_dir / "train_config.json", dataclasses.asdict(cfg))
        history = []
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (self.is_main and cfg.progress),
                   desc=f"{cfg.method}", unit="step", dynamic_ncols=True)
        while self.step < self.total_steps:
            started = time.perf_counter()
            metrics = self.train_step()
            metrics["tokens_per_s"] = metrics["tokens"] / max(1e-9, time.perf_counter() - started)
            history.append(metrics)
            self.log(metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                self.log({"eval": True, **self.evaluate()})
            if cfg.save_every and self.step % cfg.save_every == 0:
                self.save_checkpoint()
        bar.close()
        return history

    def log(self, metrics: dict) -> None:
        if not self.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(metrics) + "\n")

    # -- checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def _run_identity(self) -> dict:
        """The settings a checkpoint must share with the run that resumes it."""
        keys = ("method", "seed", "batch_size", "grad_accum", "max_seq_len", "lora_rank", "lora_targets",
                "prompt_len", "prefix_len", "prefix_hidden", "adapter_bottleneck", "llama_adapter_len",
                "llama_adapter_layers")
        identity = {k: getattr(self.cfg, k) for k in keys}
        identity["lora_targets"] = list(identity["lora_targets"])
        identity["world_size"] = self.world_size
        identity["train_examples"] = len(self.data.train)
        return identity

    def save_checkpoint(self) -> Path:
        """Write the resumable state of step self.step (temp file + rename); keeps the newest keep_checkpoints."""
        if self.engine is not None:
            tag = f"step-{self.step:06d}"
            self.engine.save_checkpoint(str(self.checkpoint_dir / "deepspeed"), tag=tag,
                                        client_state={"step": self.step, "identity": self._run_identity()},
                                        exclude_frozen_parameters=True)
            return self.checkpoint_dir / "deepspeed" / tag
        state = {
            "step": self.step,
            "identity": self._run_identity(),
            "trainable": {n: p.detach().cpu().clone() for n, p in self.trainable},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "skipped_steps": self.skipped_steps,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        path = self.checkpoint_dir / f"step-{self.step:06d}.pt"
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, path)
        for old in sorted(self.checkpoint_dir.glob("step-*.pt"))[:-self.cfg.keep_checkpoints]:
            old.unlink()
        return path

    def resume(self, where) -> None:
        """Continue from a checkpoint file, or the newest checkpoint of a run folder."""
        where = Path(where)
        if self.engine is not None:
            folder = where / "checkpoints" / "deepspeed" if (where / "checkpoints").is_dir() else where
            if not (folder / "latest").is_file():
                raise TrainError(f"--resume {where}: no DeepSpeed checkpoint (expected {folder}/latest)")
            _, client = self.engine.load_checkpoint(str(folder), load_module_strict=False)
            self._check_identity(client.get("identity", {}), str(folder))
            self.step = client["step"]
            return
        path = where
        if where.is_dir():
            candidates = sorted((where / "checkpoints").glob("step-*.pt")) or sorted(where.glob("step-*.pt"))
            if not candidates:
                raise TrainError(f"--resume {where}: no checkpoints (step-*.pt) in {where}/checkpoints")
            path = candidates[-1]
        if not path.is_file():
            raise TrainError(f"--resume {where}: file not found")
        state = torch.load(path, map_location="cpu", weights_only=False)
        self._check_identity(state["identity"], str(path))
        params = dict(self.trainable)
        if set(params) != set(state["trainable"]):
            raise TrainError(f"{path}: its trainable parameters are not this run's")
        with torch.no_grad():
            for name, tensor in state["trainable"].items():
                params[name].copy_(tensor)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.skipped_steps = state["skipped_steps"]
        self.step = state["step"]
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    def _check_identity(self, saved: dict, source: str) -> None:
        mine = self._run_identity()
        for key in sorted(set(saved) | set(mine)):
            if saved.get(key) != mine.get(key):
                raise TrainError(f"{source}: checkpoint has {key} = {saved.get(key)!r} but this run has "
                                 f"{mine.get(key)!r}; resume with the same settings")

    # -- the final adapter
    def full_trainable_state(self) -> Dict[str, torch.Tensor]:
        """name -> the complete fp32 value of each trainable parameter (DeepSpeed's master copy when there is
        one: not the bf16/fp16 working copy, and never a ZeRO shard). A collective: every rank calls it."""
        if self.engine is None:
            return {n: p.detach() for n, p in self.trainable}
        from deepspeed.utils import safe_get_full_fp32_param
        state = {}
        for name, p in self.trainable:
            full = safe_get_full_fp32_param(p)            # all-gathers the shards (ZeRO-1/2/3)
            state[name] = (full if full is not None else p.detach()).detach().float().cpu().clone()
        return state

    def save_final(self, folder: Optional[Path] = None) -> Path:
        """save_adapter into run_dir/adapter (for "full": a complete checkpoint folder). Under DeepSpeed every
        rank takes part in gathering; rank 0 writes the complete tensors."""
        from .peft import save_adapter
        folder = Path(folder) if folder is not None else self.run_dir / "adapter"
        if self.engine is None:
            save_adapter(self.model, folder)
            return folder
        import deepspeed
        import torch.distributed as dist
        masters = self.full_trainable_state()
        needed = list(self.model.parameters()) if self.cfg.method == "full" else [p for _, p in self.trainable]
        gathered = (deepspeed.zero.GatheredParameters(needed, modifier_rank=None)
                    if self.engine.zero_optimization_stage() == 3 else contextlib.nullcontext())
        with gathered:                                    # parameters are complete (not shards) inside
            if self.is_main:
                working = {}
                try:
                    for name, p in self.trainable:        # write the fp32 masters, not the working copies
                        working[name] = p.data
                        p.data = masters[name].to(p.device)
                    save_adapter(self.model, folder)
                finally:
                    for name, p in self.trainable:
                        if name in working:
                            p.data = working[name]
        dist.barrier()
        return folder


def default_run_dir(method: str) -> Path:
    return Path("runs") / f"{method}-{time.strftime('%Y%m%d-%H%M%S')}"


def _write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


# ---- command line --------------------------------------------------------------------------------
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" only where there is a fixed default (None means "per method / from the config")."""
    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="finetune.py",
        description="Fine-tune a minipeft model with one PEFT method (plain PyTorch, or DeepSpeed with --deepspeed). "
                    "With no arguments: LoRA on the shipped tiny model and demo data, showing validation loss, "
                    "exact-match accuracy and generations before and after.",
        formatter_class=_HelpFormatter)
    d = TrainConfig()
    g = p.add_argument_group("data")
    g.add_argument("--train-data", help="Alpaca JSON list / JSON Lines, or a tokenized file from prepare_data.py "
                   "(default: the shipped demo_data/train.json)")
    g.add_argument("--val-data", help="validation file (default: demo_data/heldout.json with the default train "
                   "data, else a seeded --val-fraction split of the training file)")
    g.add_argument("--val-fraction", type=float, default=d.val_fraction, help="validation share when no --val-data")
    g.add_argument("--max-seq-len", type=int, default=d.max_seq_len,
                   help="tokens per example; longer ones lose the start of the prompt first, then the end of the response")
    g.add_argument("--train-on-prompt", action="store_true", help="also train on the prompt tokens (default: only the response)")
    g.add_argument("--strict-data", action="store_true", help="stop at the first malformed record instead of skipping it")
    g = p.add_argument_group("model")
    g.add_argument("--model", help="our checkpoint folder (default: the shipped tiny-llama)")
    g.add_argument("--tokenizer", help="SentencePiece model (default: <model>/tokenizer.model)")
    g.add_argument("--base-dtype", default=d.base_dtype, choices=tuple(BASE_DTYPES),
                   help="dtype of the frozen base weights; auto: float32 with --precision fp32, else bf16/fp16 "
                   "to match (trainable parameters stay float32)")
    g = p.add_argument_group("method")
    g.add_argument("--method", default=d.method, choices=METHODS, help="what to train")
    g.add_argument("--lora-rank", type=int, default=d.lora_rank, help="LoRA rank r")
    g.add_argument("--lora-alpha", type=float, default=d.lora_alpha, help="LoRA scale numerator (scale = alpha / r)")
    g.add_argument("--lora-dropout", type=float, default=d.lora_dropout, help="dropout on the LoRA branch input")
    g.add_argument("--lora-targets", default=",".join(d.lora_targets),
                   help="comma-separated projections that get LoRA (wq,wk,wv,wo,w1,w2,w3)")
    g.add_argument("--prompt-len", type=int, default=d.prompt_len, help="soft prompt length P")
    g.add_argument("--prompt-init", default=d.prompt_init, choices=("random", "vocab", "text"), help="soft prompt init")
    g.add_argument("--prompt-init-text", help="text whose token embeddings start the soft prompt (--prompt-init text)")
    g.add_argument("--prefix-len", type=int, default=d.prefix_len, help="prefix length P per layer")
    g.add_argument("--prefix-hidden", type=int, default=d.prefix_hidden,
                   help="width of the prefix reparameterisation MLP (0: train the prefix directly)")
    g.add_argument("--adapter-bottleneck", type=int, default=d.adapter_bottleneck, help="Houlsby adapter bottleneck m")
    g.add_argument("--llama-adapter-len", type=int, default=d.llama_adapter_len, help="LLaMA-Adapter prompt length K")
    g.add_argument("--llama-adapter-layers", type=int, default=d.llama_adapter_layers,
                   help="top layers L that get the adapter prompt (default: min(30, n_layers))")
    g.add_argument("--llama-adapter-gate", default=d.llama_adapter_gate, choices=("tanh", "plain"),
                   help="gate form: tanh(g) (paper) or plain g (lit-llama / peft)")
    g.add_argument("--trainable-embeddings", action="store_true",
                   help="also train tok_embeddings and output in full, saved with the adapter (after extend_vocab.py)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, help=f"peak learning rate (default per method: {METHOD_DEFAULT_LR}; with the shipped tiny model: "
                   f"{TINY_MODEL_LR})")
    g.add_argument("--weight-decay", type=float, help=f"AdamW weight decay (default {RUN_DEFAULTS['weight_decay']})")
    g.add_argument("--batch-size", type=int, help=f"micro-batch size per device (default {RUN_DEFAULTS['batch_size']})")
    g.add_argument("--grad-accum", type=int, help=f"micro-batches per optimizer step (default {RUN_DEFAULTS['grad_accum']})")
    g.add_argument("--max-grad-norm", type=float, help=f"gradient clipping norm (default {RUN_DEFAULTS['max_grad_norm']})")
    g.add_argument("--precision", choices=("fp32", "bf16", "fp16"),
                   help="fp32, bf16 autocast (CPU too) or fp16 autocast with loss scaling (default fp32)")
    g.add_argument("--epochs", type=float, default=d.epochs, help="passes over the training data")
    g.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (overrides --epochs)")
    g.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio, help="share of steps with linear warm-up")
    g.add_argument("--warmup-steps", type=int, help="warm-up steps (overrides --warmup-ratio)")
    g.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="cosine decays to lr * this")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute block activations in backward")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of the method's init, the split and the data order")
    g.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    g = p.add_argument_group("evaluation, output, checkpoints")
    g.add_argument("--out", help="run folder (default runs/<method>-<timestamp>)")
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="evaluate every N steps (0: at the end only)")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size, help="batch size of evaluation and generation")
    g.add_argument("--no-exact-match", dest="exact_match", action="store_false",
                   help="skip the exact-match accuracy (greedy generation) in evaluations")
    g.add_argument("--save-every", type=int, default=d.save_every, help="write a resumable checkpoint every N steps (0: never)")
    g.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints, help="how many checkpoints to keep")
    g.add_argument("--resume", help="a checkpoint file, or a run folder to continue from its newest checkpoint")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    g.add_argument("--samples", type=int, default=4, help="before/after generations to show")
    g = p.add_argument_group("DeepSpeed")
    g.add_argument("--deepspeed", help="DeepSpeed JSON config (tools/ds_configs/*.json); \"auto\" values come from "
                   "the flags above, fixed ones must agree with them")
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, help="set by the deepspeed launcher")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    values["lora_targets"] = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    return TrainConfig(**values)


def prepare_run(cfg: TrainConfig):
    """Everything before training, in the order that stops bad input early: flags, DeepSpeed config
    (against the command line), then the tokenizer, the model and the data. Returns
    (filled cfg, ds_config or None, base model, tokenizer, RunData)."""
    from .checkpoint import load_model
    from .tokenizer import Tokenizer
    check_config(cfg)
    ds_config = None
    if cfg.deepspeed is not None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        ds_config, cfg = resolve_deepspeed_config(load_deepspeed_config(cfg.deepspeed), cfg, world_size,
                                                  source=f"--deepspeed {cfg.deepspeed}")
    cfg = cfg.filled()
    if cfg.model is None:
        raise TrainError("--model is required here (tools/finetune.py fills in the shipped tiny model)")
    tokenizer_path = cfg.tokenizer or str(Path(cfg.model) / "tokenizer.model")
    if not Path(tokenizer_path).is_file():
        raise TrainError(f"tokenizer {tokenizer_path} not found; give --tokenizer")
    tokenizer = Tokenizer(tokenizer_path)
    data = load_run_data(cfg, tokenizer)
    if cfg.deepspeed is not None:
        init_distributed_for_deepspeed()
    if _get(ds_config or {}, ("zero_optimization", "stage")) == 3:
        base = load_base_partitioned(cfg, ds_config)
    else:
        base = load_model(cfg.model, dtype=base_dtype(cfg))
    return cfg, ds_config, base, tokenizer, data


def zero3_dtype(cfg: TrainConfig, ds_config: dict) -> torch.dtype:
    """The dtype of a ZeRO-3 partitioned base: the config's (float16 / bfloat16 when enabled, else float32),
    which zero.Init takes from it (DeepSpeed 0.19 ignores an explicit dtype when the accelerator lacks fp16, as
    on CPU, and does not cast a zero.Init model itself). An explicit --base-dtype must agree."""
    dtype = (torch.float16 if _get(ds_config, ("fp16", "enabled")) is True else
             torch.bfloat16 if _get(ds_config, ("bf16", "enabled")) is True else torch.float32)
    if cfg.base_dtype != "auto" and BASE_DTYPES[cfg.base_dtype] != dtype:
        raise TrainError(f"--base-dtype {cfg.base_dtype}: under ZeRO-3 the base is held in the DeepSpeed "
                         f"config's dtype, {str(dtype).removeprefix('torch.')}; leave --base-dtype auto")
    return dtype


def load_base_partitioned(cfg: TrainConfig, ds_config: dict):
    """The base model for ZeRO-3 without a full copy on any rank. It is built inside deepspeed.zero.Init, so
    each parameter is cut into per-rank shards as it is created; then rank 0 streams the checkpoint
    (iter_checkpoint_tensors, one tensor at a time) and each weight in turn is gathered, overwritten by rank 0
    and partitioned again. Peak memory per rank: its shards plus one full tensor. Every rank calls this; an
    error on rank 0 (a bad checkpoint) is sent to the others so that all of them stop."""
    import deepspeed
    import torch.distributed as dist
    from .checkpoint import CheckpointError, iter_checkpoint_tensors, open_checkpoint
    from .model import Transformer
    dtype = zero3_dtype(cfg, ds_config)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):          # parameters in `dtype`
        model = Transformer(open_checkpoint(cfg.model).config())
    params = dict(model.named_parameters())
    assert all(p.dtype == dtype for p in params.values()), "zero.Init chose another dtype than the config's"
    is_main = dist.get_rank() == 0
    tensors = iter_checkpoint_tensors(cfg.model, dtype) if is_main else None
    while True:
        name, tensor, failure = None, None, None
        if is_main:
            try:
                name, tensor = next(tensors, (None, None))
            except Exception as err:                     # noqa: BLE001 - re-raised below, on every rank
                failure = err
        message = [name, None if failure is None else f"{type(failure).__name__}: {failure}"]
        dist.broadcast_object_list(message, src=0)       # rank 0 names the next tensor (None: the end)
        name, error = message
        if error is not None:
            raise failure if is_main else CheckpointError(f"{cfg.model}: rank 0 could not read it: {error}")
        if name is None:
            return model.eval()
        with deepspeed.zero.GatheredParameters([params[name]], modifier_rank=0):   # rank 0's value is kept
            if is_main:
                params[name].data.copy_(tensor)
