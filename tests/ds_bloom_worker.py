"""One DeepSpeed rank for tests/test_bloom_deepspeed.py, started by torchrun (2 ranks): ZeRO-3 LoRA on a tiny
BLOOM (wqkv, wo, w1, w2), the base loaded partitioned; writes per rank a JSON of facts, and on rank 0 DeepSpeed's
own zero_to_fp32 consolidation of the engine checkpoint (the independent route to the trained adapter). Then
ZeRO-2 with LLaMA-Adapter on the same BLOOM (frozen base, falling loss).

    python -m torch.distributed.run --nproc_per_node 2 tests/ds_bloom_worker.py WORKSPACE.json OUT_DIR
"""

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from minipeft.checkpoint import load_model  # noqa: E402
from minipeft.peft import LlamaAdapterConfig, LoRAConfig  # noqa: E402
from minipeft.train import TrainConfig, build_trainer, prepare_run  # noqa: E402
from ds_worker import end_ranks, frozen_unchanged, record_facts  # noqa: E402  (the rank helpers of tests/ds_worker.py)




def flags(ws, out, **extra) -> dict:
    return dict(model=ws["model"], train_data=ws["train"], val_data=ws["val"], max_seq_len=ws["max_seq_len"],
                batch_size=2, grad_accum=1, warmup_steps=1, seed=0, device="cpu", out=str(out),
                progress=False, exact_match=False, eval_batch_size=8, **{"lr": 5e-2, "max_steps": 6, **extra})


def run_zero2_llama_adapter(ws, out_dir, rank) -> dict:
    cfg, ds_config, base, tokenizer, data = prepare_run(TrainConfig(**flags(
        ws, out_dir / "zero2_la", peft=LlamaAdapterConfig(prompt_len=4, adapter_layers=2), deepspeed=ws["zero2"],
        lr=2e-1, max_steps=8)))
    trainer = build_trainer(cfg, base, tokenizer, data, ds_config)
    facts = {"zero_stage": trainer.engine.zero_optimization_stage(),
             "losses": [h["loss"] for h in trainer.train()],
             "frozen_unchanged": frozen_unchanged(trainer, load_model(ws["model"]).state_dict()),
             "adapter": str(trainer.save_final())}
    dist.barrier()
    return facts


def run(ws, out_dir, rank) -> dict:
    cfg, ds_config, base, tokenizer, data = prepare_run(TrainConfig(**flags(
        ws, out_dir / "zero3_lora", peft=LoRAConfig(rank=4, targets=("wqkv", "wo", "w1", "w2")), deepspeed=ws["zero3"])))
    facts = {"partitioned": any(hasattr(p, "ds_id") for p in base.parameters())}
    trainer = build_trainer(cfg, base, tokenizer, data, ds_config)
    facts["zero_stage"] = trainer.engine.zero_optimization_stage()
    facts["losses"] = [h["loss"] for h in trainer.train()]
    facts["frozen_unchanged"] = frozen_unchanged(trainer, load_model(ws["model"]).state_dict())
    facts["adapter"] = str(trainer.save_final())
    tag_dir = trainer.save_checkpoint()
    if rank == 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name,
                                                         exclude_frozen_parameters=True)
        torch.save({k: v.float() for k, v in state.items()}, out_dir / "zero_to_fp32.pt")
    dist.barrier()
    return facts


def main():
    ws = json.loads(Path(sys.argv[1]).read_text())
    out_dir = Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    for name, case in (("zero3_lora", run), ("zero2_la", run_zero2_llama_adapter)):
        record_facts(out_dir, rank, name, lambda: case(ws, out_dir, rank))
    end_ranks()


if __name__ == "__main__":
    main()
