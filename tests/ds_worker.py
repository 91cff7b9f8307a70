"""One DeepSpeed rank for tests/test_deepspeed.py, started by torchrun (2 ranks). Runs several training
configurations in sequence in one launch (DeepSpeed start-up is the slow part) and writes, per rank and
case, a JSON file of facts the test checks:

    python -m torch.distributed.run --nproc_per_node 2 tests/ds_worker.py WORKSPACE.json OUT_DIR

Cases (WORKSPACE.json from train_helpers.make_workspace plus the config paths):
  zero2_lora          ZeRO-2, LoRA, fp32
  zero3_offload_la    ZeRO-3 with optimizer + parameter offload to CPU, LLaMA-Adapter, fp32; also an engine
                      checkpoint consolidated by DeepSpeed's zero_to_fp32 (the independent route to the
                      trained values) and the logits of the engine on a validation batch
  zero3_lora_bf16     ZeRO-3, LoRA, bf16
  <case>_full_load    for the two ZeRO-3 cases: the same run with the whole base loaded on every rank
                      (load_model, as before the partitioned load existed), for the losses to compare
  cli_zero2           tools/finetune.py main() itself with --deepspeed zero2.json

The ZeRO-3 cases also record whether the partitioned base, gathered right after loading, equals the
checkpoint's tensors exactly (loaded_exact).
"""

import json
import os
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from minipeft.checkpoint import load_model  # noqa: E402
from minipeft.data import collate  # noqa: E402
import minipeft.train.prepare  # noqa: E402
from minipeft.peft import LlamaAdapterConfig, LoRAConfig  # noqa: E402
from minipeft.train import TrainConfig, base_dtype, build_trainer, prepare_run  # noqa: E402


def frozen_unchanged(trainer, original: dict) -> bool:
    """Every frozen parameter equals the base checkpoint's value (in the engine's dtype), gathered in full."""
    import deepspeed
    frozen = [(n, p) for n, p in trainer.model.named_parameters() if not p.requires_grad]
    gathered = deepspeed.zero.GatheredParameters([p for _, p in frozen], modifier_rank=None)
    with gathered:
        return all(torch.equal(p.detach().cpu(), original[n.removeprefix("base.")].to(p.dtype)) for n, p in frozen)


def record_facts(out_dir: Path, rank: int, name: str, case) -> None:
    """Run case() and write what it returns, or its traceback, to out_dir/rank<rank>_<name>.json."""
    try:
        facts = case()
    except Exception:
        facts = {"error": traceback.format_exc()}
    (out_dir / f"rank{rank}_{name}.json").write_text(json.dumps(facts))


def end_ranks() -> None:
    """Wait for every rank, leave the process group and exit at once (skipping interpreter teardown)."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def gathered_equal(model, expected: dict) -> bool:
    """Every parameter of a (partitioned) model, gathered in full, equals expected[name] exactly."""
    import deepspeed
    params = dict(model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        return set(params) == set(expected) and all(torch.equal(p.detach(), expected[n]) for n, p in params.items())


def load_whole_base(cfg, ds_config):
    """Stands in for load_base_partitioned in the *_full_load cases: the whole base on every rank."""
    return load_model(cfg.model, dtype=base_dtype(cfg))


def run_full_load(name, ws, out_dir, rank, **flags):
    """The same run with the full-load path; only its losses and frozen-weight check are kept."""
    partitioned = minipeft.train.prepare.load_base_partitioned
    minipeft.train.prepare.load_base_partitioned = load_whole_base
    try:
        cfg, ds_config, base, tokenizer, data = prepare_run(TrainConfig(**common_flags(name, ws, out_dir, flags)))
    finally:
        minipeft.train.prepare.load_base_partitioned = partitioned
    assert not any(hasattr(p, "ds_id") for p in base.parameters())
    trainer = build_trainer(cfg, base, tokenizer, data, ds_config)
    facts = {"losses": [h["loss"] for h in trainer.train()],
             "frozen_unchanged": frozen_unchanged(trainer, load_model(ws["model"]).state_dict())}
    dist.barrier()
    return facts


def common_flags(name, ws, out_dir, flags):
    common = dict(model=ws["model"], train_data=ws["train"], val_data=ws["val"], max_seq_len=ws["max_seq_len"],
                  batch_size=2, grad_accum=2, max_steps=8, warmup_steps=1, seed=0, device="cpu",
                  out=str(out_dir / name), progress=False, exact_match=False, eval_batch_size=8)
    common.update(flags)
    return common


def run_case(name, ws, out_dir, rank, **flags):
    cfg, ds_config, base, tokenizer, data = prepare_run(TrainConfig(**common_flags(name, ws, out_dir, flags)))
    facts = {"partitioned": any(hasattr(p, "ds_id") for p in base.parameters())}
    if facts["partitioned"]:
        checkpoint = {n: t.to(base_dtype(cfg)) for n, t in load_model(ws["model"]).state_dict().items()}
        facts["loaded_exact"] = gathered_equal(base, checkpoint)
    trainer = build_trainer(cfg, base, tokenizer, data, ds_config)
    facts.update({"zero_stage": trainer.engine.zero_optimization_stage(), "world_size": trainer.world_size,
                  "train_batch_size": trainer.engine.train_batch_size(),
                  "val_before": trainer.evaluate()["val_loss"]})
    history = trainer.train()
    facts["losses"] = [h["loss"] for h in history]
    facts["val_after"] = trainer.evaluate()["val_loss"]
    facts["frozen_unchanged"] = frozen_unchanged(trainer, load_model(ws["model"]).state_dict())
    facts["adapter"] = str(trainer.save_final())
    facts["engine_dtype"] = str(next(p for _, p in trainer.trainable).dtype)

    if cfg.method == "llama_adapter":
        # the independent route: DeepSpeed's own checkpoint, consolidated by its zero_to_fp32
        tag_dir = trainer.save_checkpoint()
        if rank == 0:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
            state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name,
                                                             exclude_frozen_parameters=True)
            torch.save({k: v.float() for k, v in state.items()}, out_dir / f"{name}_zero_to_fp32.pt")
        batch = collate(trainer.data.val[:4], trainer.pad_id)
        trainer.engine.eval()
        with torch.no_grad():
            logits = trainer.engine(batch["input_ids"])                       # (4, T, V): a collective
        if rank == 0:
            torch.save({"input_ids": batch["input_ids"], "logits": logits.float()}, out_dir / f"{name}_logits.pt")
    dist.barrier()
    return facts


def main():
    ws = json.loads(Path(sys.argv[1]).read_text())
    out_dir = Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    cases = [
        ("zero2_lora", dict(peft=LoRAConfig(rank=4), lr=5e-2, deepspeed=ws["zero2"])),
        ("zero3_offload_la", dict(peft=LlamaAdapterConfig(prompt_len=4, adapter_layers=2), lr=2e-1,
                                  deepspeed=ws["zero3_offload"])),
        ("zero3_lora_bf16", dict(peft=LoRAConfig(rank=4), lr=5e-2, precision="bf16", deepspeed=ws["zero3"])),
    ]
    runs = [(name, run_case, flags) for name, flags in cases]
    runs += [(name + "_full_load", run_full_load, flags) for name, flags in cases if name.startswith("zero3")]
    for name, run, flags in runs:
        record_facts(out_dir, rank, name, lambda: run(name, ws, out_dir, rank, **flags))

    import finetune                                   # the command-line entry point itself, same process group
    argv = ["--model", ws["model"], "--train-data", ws["train"], "--val-data", ws["val"], "--max-seq-len",
            str(ws["max_seq_len"]), "--max-steps", "2", "--batch-size", "2", "--no-progress", "--out", str(out_dir / "cli"),
            "--deepspeed", ws["zero2"]]
    record_facts(out_dir, rank, "cli_zero2", lambda: {"exit_code": finetune.main(argv)})
    end_ranks()


if __name__ == "__main__":
    main()
