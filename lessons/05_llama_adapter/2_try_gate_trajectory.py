"""Lesson 05, try this: the gate (门控因子) over a run, zero vs random gate init, and why the prompt
(适配提示) must start random.

Train LLaMA-Adapter (K = 10 on all 4 layers, tanh gate) on the shipped tiny model for 25 steps at the
rate lesson 10 chose (0.27) and record tanh(g) of every layer after every step. Then the same run with
the gates started at random, and one with the prompt started at zero.

    PYTHONPATH=. python lessons/05_llama_adapter/2_try_gate_trajectory.py
Try GATE_INIT_STD = 0.1 or LR = 0.01.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # lessons/
from checks import check, check_quoted, check_true  # noqa: E402
from tiny_training import demo_examples, load_tiny, train_steps, val_loss  # noqa: E402

from minipeft.peft import GatedAdapterPrompt, LlamaAdapterConfig, apply_peft

STEPS, LR, K, GATE_INIT_STD = 25, 0.27, 10, 1.0

_, tokenizer = load_tiny()
_, train_examples = demo_examples(tokenizer, "train", n=96)
_, heldout = demo_examples(tokenizer, "heldout", n=32)


def adapted(init=None):
    """A fresh LLaMA-Adapter model; init(layer) may overwrite a layer's gate or prompt."""
    base, _ = load_tiny()
    torch.manual_seed(0)
    model = apply_peft(base, LlamaAdapterConfig(prompt_len=K, adapter_layers=base.config.n_layers))
    layers = [m for m in model.modules() if isinstance(m, GatedAdapterPrompt)]
    if init is not None:
        with torch.no_grad():
            for layer in layers:
                init(layer)
    return model, layers


base, _ = load_tiny()
base_loss = val_loss(base, heldout)

print("1. Zero gate: the run starts at the base model; the first step moves only the gates")
model, layers = adapted()
check("held-out loss before training == the base model's", val_loss(model, heldout), base_loss, 1e-6)
prompts_before = [layer.adapter_prompt.detach().clone() for layer in layers]
trajectory = []                                                     # (steps, layers) mean |tanh(g)| per layer


def record(step, model):
    trajectory.append([layer.gate_values().abs().mean().item() for layer in layers])
    if step == 0:                                                   # Adam with a zero gradient moves nothing
        moved = max((layer.adapter_prompt - p).abs().max().item() for layer, p in zip(layers, prompts_before))
        check("  after step 1: largest change of any prompt entry", moved, 0.0, 0.0)
        check_true("  after step 1: mean |tanh(g)| of layer 0", trajectory[0][0], "> 0", trajectory[0][0] > 0)


train_steps(model, train_examples, STEPS, LR, on_step=record)
zero_gate_loss = val_loss(model, heldout)
print("   mean |tanh(g)| per layer (0 .. 3) after steps 1, 5, 10, 25:")
for step in (0, 4, 9, STEPS - 1):
    print(f"     step {step + 1:2d}: " + "  ".join(f"{g:.3f}" for g in trajectory[step]))
final = trajectory[-1]
check_true("gates opened during the run: mean |tanh(g)| over layers after the last step", sum(final) / len(final),
           "> 0.05", sum(final) / len(final) > 0.05)
check_true("held-out loss after the run", zero_gate_loss, f"< base {base_loss:.3f}", zero_gate_loss < base_loss)

print("2. Random gate, g ~ N(0, 1): the model no longer starts at the base")


def random_gate(layer):
    layer.adapter_gate.normal_(0.0, GATE_INIT_STD)


model, layers = adapted(random_gate)
start_loss = val_loss(model, heldout)
check_true("|held-out loss before training - base's|: the random prompt already leaks in", abs(start_loss - base_loss),
           "> 0.01", abs(start_loss - base_loss) > 0.01)
train_steps(model, train_examples, STEPS, LR)
random_gate_loss = val_loss(model, heldout)
print(f"   after {STEPS} steps: {random_gate_loss:.3f} (zero gate: {zero_gate_loss:.3f})")
check_true("it still trains: held-out loss after the run", random_gate_loss, f"< base {base_loss:.3f}",
           random_gate_loss < base_loss)
print("   (one seed, one rate: a hint, not a law. The tiny base is poor at these tasks, so a disturbed start")
print("   costs it little to lose; a 7B base that already answers well has more to lose, which the zero gate avoids)")

README = (Path(__file__).resolve().parent / "README.md").read_text(encoding="utf-8")
check_quoted("the README's gate after step 1", README, "mean |tanh(g)| is {} in every layer", trajectory[0][0], 0.005)
check_quoted("the README's gates after step 25", README, "by step 25 the layers differ ({}, {}, {}, {})", final, 0.005)
check_quoted("the README's random-gate start and the two end losses", README,
             "(|Δ| = {}) and ends at {} against the zero gate's {}", [abs(start_loss - base_loss), random_gate_loss,
                                                                  zero_gate_loss], 0.005)
print("3. Zero prompt: nothing ever trains (so the prompt must start random)")
# P = 0 gives k_p = v_p = 0, so A_p = softmax(0) v_p = 0: dL/dg = <U, A_p> = 0, and dL/dP carries tanh(g) = 0.


def zero_prompt(layer):
    layer.adapter_prompt.zero_()


model, layers = adapted(zero_prompt)
train_steps(model, train_examples, 5, LR)
largest = max(max(layer.adapter_prompt.abs().max().item(), layer.adapter_gate.abs().max().item()) for layer in layers)
check("after 5 steps: largest |entry| of any prompt or gate", largest, 0.0, 0.0)
check("held-out loss still the base model's", val_loss(model, heldout), base_loss, 1e-6)
print("all checks passed")
