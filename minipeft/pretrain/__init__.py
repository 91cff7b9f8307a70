"""Pretraining of the tiny bases the package ships (minipeft/assets/README.md says how each was made):
tools/pretrain_tiny.py is its command line.

    cli.py                  the flags, main(argv)
    run.py                  pretrain(args): tokenizer, corpus, the training loop, evaluation, the outputs
    corpus.py               corpus files and their train / held-out split; PretrainError
    samples.py              a window of tokens -> a sample in the family's layout; held-out scoring
    tokenizer_training.py   the tokenizer trainers (SentencePiece as LLaMA's or GLM's, BLOOM's byte-level BPE)
    family_recipes.py       what differs per family, in one table keyed by family name (PRETRAIN_FAMILIES)
"""

from .cli import build_arg_parser, main, run_command_line
from .corpus import PretrainError, PretrainFailed
from .family_recipes import PRETRAIN_FAMILIES, PretrainFamily, model_config, pretrain_family, train_family_tokenizer
from .run import pretrain
from .samples import SampleLayout, mean_nll, total_nll
from .tokenizer_training import TokenizerTrainingError

__all__ = ["main", "run_command_line", "build_arg_parser", "pretrain", "PretrainError", "PretrainFailed", "TokenizerTrainingError",
           "PRETRAIN_FAMILIES", "PretrainFamily", "pretrain_family", "model_config", "train_family_tokenizer",
           "SampleLayout", "mean_nll", "total_nll"]
