"""compare_methods.py's --out under the output policy of every writer (reservation.reserve_output): the folder is this
comparison's from the start to the end (another one writing it is refused in one line); one that holds an earlier
comparison is refused unless --resume (go on with it) or --overwrite (its results are removed first, but never
when an input of this comparison lies among them); a base's label names a folder inside --out.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Type

from ..reservation import Reservation, claim_output, plain_name

# What a comparison writes into --out (with --bases also a folder per base label, holding the same).
COMPARE_FILES = ("results.json", "results.md", "generations.md", "loss_curves.png", "runs")


def check_label(label: str, error: Type[Exception]) -> str:
    """A --bases label: a plain name of a folder inside --out, and none of the comparison's own files."""
    plain_name(label, "--bases label", error)
    if label in COMPARE_FILES:
        raise error(f"--bases label {label!r}: is the name of a file the comparison writes into --out; "
                    f"choose another label (LABEL=FOLDER)")
    return label


def compare_entries(out: Path, labels: Sequence[str]) -> List[Path]:
    """The paths of --out that a comparison writes (and --overwrite removes)."""
    return [out / name for name in (*COMPARE_FILES, *labels)]


def claim_compare_out(args, out: Path, bases: Optional[Sequence[Tuple[str, str]]],
                      error: Type[Exception]) -> Reservation:
    """Reserve --out for this comparison (the caller releases it); with --overwrite, remove what an earlier
    comparison wrote there (COMPARE_FILES and the base folders) once the inputs are known to lie elsewhere."""
    entries = compare_entries(out, [label for label, _ in bases or ()])
    inputs = [args.data, args.val_data, args.base, args.deepspeed, *(folder for _, folder in bases or ()),
              *(getattr(args, "plugin", None) or ())]

    def refuse(folder: Path) -> None:
        if folder.is_file():
            raise error(f"--out {folder}: is a file; the comparison writes a folder")
        used = [entry.name for entry in entries if entry.exists()]
        if used and not args.overwrite and not args.resume:
            raise error(f"--out {folder}: holds an earlier comparison ({', '.join(used)}); continue it with "
                        f"--resume, choose a new --out, or pass --overwrite to replace it")
    reservation = claim_output(out, args.overwrite, inputs=inputs, error=error, refuse=refuse, removes=entries)
    if args.overwrite:
        remove_entries(entries)
    return reservation


def remove_entries(entries: Sequence[Path]) -> None:
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        elif entry.exists() or entry.is_symlink():
            entry.unlink()
