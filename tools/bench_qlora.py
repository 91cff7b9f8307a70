"""QLoRA's 4-bit base against fp32 and fp16 bases, measured: bytes, resident memory, step time (CPU).

    OMP_NUM_THREADS=1 python tools/bench.py --qlora-memory [--threads 1] [--repeats 5] [--write docs/qlora.md]
    (the same as python tools/bench_qlora.py ...)

Two bases: the shipped tiny LLaMA (3.2M parameters, half of them the embedding and output layer) and a wider
random LLaMA (WIDE: dim 768, 6 layers, FFN 2048, vocab 1024, where the block weights are 96 % of the model).
Four variants each: LoRA r=8 on q, v over an fp32 base and over an fp16 base, and QLoRA (the same LoRA, every
linear layer of the blocks in NF4 with double quantisation) with the rest of the base in fp32 or fp16.

Each variant runs in a fresh process (this file with --variant), with glibc's mmap threshold fixed at 64 KiB so
that freed tensors leave the resident set. It reports the bytes of the base's tensors (state_dict: the block
linears alone and the whole base), memory.py's closed form for the whole base, the resident set the model adds
to the process (read from /proc/self/status before and after building it), and the peak resident set of one
training step (forward + loss + backward, batch 2 x 32) over the process before the model. Then LoRA and QLoRA
steps on the wide fp32 base are timed, interleaved (bench.py's compare): the cost of dequantising on the fly.
Nothing here is asserted; docs/qlora.md holds a run and reads it.
"""

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from bench import LORA, compare, step, write_markdown
from minipeft import cli_types as T
from minipeft import memory
from minipeft.cli_errors import run_main
from minipeft.config import ModelConfig
from minipeft.model import Transformer
from minipeft.peft import LoRAConfig, apply_peft
from minipeft.peft.config import QLoRAConfig

VARIANTS = ("fp32 + LoRA", "fp16 + LoRA", "NF4 (rest fp32) + QLoRA", "NF4 (rest fp16) + QLoRA")
WIDE = dict(dim=768, n_layers=6, n_heads=12, n_kv_heads=12, vocab_size=1024, ffn_hidden_dim=2048, max_seq_len=128)
TINY_LLAMA = Path(__file__).resolve().parents[1] / "minipeft" / "assets" / "tiny-llama"
MiB = 2 ** 20
STEP_BATCH = (2, 32)                     # tokens of the measured and timed steps (fp16 matmuls are slow on a CPU)


def build(shape: str, variant: str):
    """(the PEFT model of `variant`, its base config): fp32 weights first, then cast to fp16 and / or quantised."""
    from minipeft.checkpoint import load_model
    if shape == "tiny":
        model = load_model(TINY_LLAMA, dtype=torch.float32)
    else:
        torch.manual_seed(0)
        model = Transformer(ModelConfig(**WIDE))
    if "fp16" in variant:
        model = model.half()
    config = QLoRAConfig(**LORA) if "QLoRA" in variant else LoRAConfig(**LORA)
    return apply_peft(model, config), model.config


def resident() -> int:
    """This process's resident set now (VmRSS), bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def warm_up(shape: str, variant: str) -> None:
    """Build the same variant once, run a step and free it: what the first build and step load (the checkpoint
    reader's modules, about 80 MiB; the autograd engine; the kernels) is then in the resident set before the
    measured model is built."""
    model, cfg = build(shape, variant)
    tokens = torch.randint(0, cfg.vocab_size, STEP_BATCH)
    model.loss(tokens, tokens).backward()
    del model
    gc.collect()


def measure_variant(shape: str, variant: str) -> dict:
    """One variant in this (fresh) process: bytes and resident sets (module docstring)."""
    from minipeft.compare.method_run import PeakMemory
    warm_up(shape, variant)                   # libraries loaded and kernels initialised before `before`
    before = resident()
    model, cfg = build(shape, variant)
    gc.collect()
    base = {k: v for k, v in model.base.state_dict().items() if "lora_" not in k}
    in_blocks = sum(v.numel() * v.element_size() for k, v in base.items() if ".attention." in k or ".feed_forward." in k)
    rest_bytes = 2 if "fp16" in variant else 4
    closed = (memory.qlora_base_bytes(cfg, other_bytes=rest_bytes)["total"] if "NF4" in variant
              else rest_bytes * memory.parameter_count(cfg)["total"])
    model_rss = resident() - before
    tokens = torch.randint(0, cfg.vocab_size, STEP_BATCH, generator=torch.Generator().manual_seed(0))
    peak = PeakMemory(torch.device("cpu"))
    peak.reset()
    model.loss(tokens, tokens).backward()
    return {"linear_bytes": in_blocks, "base_bytes": sum(v.numel() * v.element_size() for v in base.values()),
            "closed_form": closed, "model_rss": model_rss, "step_peak": peak.read() - before, "peak_kind": peak.kind}


def build_parser() -> argparse.ArgumentParser:
    parser = T.ArgumentParser(prog="bench_qlora.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=T.threads, default=1)
    parser.add_argument("--repeats", type=T.int_range(1, 1000), default=5, help="timed steps per variant")
    parser.add_argument("--write", type=Path, default=None, help="put the table into this markdown file")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)              # the child process
    parser.add_argument("--shape", choices=("tiny", "wide"), default="tiny", help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.variant:
        result = measure_variant(args.shape, args.variant)
        print(json.dumps(result), flush=True)
        return result
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(args.threads))
    header = [f"torch {torch.__version__}; {args.threads} thread(s); resident sets from /proc/self/status, each "
              f"variant in a fresh process"]
    rows = ["| base | variant | block linears | whole base | closed form (memory.py) | resident: the model "
            "| resident: peak of a step |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    print("\n".join(header + rows), flush=True)
    results = {}
    for shape, name in (("tiny", "shipped tiny LLaMA"), ("wide", "wide random LLaMA")):
        for variant in VARIANTS:
            done = subprocess.run([sys.executable, __file__, "--variant", variant, "--shape", shape, "--threads",
                                   str(args.threads)], capture_output=True, text=True, env=env, check=True)
            r = results[f"{shape}: {variant}"] = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(f"| {name} | {variant} | {r['linear_bytes'] / MiB:.2f} MiB | {r['base_bytes'] / MiB:.2f} MiB "
                        f"| {r['closed_form'] / MiB:.2f} MiB | {r['model_rss'] / MiB:.1f} MiB | "
                        f"{r['step_peak'] / MiB:.1f} MiB |")
            print(rows[-1], flush=True)
    models = {"LoRA": build("wide", VARIANTS[0])[0].train(), "QLoRA": build("wide", VARIANTS[2])[0].train()}
    tokens = torch.randint(0, WIDE["vocab_size"], STEP_BATCH, generator=torch.Generator().manual_seed(0))
    medians = compare({n: step(lambda m=m: m.loss(tokens, tokens), m) for n, m in models.items()}, args.repeats)
    rows += ["", f"Step time on the wide fp32 base (forward + loss + backward, batch 2 x 32, median of {args.repeats}, "
             f"interleaved): LoRA {1000 * medians['LoRA']:.0f} ms, QLoRA {1000 * medians['QLoRA']:.0f} ms "
             f"({medians['QLoRA'] / medians['LoRA']:.2f}x)."]
    print(rows[-1], flush=True)
    if args.write is not None:
        write_markdown(args.write, header, rows, ["--qlora-memory", *(argv or sys.argv[1:])])
    return {"memory": results, "step_seconds": medians}


def run(argv=None) -> int:
    main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(run, "bench_qlora.py"))
