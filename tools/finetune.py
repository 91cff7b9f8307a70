"""Fine-tune a minipeft model with one PEFT method, and show what it learned.

    python tools/finetune.py                       # LoRA, shipped tiny model + demo data
    python tools/finetune.py --method llama_adapter --max-steps 50
    python tools/finetune.py --model checkpoints/llama-7b --train-data alpaca_data.json \\
        --max-seq-len 512 --epochs 3 --precision bf16 --gradient-checkpointing
    deepspeed --num_gpus 8 tools/finetune.py --deepspeed tools/ds_configs/zero3_offload_reference.json \\
        --model checkpoints/llama-7b --train-data alpaca_data.json --max-seq-len 512 --epochs 3

With no arguments it trains LoRA on minipeft/assets/tiny-llama with demo_data/train.json, and prints the
validation loss and exact-match accuracy on demo_data/heldout.json before and after training, a few
generations before/after side by side, and where the adapter was written (runs/<method>-<timestamp>/adapter,
or --out). `--help` lists every flag; the training loop itself is minipeft/train/loop.py.
"""

from __future__ import annotations

import os
import sys
import time

from minipeft.cli_errors import one_line, run_main
from minipeft.reservation import release_output
from minipeft.plugins import PluginError, load_plugins
from minipeft.train import RunFailed, TrainError, build_arg_parser, build_trainer, config_from_args, prepare_run

build_parser = build_arg_parser        # the flags (minipeft/train/cli.py), as every tool names them


def shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def main(argv=None) -> int:
    started = time.perf_counter()
    try:
        load_plugins(argv)                 # before the parser: a plugin's methods are --method choices
    except PluginError as err:
        print(f"finetune.py: error: {one_line(err)}", file=sys.stderr)
        return 2
    args = build_arg_parser().parse_args(argv)
    try:                                   # the defaults (shipped model, demo data, lr, ...) are prepare_run's
        cfg, ds_config, base, tokenizer, data = prepare_run(config_from_args(args))
    except (TrainError, ValueError, OSError) as err:   # bad flags, data, model or DeepSpeed config: before any work
        print(f"finetune.py: error: {one_line(err)}", file=sys.stderr)
        return 2
    try:
        return train_and_report(cfg, ds_config, base, tokenizer, data, args.samples, started)
    except RunFailed as err:               # the run started and could not finish: a non-finite update, a stop
        print(f"finetune.py: error: {one_line(err)}", file=sys.stderr)
        return 1
    except (ValueError, OSError, RuntimeError, AssertionError) as err:   # bad input found once the model is built:
        print(f"finetune.py: error: {one_line(err)}", file=sys.stderr)  # TrainError, PeftConfigError, DeepSpeed's
        return 2                                                         # config errors, a device, a full disk
    finally:                               # the run folder is free again (prepare_run reserved it)
        if cfg.out:
            release_output(cfg.out)


def train_and_report(cfg, ds_config, base, tokenizer, data, samples: int, started: float) -> int:
    """Train, evaluate before and after, save the adapter, print the comparison."""
    trainer = build_trainer(cfg, base, tokenizer, data, ds_config)
    say = print if trainer.is_main else (lambda *a, **k: None)
    for line in data.report:
        say(line)
    say(f"method {cfg.method}: {trainer.model.report}; {len(data.train)} training / {len(data.val)} validation "
        f"examples; {trainer.total_steps} steps of {cfg.batch_size} x {cfg.grad_accum} x {trainer.world_size} "
        f"examples; lr {cfg.lr:g}; {cfg.precision}; device {trainer.device}"
        + (f"; DeepSpeed ZeRO-{trainer.engine.zero_optimization_stage()}" if hasattr(trainer, "engine") else ""))
    if cfg.resume:
        trainer.resume(cfg.resume)
        say(f"resumed from {cfg.resume} at step {trainer.step}")

    before = trainer.evaluate()
    before_texts = list(getattr(trainer, "last_generations", []))
    trainer.log({"eval": True, "when": "before", **before})
    trainer.train()
    after = trainer.evaluate()
    after_texts = list(getattr(trainer, "last_generations", []))
    trainer.log({"eval": True, "when": "after", **after})
    folder = trainer.save_final()

    def show(result, key, fmt):
        return fmt.format(result[key]) if key in result else "-"
    say("")
    say(f"{'':12}{'val loss':>10}{'exact match':>14}")
    say(f"{'before':12}{show(before, 'val_loss', '{:10.4f}')}{show(before, 'exact_match', '{:14.1%}')}")
    say(f"{'after':12}{show(after, 'val_loss', '{:10.4f}')}{show(after, 'exact_match', '{:14.1%}')}")
    if before_texts and after_texts:
        say("\nheld-out examples (instruction | expected | before | after):")
        for record, b, a in list(zip(data.val_records, before_texts, after_texts))[:samples]:
            say(f"  {shorten(record.instruction + (' / ' + record.input if record.input else ''), 48)}\n"
                f"      expected: {shorten(record.output, 60)}\n"
                f"      before:   {shorten(b, 60)}\n"
                f"      after:    {shorten(a, 60)}")
    say(f"\n{'model' if cfg.method == 'full' else 'adapter'} written to {folder}; metrics in "
        f"{trainer.run_dir / 'metrics.jsonl'}; wall time {time.perf_counter() - started:.1f} s")
    trainer.close()                        # the run folder is free again (a DeepSpeed rank ends with os._exit)
    return 0


def end_distributed_process(code: int) -> None:
    """End a DeepSpeed rank cleanly: barrier, destroy the process group, flush, os._exit (a plain exit
    sometimes aborts in a gloo/DeepSpeed destructor after all work is done: notes/deepspeed-on-cpu.md)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    exit_code = run_main(main, "finetune.py")
    end_distributed_process(exit_code)
    sys.exit(exit_code)
