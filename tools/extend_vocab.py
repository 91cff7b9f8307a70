"""Extend a LLaMA tokenizer with Chinese pieces (and optionally resize a checkpoint to the new vocabulary).

    python tools/extend_vocab.py --base-tokenizer BASE/tokenizer.model --corpus zh.txt --vocab-size 2000 \\
        --out extended/tokenizer.model [--sample heldout_zh.txt] [--checkpoint BASE --checkpoint-out EXTENDED]
    python tools/extend_vocab.py --base-tokenizer BASE/tokenizer.model --extra-tokenizer zh_sp.model --out ...

--corpus trains a Chinese BPE SentencePiece model on the corpus (LLaMA's settings: byte fallback, identity
normalisation, digits split); --extra-tokenizer takes an existing one. Its pieces that the base lacks and
that contain a CJK character are appended to the base model (every base id unchanged; see minipeft/vocab.py
for the scores and why only CJK pieces). Prints how many pieces were added and the tokens per character of
the sample (--sample, else the corpus, which the new pieces were trained on and so flatters them) before
and after. With --checkpoint, the model in that folder is resized to the new vocabulary (new rows = the mean
of the old rows) and saved with the new tokenizer as --checkpoint-out.

Text files are read one line per text; .json / .jsonl files as Alpaca records (instruction, input, output).
"""

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

from minipeft import cli_types as T
from minipeft.cli_errors import one_line, run_main
from minipeft.reservation import refuse_existing, refuse_inputs_inside, reserve_output
from minipeft.tokenizer import Tokenizer
from minipeft.vocab import (VocabError, merge_sentencepiece_models, resize_checkpoint, tokens_per_char,
                            train_sentencepiece)


def read_texts(path) -> list:
    """Non-empty texts of a file: lines of a text file, or the lines of Alpaca records' fields (.json / .jsonl)."""
    from minipeft.data import record_fields
    path = Path(path)
    if not path.is_file():
        raise VocabError(f"{path}: file not found")
    if path.suffix in (".json", ".jsonl"):
        lines = [line for fields in record_fields(path) for text in fields for line in text.splitlines()]
    else:
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError as e:
            raise VocabError(f"{path}: not UTF-8 text (byte offset {e.start}); save it as UTF-8") from None
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise VocabError(f"{path}: no text in it")
    return lines


def check_outputs(args) -> None:
    """Before any work: --out (and --save-extra) is a new file (never an input, never inside the checkpoint being
    read or the one written) and --checkpoint-out a new folder, unless --overwrite (which may not remove an
    input)."""
    out = Path(args.out).resolve()
    inputs = [args.base_tokenizer, args.extra_tokenizer, args.corpus, args.sample, args.save_extra]
    for given in filter(None, inputs):
        if out == Path(given).resolve():
            raise VocabError(f"--out {args.out}: is also an input ({given}); write the extended tokenizer to a new file")
    if args.checkpoint and Path(args.checkpoint).resolve() in out.parents:
        raise VocabError(f"--out {args.out}: is inside --checkpoint {args.checkpoint}, which would then no longer "
                         f"load; write it elsewhere (--checkpoint-out gets a copy)")
    refuse_existing(out, args.overwrite, VocabError)
    if args.save_extra:
        refuse_existing(args.save_extra, args.overwrite, VocabError)
    if args.checkpoint_out:
        if Path(args.checkpoint_out).resolve() == Path(args.checkpoint).resolve():
            raise VocabError(f"--checkpoint-out {args.checkpoint_out}: is --checkpoint; write the resized model to a new folder")
        for flag, given in (("--out", args.out), ("--save-extra", args.save_extra)):
            if given and Path(args.checkpoint_out).resolve() in Path(given).resolve().parents:
                raise VocabError(f"{flag} {given}: is inside --checkpoint-out {args.checkpoint_out}, which is written "
                                 f"as a whole; write it elsewhere (the folder gets its own tokenizer.model)")
        refuse_existing(args.checkpoint_out, args.overwrite, VocabError)
        if args.overwrite:
            refuse_inputs_inside([args.checkpoint_out], [args.checkpoint, *inputs], VocabError)


def reserve_outputs(args, reserved: contextlib.ExitStack) -> None:
    """Hold --out, --save-extra and --checkpoint-out for the whole run (reservation.reserve_output)."""
    for path in filter(None, (args.out, args.save_extra, args.checkpoint_out)):
        reserved.enter_context(reserve_output(path, args.overwrite, error=VocabError))


def build_parser() -> argparse.ArgumentParser:
    parser = T.ArgumentParser(prog="extend_vocab.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-tokenizer", required=True, help="the SentencePiece tokenizer.model to extend")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--corpus", help="Chinese text to train the extra SentencePiece model on")
    source.add_argument("--extra-tokenizer", help="an existing (Chinese) SentencePiece model to merge in")
    parser.add_argument("--vocab-size", type=T.vocab_size, default=2000,
                        help="pieces of the SentencePiece model trained on --corpus (default 2000)")
    parser.add_argument("--save-extra", help="also keep the SentencePiece model trained on --corpus here")
    parser.add_argument("--out", required=True, help="where to write the extended tokenizer.model")
    parser.add_argument("--all-pieces", action="store_true",
                        help="append new pieces without CJK characters too (may change how English is split)")
    parser.add_argument("--sample", help="text to measure tokens per character on (default: the corpus)")
    parser.add_argument("--checkpoint", help="a checkpoint folder to resize to the extended vocabulary")
    parser.add_argument("--checkpoint-out", help="where to write the resized checkpoint folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out / --checkpoint-out")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.checkpoint is None) != (args.checkpoint_out is None):
        parser.error("--checkpoint and --checkpoint-out go together")
    with contextlib.ExitStack() as reserved:
        try:
            check_outputs(args)
            reserve_outputs(args, reserved)
        except (ValueError, OSError) as e:
            print(f"extend_vocab.py: error: {one_line(e)}", file=sys.stderr)
            return 2
        return extend(args)


def extend(args) -> int:
    """The work of main() once the outputs are checked and reserved."""
    try:
        corpus = read_texts(args.corpus) if args.corpus else None
        sample = read_texts(args.sample) if args.sample else corpus
        with tempfile.TemporaryDirectory() as tmp:
            extra = args.extra_tokenizer
            if corpus is not None:
                extra = train_sentencepiece(corpus, args.save_extra or Path(tmp) / "extra.model", args.vocab_size)
                print(f"trained a BPE SentencePiece model on {len(corpus):,} lines of {args.corpus}: "
                      f"{Tokenizer(extra).vocab_size:,} pieces" + (f" -> {extra}" if args.save_extra else ""))
            stats = merge_sentencepiece_models(args.base_tokenizer, extra, args.out,
                                               require_cjk=not args.all_pieces, overwrite=args.overwrite)
        print(f"base pieces     : {stats['base_size']:,}")
        print(f"pieces added    : {stats['added']:,} (skipped: {stats['skipped_present']:,} already present, "
              f"{stats['skipped_special']:,} byte/control, {stats['skipped_non_cjk']:,} without CJK)")
        print(f"new vocabulary  : {stats['new_size']:,} -> {args.out}")
        if sample is not None:
            before = tokens_per_char(Tokenizer(args.base_tokenizer), sample)
            after = tokens_per_char(Tokenizer(args.out), sample)
            where = args.sample or f"{args.corpus} (the training corpus)"
            print(f"tokens per char : {before:.3f} before, {after:.3f} after ({after / before:.1%} of before) "
                  f"on {sum(map(len, sample)):,} characters of {where}")
        if args.checkpoint:
            summary = resize_checkpoint(args.checkpoint, args.checkpoint_out, args.out, overwrite=args.overwrite)
            print(f"checkpoint      : vocab {summary['old_vocab_size']:,} -> {summary['new_vocab_size']:,} "
                  f"(new rows = mean of the old rows) -> {summary['out']}")
    except (ValueError, OSError) as e:   # VocabError, CheckpointError, TokenizerError: the message names the file
        print(f"extend_vocab.py: error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, "extend_vocab.py"))
