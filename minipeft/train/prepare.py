"""Everything before the first step, in the order that stops bad input early: the flags, the DeepSpeed
config (against the command line), the tokenizer, the data, the process group, the base model; and the
trainer that fits the run (plain, or DeepSpeed).

    cfg, ds_config, base, tokenizer, data = prepare_run(cfg)
    trainer = build_trainer(cfg, base, tokenizer, data, ds_config)
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Optional

from ..checkpoint import check_tokenizer_family, check_tokenizer_fits, load_model, open_checkpoint
from ..family_registry import get_family, tokenizer_for
from .config import (TrainConfig, TrainError, base_dtype, check_config, peft_for_family, reserve_run_folder,
                     resolve_defaults)
from .data_setup import RunData, load_run_data
from .deepspeed import DeepSpeedTrainer, init_distributed_for_deepspeed, load_base_partitioned
from .deepspeed_config import get_path, load_deepspeed_config, resolve_deepspeed_config
from .loop import Trainer


def prepare_run(cfg: TrainConfig):
    """Returns (resolved cfg, ds_config or None, base model, tokenizer, RunData). The defaults are resolved here,
    once (config.resolve_defaults), after the DeepSpeed config has fixed the values it fixes."""
    check_config(cfg)
    # The run folder is reserved from here (rank 0 writes it) until the run ends, or until this fails.
    reservation = reserve_run_folder(cfg) if cfg.out is not None and os.environ.get("RANK", "0") == "0" else None
    try:
        return _prepare_checked(cfg)
    except BaseException:
        if reservation is not None:
            reservation.release()
        raise


def _prepare_checked(cfg: TrainConfig):
    ds_config = None
    if cfg.deepspeed is not None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        ds_config, cfg = resolve_deepspeed_config(load_deepspeed_config(cfg.deepspeed), cfg, world_size,
                                                  source=f"--deepspeed {cfg.deepspeed}")
    cfg = resolve_defaults(cfg)
    reader = open_checkpoint(cfg.model)
    model_cfg = reader.config()
    if cfg.max_seq_len > model_cfg.max_seq_len and os.environ.get("RANK", "0") == "0":
        print(f"finetune: warning: --max-seq-len {cfg.max_seq_len} is longer than the model's max_seq_len "
              f"{model_cfg.max_seq_len} ({cfg.model}); positions beyond it were never trained", file=sys.stderr)
    tokenizer = load_run_tokenizer(cfg, reader, model_cfg)
    data = load_run_data(cfg, tokenizer)
    if cfg.deepspeed is not None:
        init_distributed_for_deepspeed()
    if get_path(ds_config or {}, ("zero_optimization", "stage")) == 3:
        base = load_base_partitioned(cfg, ds_config)
    else:
        base = load_model(cfg.model, dtype=base_dtype(cfg))
    return cfg, ds_config, base, tokenizer, data


def with_family_defaults(cfg: TrainConfig, family: str) -> TrainConfig:
    """cfg with config.peft_for_family applied to its method config (resolve_defaults does this already; for a
    caller that changes the method of a resolved config)."""
    if cfg.peft is None:
        return cfg
    return dataclasses.replace(cfg, peft=peft_for_family(cfg.peft, family))


def load_run_tokenizer(cfg: TrainConfig, reader, model_cfg):
    """The tokenizer of the model's family (families.tokenizer_for): --tokenizer, else the file the model folder
    holds (ours: tokenizer.model, or BLOOM's tokenizer.json; a ChatGLM-6B folder: ice_text.model). Its family
    picks the prompt format the data is rendered in (its family record's prompt_format). It must fit the model's vocabulary."""
    tokenizer_path = cfg.tokenizer or reader.tokenizer_path
    if tokenizer_path is None or not Path(tokenizer_path).is_file():
        wanted = tokenizer_path or Path(cfg.model) / "tokenizer.model"
        raise TrainError(f"tokenizer {wanted} not found; give --tokenizer")
    check_tokenizer_fits(Path(tokenizer_path), model_cfg.vocab_size, f"--tokenizer {tokenizer_path} (model {cfg.model})",
                         allow_extra_model_rows=get_family(model_cfg.family).tokenizer_may_be_smaller)
    tokenizer = tokenizer_for(model_cfg.family, tokenizer_path)
    check_tokenizer_family(tokenizer, model_cfg.family, f"--tokenizer {tokenizer_path}")
    return tokenizer


def build_trainer(cfg: TrainConfig, base_model, tokenizer, data: RunData, ds_config: Optional[dict] = None):
    """A Trainer for a plain run, a DeepSpeedTrainer when the run has a DeepSpeed config."""
    if cfg.deepspeed is None:
        return Trainer(cfg, base_model, tokenizer, data)
    if ds_config is None:
        raise TrainError(f"--deepspeed {cfg.deepspeed}: build the trainer with the config prepare_run returned")
    return DeepSpeedTrainer(cfg, base_model, tokenizer, data, ds_config)
