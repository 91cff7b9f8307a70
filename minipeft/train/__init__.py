"""Training: one loop, plain PyTorch on CPU / one GPU, or a DeepSpeed engine built from a JSON config.

    cfg = TrainConfig(model="checkpoints/llama-7b", train_data="alpaca.json", peft=LoRAConfig(rank=8))
    cfg, ds_config, base, tokenizer, data = prepare_run(cfg)         # the defaults resolved here, once
    trainer = build_trainer(cfg, base, tokenizer, data, ds_config)
    trainer.train(); trainer.save_final()

Read it in this order:
    loop.py             the loop a learner reads top to bottom: Trainer, lr_factor (no DeepSpeed in it)
    config.py           TrainConfig (holds the method's PEFT config), resolve_defaults, its checks, the base dtype
    data_setup.py       the run's data: files read, encoded, split, reported
    evaluate.py         batch loss, validation loss, exact match; the autocast context
    checkpoints.py      resumable checkpoints of the plain loop; the run identity a resume must match
    deepspeed.py        DeepSpeedTrainer (engine, its checkpoints, gathered save), ZeRO-3 partitioned loading
    deepspeed_config.py "auto" filling and conflict checks of a DeepSpeed JSON config
    prepare.py          prepare_run (everything before the first step), build_trainer
    cli.py              finetune.py's flags -> TrainConfig (method flags from the PEFT registry)
"""

from ..distributed import world_info
from ..peft import METHODS as PEFT_METHODS
from .checkpoints import run_identity
from .cli import build_arg_parser, config_from_args
from .config import (BASE_DTYPES, RUN_DEFAULTS, RunFailed, TrainConfig, TrainError, base_dtype, check_config,
                     is_resolved, peft_config_from, resolve_defaults)
from .data_setup import RunData, load_run_data
from .deepspeed import DeepSpeedTrainer, init_distributed_for_deepspeed, load_base_partitioned, zero3_dtype
from .deepspeed_config import fill_deepspeed_schedule, load_deepspeed_config, resolve_deepspeed_config
from .evaluate import autocast, batch_loss, evaluate_loss, exact_match
from ..peft.learning_rates import REAL_BASE_LR, TINY_COMPARISON_LR, TINY_MODEL_LR
from .loop import Trainer, default_run_dir, lr_factor
from .prepare import build_trainer, prepare_run

METHODS = tuple(PEFT_METHODS)          # the built-in methods' names, in registry order
METHOD_DEFAULT_LR = REAL_BASE_LR       # the old name of the real-base table

__all__ = ["Trainer", "DeepSpeedTrainer", "TrainConfig", "TrainError", "RunFailed", "RunData", "METHODS",
           "RUN_DEFAULTS",
           "BASE_DTYPES", "REAL_BASE_LR", "METHOD_DEFAULT_LR", "TINY_MODEL_LR", "TINY_COMPARISON_LR",
           "build_arg_parser", "config_from_args", "resolve_defaults", "is_resolved", "prepare_run", "build_trainer", "check_config", "base_dtype",
           "peft_config_from", "load_run_data", "lr_factor", "autocast", "batch_loss", "evaluate_loss",
           "exact_match", "default_run_dir", "run_identity", "world_info", "init_distributed_for_deepspeed",
           "load_base_partitioned", "zero3_dtype", "load_deepspeed_config", "resolve_deepspeed_config",
           "fill_deepspeed_schedule"]
