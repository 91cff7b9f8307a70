"""pretrain_tiny.py's --out and --name under the output policy of every writer (reservation.reserve_output): --out is
this run's from the first check to the end (another run writing it is refused in one line); one that holds files
is refused unless --resume (go on) or --overwrite (its contents removed first, but never when a --corpus file,
the --init-from folder, the --tokenizer or the --resume file lies in it); --name is a plain name of a folder
inside --out, and none of the files the run writes beside it.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

from ..reservation import plain_name, reserve_output
from .corpus import PretrainError, PretrainFailed, parse_corpus_arg
from .family_recipes import PRETRAIN_FAMILIES

# What a run writes into --out beside the checkpoint folder --name (and each family's tokenizer file).
RUN_FILES = ("train_state.pt", "loss_curve.png", "metrics.json", "val_text.txt")


def check_name(name) -> None:
    """--name: a plain name (no separators, not "." or ".."), not one of the run's own files in --out."""
    if name is None:
        return
    plain_name(name, "--name", PretrainError)
    taken = {*RUN_FILES, *(recipe.tokenizer_file for recipe in PRETRAIN_FAMILIES.values())}
    if name in taken or name.startswith("."):
        raise PretrainError(f"--name {name!r}: is a file the run writes into --out (or a hidden name); choose "
                            f"another name for the checkpoint folder")


@contextmanager
def reserve_pretrain_out(args):
    """Hold --out for the block; with --overwrite (and no --resume) its contents are removed under the hold."""
    out = Path(args.out)
    check_name(args.name)
    inputs = [p for p, _ in map(parse_corpus_arg, args.corpus)] + [args.init_from, args.tokenizer, args.resume]
    removing = args.overwrite and args.resume is None

    def refuse(folder: Path) -> None:
        if folder.is_file():
            raise PretrainError(f"--out {folder}: is a file; expected a folder")
        if folder.is_dir() and any(folder.iterdir()) and args.resume is None and not args.overwrite:
            raise PretrainError(f"--out {folder}: already holds files; continue it with --resume "
                                f"{folder / 'train_state.pt'}, choose a new --out, or pass --overwrite to start "
                                f"afresh there")
    with reserve_output(out, removing, inputs=inputs, error=PretrainError, refuse=refuse) as reservation:
        if removing and out.is_dir():
            for entry in out.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        out.mkdir(parents=True, exist_ok=True)
        yield reservation


def stop_before_training(signals, out: Path, found: set) -> None:
    """A stop asked for (SIGTERM / Ctrl-C, train/stopping.py) before the first step, i.e. while the tokenizer was
    trained or the corpus tokenised: what this run wrote into --out (entries not in `found`) is removed, so the
    same command runs again as it was; PretrainError says so."""
    if signals.reason is None:
        return
    for entry in set(out.iterdir()) - found:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    raise PretrainFailed(f"stopped by {signals.reason} before the first step; what this run had written in {out} "
                        f"was removed; run the same command again")
