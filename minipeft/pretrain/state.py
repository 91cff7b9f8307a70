"""train_state.pt of a pretraining run: written whole or not at all, and the inputs (by content) that a --resume
must share with the run that wrote it."""

from __future__ import annotations

from pathlib import Path

import torch

from ..fileio import write_atomic
from ..train.checkpoints import input_digests, write_failure
from .corpus import PretrainError


def atomic_torch_save(obj, path: Path) -> None:
    try:
        write_atomic(path, lambda tmp: torch.save(obj, tmp))
    except (OSError, RuntimeError) as err:      # a full disk (torch.save says RuntimeError): the temporary is gone
        raise PretrainError(f"{path}: cannot write it ({write_failure(err)}); an earlier one stays as it was") from None


def input_identity(args, corpus, tokenizer_path) -> dict:
    """What train_state.pt must have been made from to be resumed, by content (train.checkpoints.input_digests):
    the --init-from folder, the tokenizer file, each corpus file (and its weight)."""
    digests = input_digests(base_model=args.init_from, tokenizer=tokenizer_path,
                            files={f"corpus file {i + 1}": path for i, (path, _) in enumerate(corpus)})
    return {**digests, "corpus weights": [weight for _, weight in corpus]}
