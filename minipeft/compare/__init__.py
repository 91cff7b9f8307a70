"""Compare the PEFT methods on one base or several, with one data set, one token budget and one seed, and compute
what each costs at the shape of a 7B base under the reference recipe. tools/compare_methods.py is its command
line (main in cli.py); lessons/10_comparison holds its results.

Per method it reports: trainable parameters (apply_peft's count and %), final training loss (the mean step loss
over the last 1/evals-per-epoch epoch), best and final validation loss and the epoch of the best, exact-match
accuracy of greedy answers on the held-out records (and per task), training tokens/s (real tokens of the training
steps / time in those steps) and peak memory (CUDA's allocator peak, or on CPU the process's peak resident set,
reset before each method, which includes the ~0.3-0.5 GB that Python + torch take before any model exists).

The files, from the command line down:
    cli.py          the flags and their checks, main(): one base or several (--bases, --jobs)
    base_run.py     one base: data subsets, the sweep, every method, that base's results.json / .md / .png
    sweep.py        the learning-rate sweep (a grid per method, extended past an edge)
    method_run.py   one method's run from a fresh copy of the base: curves, peak memory, speed, answers
    scores.py       exact match per task and answer lengths of the greedy answers
    report.py       the tables of one base and of several, the answers side by side, the machine
    plots.py        the loss curves
    table_7b.py     the computed 7B tables (ZeRO-3 + CPU offload on 8 GPUs)
    methods.py      what it reads from the PEFT registry: table order, titles, default rates, sweep grids
"""

from .cli import CompareError, build_arg_parser, check_args, main, parse_bases, parse_method_values, run_command_line
from .methods import REFERENCE_ORDER, method_order, title
from .table_7b import MODELS_7B, REFERENCE_7B, table_7b, table_7b_markdown

__all__ = ["main", "run_command_line", "build_arg_parser", "check_args", "parse_bases", "parse_method_values",
           "CompareError", "REFERENCE_ORDER", "method_order", "title", "MODELS_7B", "REFERENCE_7B", "table_7b",
           "table_7b_markdown"]
