"""Tokenise an Alpaca-format file once, write the token ids, and print what happened to each record.

    python tools/prepare_data.py alpaca_data.json --tokenizer checkpoints/llama-7b/tokenizer.model \\
        --max-seq-len 512 --out data/alpaca.tokenized.jsonl [--val-fraction 0.02]

Input: a JSON list of {"instruction", "input" (optional), "output"} objects, or JSON Lines of them.
Output: JSON Lines, a header line {"minipeft_tokenized": 1, "max_seq_len", "tokenizer", ...} then one
{"input_ids", "labels", "prompt_len"} per example (labels -100 on the prompt unless --train-on-prompt).
tools/finetune.py --train-data accepts this file directly. With --val-fraction a seeded split is written
beside it as <out>.val.jsonl (same format). The template, masking and truncation rule are those of
minipeft/data.py. Malformed records are listed with their index and skipped (--strict: refused).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from minipeft import cli_types as T
from minipeft.cli_errors import run_main
from minipeft.data import AlpacaEncoder, DataError, read_records, save_tokenized, train_val_split
from minipeft.reservation import reserve_output


def default_tokenizer() -> str:
    from minipeft import assets_dir
    return str(assets_dir() / "tiny-llama" / "tokenizer.model")


def build_parser() -> argparse.ArgumentParser:
    parser = T.ArgumentParser(prog="prepare_data.py", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("data", help="Alpaca JSON list or JSON Lines file")
    parser.add_argument("--tokenizer", default=None, help="SentencePiece model (default: the shipped tiny-llama's)")
    parser.add_argument("--max-seq-len", type=T.seq_len, default=256, help="tokens per example")
    parser.add_argument("--train-on-prompt", action="store_true", help="labels on the prompt too")
    parser.add_argument("--strict", action="store_true", help="stop at the first malformed record")
    parser.add_argument("--val-fraction", type=T.fraction, default=0.0, help="also write a seeded validation split")
    parser.add_argument("--seed", type=T.seed, default=0, help="seed of the split")
    parser.add_argument("--out", help="output file (default: <data>.tokenized.jsonl)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--family", default="llama", choices=("llama", "chatglm", "chatglm2", "bloom"),
                        help="the model family: its tokenizer rules and chat format (default llama: Alpaca)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    tokenizer_path = args.tokenizer or default_tokenizer()
    out = Path(args.out) if args.out else Path(args.data).with_suffix(".tokenized.jsonl")
    try:
        with contextlib.ExitStack() as reserved:                 # the outputs are this run's until it ends
            return write_outputs(args, tokenizer_path, out, reserved)
    except (ValueError, OSError) as err:
        print(f"prepare_data.py: error: {err}", file=sys.stderr)
        return 2


def write_outputs(args, tokenizer_path: str, out: Path, reserved: contextlib.ExitStack) -> int:
    from minipeft.families import tokenizer_for
    from minipeft.fileio import file_sha256
    tokenizer = tokenizer_for(args.family, tokenizer_path)
    encoder = AlpacaEncoder(tokenizer, args.max_seq_len, train_on_prompt=args.train_on_prompt)
    records, problems = read_records(args.data, strict=args.strict)
    if not records:
        reasons = "; ".join(str(p) for p in problems[:5]) + (" ..." if len(problems) > 5 else "")
        raise DataError(f"{args.data}: no usable records ({reasons}); expected Alpaca records as a JSON list "
                        f"or JSON Lines")
    splits = {"": records}
    if args.val_fraction > 0:
        train, val = train_val_split(records, args.val_fraction, args.seed)
        splits = {"": train, ".val": val}
    paths = {suffix: out if not suffix else out.with_name(out.name.removesuffix(".jsonl") + f"{suffix}.jsonl")
             for suffix in splits}
    for path in paths.values():
        for name, given in (("input data", args.data), ("tokenizer", tokenizer_path)):
            if path.resolve() == Path(given).resolve():
                raise DataError(f"--out {path}: is the {name}; write the tokenized file to a new path")
        reserved.enter_context(reserve_output(path, args.overwrite, inputs=[args.data, tokenizer_path],
                                              error=DataError))
    meta = {"source": str(args.data), "tokenizer": str(tokenizer_path), "tokenizer_sha256": file_sha256(tokenizer_path),
            "vocab_size": tokenizer.vocab_size, "max_seq_len": args.max_seq_len,
            "train_on_prompt": args.train_on_prompt}
    for problem in problems:
        print(f"skipped {problem}")
    for suffix, split in splits.items():
        examples, stats = encoder.encode_all(split)
        save_tokenized(examples, paths[suffix], meta, overwrite=args.overwrite)
        print(f"{paths[suffix]}: {stats.summary()}")
        if stats.dropped_indices:
            print(f"  dropped (index within this split): {stats.dropped_indices[:20]}")
    print(f"{len(problems)} malformed records skipped")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, "prepare_data.py"))
