"""The command line of tools/finetune.py: the documented flags -> a TrainConfig.

Run flags map one to one onto TrainConfig fields (--max-seq-len -> max_seq_len). Each method's flags come
from its registry entry (minipeft/peft/registry.py: Flag("--lora-rank", "rank", ...)); only the chosen
method's flags build its config, and a PeftConfigError from that config is reported with the flag's name.
The methods a --plugin module registers are among them: the tool imports the plugins before it builds the
parser (minipeft/plugins.py); --plugin itself is accepted here and documented in --help.
"""

from __future__ import annotations

import argparse
import dataclasses

from .. import cli_types as T
from ..peft import METHODS, PeftConfigError
from ..plugins import add_plugin_flag
from .config import BASE_DTYPES, RUN_DEFAULTS, TrainConfig, TrainError


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" only where there is a fixed default (None means "per method / from the config")."""
    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _add_method_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("method")
    g.add_argument("--method", default="lora", choices=tuple(METHODS), help="what to train")
    seen = set()
    for method in METHODS.values():
        defaults = method.config_class()
        for flag in method.flags:
            if flag.name in seen:
                continue
            seen.add(flag.name)
            if flag.switch:                                  # no value: sets the field to True
                g.add_argument(flag.name, dest=flag.dest, action="store_true", default=argparse.SUPPRESS,
                               help=flag.help)
                continue
            default = getattr(defaults, flag.field)
            shown = ",".join(default) if isinstance(default, tuple) else default
            g.add_argument(flag.name, dest=flag.dest, type=flag.parse, choices=flag.choices,
                           default=argparse.SUPPRESS, help=f"{flag.help} (default {shown})")
    g.add_argument("--trainable-embeddings", action="store_true",
                   help="also train tok_embeddings and output in full, saved with the adapter (after extend_vocab.py)")


def build_arg_parser() -> argparse.ArgumentParser:
    p = T.ArgumentParser(
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
    g.add_argument("--val-fraction", type=T.fraction, default=d.val_fraction, help="validation share when no --val-data")
    g.add_argument("--max-seq-len", type=T.seq_len, default=d.max_seq_len,
                   help="tokens per example; longer ones lose the start of the prompt first, then the end of the response")
    g.add_argument("--train-on-prompt", action="store_true", help="also train on the prompt tokens (default: only the response)")
    g.add_argument("--strict-data", action="store_true", help="stop at the first malformed record instead of skipping it")
    g = p.add_argument_group("model")
    g.add_argument("--model", help="our checkpoint folder (default: the shipped tiny-llama)")
    g.add_argument("--tokenizer", help="tokenizer file (default: <model>/tokenizer.model, or <model>/tokenizer.json for BLOOM)")
    g.add_argument("--base-dtype", default=d.base_dtype, choices=tuple(BASE_DTYPES),
                   help="dtype of the frozen base weights; auto: float32 with --precision fp32, else bf16/fp16 "
                   "to match (trainable parameters stay float32)")
    _add_method_flags(p)
    g = p.add_argument_group("optimisation")
    real = {m.name: m.learning_rates.real_base for m in METHODS.values()}
    tiny = {m.name: m.learning_rates.tiny_base for m in METHODS.values()}
    g.add_argument("--lr", type=T.positive_float, help=f"peak learning rate (default per method: {real}; with the "
                   f"shipped tiny model: {tiny})")
    g.add_argument("--weight-decay", type=T.non_negative_float, help=f"AdamW weight decay (default {RUN_DEFAULTS['weight_decay']})")
    g.add_argument("--batch-size", type=T.batch_size, help=f"micro-batch size per device (default {RUN_DEFAULTS['batch_size']})")
    g.add_argument("--grad-accum", type=T.batch_size, help=f"micro-batches per optimizer step (default {RUN_DEFAULTS['grad_accum']})")
    g.add_argument("--max-grad-norm", type=T.positive_float, help=f"gradient clipping norm (default {RUN_DEFAULTS['max_grad_norm']})")
    g.add_argument("--precision", choices=("fp32", "bf16", "fp16"),
                   help="fp32, bf16 autocast (CPU too) or fp16 autocast with loss scaling (default fp32)")
    g.add_argument("--epochs", type=T.positive_float, default=d.epochs, help="passes over the training data")
    g.add_argument("--max-steps", type=T.positive_int, help="stop after this many optimizer steps (overrides --epochs)")
    g.add_argument("--warmup-ratio", type=T.fraction, default=d.warmup_ratio, help="share of steps with linear warm-up")
    g.add_argument("--warmup-steps", type=T.non_negative_int, help="warm-up steps (overrides --warmup-ratio)")
    g.add_argument("--min-lr-ratio", type=T.closed_fraction, default=d.min_lr_ratio, help="cosine decays to lr * this")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute block activations in backward")
    g.add_argument("--seed", type=T.seed, default=d.seed, help="seed of the method's init, the split and the data order")
    g.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    g = p.add_argument_group("evaluation, output, checkpoints")
    g.add_argument("--out", help="run folder (default runs/<method>-<timestamp>)")
    g.add_argument("--eval-every", type=T.non_negative_int, default=d.eval_every, help="evaluate every N steps (0: at the end only)")
    g.add_argument("--eval-batch-size", type=T.batch_size, default=d.eval_batch_size, help="batch size of evaluation and generation")
    g.add_argument("--no-exact-match", dest="exact_match", action="store_false",
                   help="skip the exact-match accuracy (greedy generation) in evaluations")
    g.add_argument("--save-every", type=T.non_negative_int, default=d.save_every, help="write a resumable checkpoint every N steps (0: never)")
    g.add_argument("--keep-checkpoints", type=T.positive_int.with_hint("for no checkpoints at all, use --save-every 0"),
                   default=d.keep_checkpoints, help="how many checkpoints to keep")
    g.add_argument("--resume", help="a checkpoint file, or a run folder to continue from its newest checkpoint")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out that holds another run (its metrics, checkpoints and adapter are removed)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    g.add_argument("--samples", type=T.non_negative_int, default=4, help="before/after generations to show")
    g = p.add_argument_group("DeepSpeed")
    g.add_argument("--deepspeed", help="DeepSpeed JSON config (tools/ds_configs/*.json); \"auto\" values come from "
                   "the flags above, fixed ones must agree with them")
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", type=T.local_rank, help="set by the deepspeed launcher")
    add_plugin_flag(p)
    return p


def _in_flag_words(message: str, method) -> str:
    """A config's error names its fields (LoRAConfig.rank); on the command line, name the flags (--lora-rank)."""
    prefix = method.config_class.__name__ + "."
    for flag in sorted(method.flags, key=lambda f: -len(f.field)):       # init_text before init
        message = message.replace(prefix + flag.field, flag.name)
    return message


def method_config_from_args(args: argparse.Namespace):
    """The chosen method's config from its flags (a flag not given is absent from args: the config's default)."""
    method = METHODS[args.method]
    given = {flag.field: getattr(args, flag.dest) for flag in method.flags if hasattr(args, flag.dest)}
    if getattr(args, "trainable_embeddings", False):
        if "extra_trainable" not in {f.name for f in dataclasses.fields(method.config_class)}:
            raise TrainError(f"--trainable-embeddings: method {method.name!r} cannot train whole base modules "
                             f"beside it ({method.config_class.__name__} has no extra_trainable field)")
        given["extra_trainable"] = ("tok_embeddings", "output")
    try:
        return method.config_class(**given)
    except PeftConfigError as err:
        raise TrainError(_in_flag_words(str(err), method)) from None


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A TrainConfig from parsed flags; TrainError (naming the flag) for a method setting that cannot work."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
              if hasattr(args, f.name) and f.name != "peft"}
    values["peft"] = method_config_from_args(args)
    return TrainConfig(**values)
