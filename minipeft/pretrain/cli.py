"""tools/pretrain_tiny.py's command line: its flags (build_arg_parser) and main(argv), which runs
run.pretrain; run_command_line turns a PretrainError into one line on stderr and exit status 1 (the flags'
ranges are their types, minipeft/cli_types.py: a bad value stops the parser, exit status 2)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import cli_types as T
from .corpus import PretrainError, PretrainFailed
from .family_recipes import PRETRAIN_FAMILIES, SHAPE_DEFAULTS
from .run import pretrain

DESCRIPTION = "Pretrain the tiny bases the package ships: a tokenizer of the family's own kind, then a small decoder."


def build_arg_parser() -> argparse.ArgumentParser:
    ap = T.ArgumentParser(prog="pretrain_tiny.py", description=DESCRIPTION)
    ap.add_argument("--corpus", action="append", required=True,
                    help="plain-text (or Alpaca .json) file, optionally path:weight for its sampling weight (repeat)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--overwrite", action="store_true", help="start afresh in an --out folder that already holds files")
    ap.add_argument("--family", choices=tuple(PRETRAIN_FAMILIES), default=None,
                    help="the model and tokenizer kind (default llama, or the --init-from folder's)")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="continue pretraining this checkpoint folder (its config and tokenizer; no shape flags)")
    ap.add_argument("--name", default=None, help="name of the checkpoint folder written in --out (default tiny-<family>)")
    ap.add_argument("--steps", type=T.positive_int, default=3000)
    ap.add_argument("--batch-size", type=T.batch_size, default=8)
    ap.add_argument("--seq-len", type=T.seq_len, default=256)
    ap.add_argument("--lr", type=T.positive_float, default=1.5e-3)
    ap.add_argument("--warmup", type=T.non_negative_int, default=100)
    ap.add_argument("--min-lr-ratio", type=T.closed_fraction, default=0.1)
    ap.add_argument("--weight-decay", type=T.non_negative_float, default=0.1)
    ap.add_argument("--vocab-size", type=T.vocab_size, default=None, help="tokenizer pieces (default 4096)")
    ap.add_argument("--dim", type=T.dim, default=None, help=f"default {SHAPE_DEFAULTS['dim']}")
    ap.add_argument("--n-layers", type=T.layers, default=None, help=f"default {SHAPE_DEFAULTS['n_layers']}")
    ap.add_argument("--n-heads", type=T.dim, default=None, help=f"default {SHAPE_DEFAULTS['n_heads']}")
    ap.add_argument("--n-kv-heads", type=T.dim, default=None,
                    help=f"llama: default {SHAPE_DEFAULTS['n_kv_heads']}; bloom and chatglm have none (= --n-heads)")
    ap.add_argument("--multiple-of", type=T.dim, default=None, help=f"llama's MLP rounding, default {SHAPE_DEFAULTS['multiple_of']}")
    ap.add_argument("--max-seq-len", type=T.seq_len, default=512, help="max_seq_len written into the config")
    ap.add_argument("--seed", type=T.seed, default=0)
    ap.add_argument("--threads", type=T.threads, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--resume", type=Path, default=None, help="a train_state.pt written by an earlier run")
    ap.add_argument("--eval-every", type=T.positive_int, default=250)
    ap.add_argument("--save-every", type=T.positive_int, default=250)
    ap.add_argument("--val-fraction", type=T.open_fraction, default=0.015)
    ap.add_argument("--val-windows", type=T.positive_int, default=8, help="held-out windows per file for the periodic val loss")
    ap.add_argument("--val-text-chars", type=T.non_negative_int, default=1500, help="characters per file in val_text.txt")
    ap.add_argument("--tokenizer", type=Path, default=None, help="use this tokenizer file instead of training one")
    ap.add_argument("--tokenizer-min-share", type=T.fraction, default=0.01)
    ap.add_argument("--max-minutes", type=T.positive_float, default=None, help="stop (and finish normally) after this long")
    ap.add_argument("--stop-at-step", type=T.positive_int, default=None,
                    help="stop at this step (the schedule still follows --steps); to try out --resume")
    return ap


def main(argv=None) -> int:
    """Parse argv (default sys.argv[1:]) and pretrain; PretrainError for what cannot work."""
    return pretrain(build_arg_parser().parse_args(argv), argv)


def run_command_line(argv=None) -> int:
    try:
        return main(argv)
    except PretrainError as err:       # bad input: 2; a run that started and could not finish: 1
        print(f"pretrain_tiny.py: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1 if isinstance(err, PretrainFailed) else 2
