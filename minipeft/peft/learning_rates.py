"""The tuned default peak learning rates of the built-in methods, and the comparison's sweep grid: the one home
of these numbers. Each table says which base and budget it was tuned for; methods that train few parameters
need larger rates. The registry entries (registry.py) carry them as `LearningRates`; the tools read them from
there, so a method registered from outside the package brings its own (or is asked for --lr).
"""

# A real LLaMA base (7B), the usual values in the literature: Alpaca's 2e-5 for full fine-tuning,
# alpaca-lora's 3e-4 for LoRA (the same for Houlsby adapters), the LLaMA-Adapter paper's 9e-3, 3e-2 for
# prompt tuning and 1e-2 for prefix tuning.
REAL_BASE_LR = {"full": 2e-5, "lora": 3e-4, "prompt": 3e-2, "prefix": 1e-2, "adapter": 3e-4,
                "llama_adapter": 9e-3,
                # provisional, from the papers, not tuned here: DoRA used LoRA's rates; (IA)^3's T-Few recipe 3e-3
                "dora": 3e-4, "ia3": 3e-3}

# The shipped tiny model (minipeft/assets/tiny-llama) on the demo tasks, for the main job (tools/finetune.py
# with no --model: 600 steps of batch 8). lessons/10_comparison's sweep chose these, except LoRA's, which was
# tuned on the main job itself (6e-3: validation loss 2.32 vs 2.96 at 2e-3).
TINY_MODEL_LR = {"full": 1e-3, "lora": 6e-3, "prompt": 1e-1, "prefix": 3e-3, "adapter": 1e-2,
                 "llama_adapter": 0.27,
                 # provisional (not swept over 600 steps): DoRA at LoRA's rate; (IA)^3 from a 30-step sweep on
                 # 96 demo examples (held-out loss 8.98 before; 7.26 / 5.43 / 4.04 / 3.92 at 1e-2 / 3e-2 / 1e-1 /
                 # 3e-1): the lower of the two best (scale vectors near 1 take large rates, as LLaMA-Adapter's gates do)
                 "dora": 6e-3, "ia3": 1e-1}

# The shipped tiny model, for tools/compare_methods.py's default budget (one epoch of 400 examples): the
# rates its own one-epoch sweep chose (lessons/10_comparison/results.json). LoRA's best rate differs from
# the main job's because the budget does: over one short epoch a larger rate wins.
TINY_COMPARISON_LR = {"full": 1e-3, "lora": 1e-2, "prompt": 1e-1, "prefix": 3e-3, "adapter": 1e-2,
                      "llama_adapter": 0.27,
                      "dora": 1e-2, "ia3": 1e-1}      # provisional, as TINY_MODEL_LR's: not from the one-epoch sweep

# tools/compare_methods.py --sweep: three rates per method, a factor ~3 apart, centred on the usual ratio between
# methods: full fine-tuning lowest; LoRA and adapters ~3x higher; LLaMA-Adapter, prefix and prompt tuning 10-100x
# higher. (TINY_COMPARISON_LR above is what this grid chose, extended past its edge where needed.)
SWEEP_GRID = {"full": (3e-4, 1e-3, 3e-3), "lora": (1e-3, 3e-3, 1e-2), "llama_adapter": (3e-3, 1e-2, 3e-2),
              "prompt": (3e-2, 1e-1, 3e-1), "prefix": (3e-3, 1e-2, 3e-2), "adapter": (1e-3, 3e-3, 1e-2),
              "dora": (1e-3, 3e-3, 1e-2), "ia3": (3e-2, 1e-1, 3e-1)}

# QLoRA trains LoRA's A and B on a 4-bit copy of the base: LoRA's rates (the QLoRA paper kept LoRA's usual ones,
# 2e-4 at 7B-13B; lessons/11_beyond_the_note/qlora.md measures it against LoRA at LoRA's tiny-base rate).
for _table in (REAL_BASE_LR, TINY_MODEL_LR, TINY_COMPARISON_LR, SWEEP_GRID):
    _table["qlora"] = _table["lora"]
