"""Compare full fine-tuning, LoRA, LLaMA-Adapter, prompt tuning, prefix tuning and Houlsby adapters on one
base model or several (--bases), one data set, one token budget and one seed; and compute what the same methods
cost at the shape of each 7B base under the reference recipe (ZeRO-3 + CPU offload on 8 GPUs).

    python tools/compare_methods.py --threads 2                 # shipped tiny model + demo data
    python tools/compare_methods.py --sweep --threads 2         # first choose the lrs by a sweep
    python tools/compare_methods.py --data ../shared/data/alpaca_zh_demo.json --base checkpoints/x
    deepspeed --num_gpus 8 tools/compare_methods.py --deepspeed tools/ds_configs/zero3_offload_reference.json \\
        --base checkpoints/llama-7b --data alpaca_data_zh.json --max-seq-len 512 --max-train-examples 0
    python tools/compare_methods.py --only-7b-table             # the computed table only
    python tools/compare_methods.py --bases all --sweep --threads 1 --jobs 2     # the four tiny bases
    deepspeed --num_gpus 8 tools/compare_methods.py --deepspeed tools/ds_configs/zero3_offload_reference.json \\
        --bases llama=ckpt/llama-7b,chinese-llama=ckpt/chinese-llama-7b,chatglm=ckpt/chatglm-6b,bloom=ckpt/bloom-7b1 \\
        --data alpaca_data_zh.json --max-seq-len 512 --max-train-examples 0         # the reference's whole table
    python tools/compare_methods.py --plugin my_methods --methods lora,my_method --lr my_method=1e-2   # a plugin's

The code is the package's: minipeft/compare/ (what every method shares and how the rates are swept: its
method_run.py and sweep.py; what is reported: its __init__.py). Every base gets the same methods, records,
epochs, steps, seed and sweep grid; each renders the records in its own prompt format (the Alpaca template for
LLaMA and BLOOM, "[Round 0]\\n问：...\\n答：" for ChatGLM-6B) and counts tokens with its own tokenizer, so "the
same budget" is the same examples and steps. Learning rates, sweep grids, titles and 7B configs are the PEFT
registry's (minipeft/peft/registry.py).

Output in --out (default runs/compare-<time>): results.json (everything, including the curves, the sweep
and the machine), results.md (the two tables), loss_curves.png, and runs/<method>/metrics.jsonl. With --bases
each base gets that in --out/<label>/, and --out itself gets results.json (all bases), results.md (one table
of every base and method, the per-task accuracy, the costs, the 7B tables), generations.md (answers side by
side) and loss_curves.png (a row per base). The tables other than the costs are the same bit for bit on a rerun.
"""

import sys

from minipeft.cli_errors import run_main
from minipeft.compare import build_arg_parser as build_parser, run_command_line  # noqa: F401 (the flags)

if __name__ == "__main__":
    sys.exit(run_main(run_command_line, "compare_methods.py"))
