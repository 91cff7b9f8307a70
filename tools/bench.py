"""Time our Transformer against transformers' LlamaForCausalLM on the same weights, in one process.

    python tools/bench.py [--threads 2] [--repeats 5] [--dim 256 --layers 4 --heads 8 --intermediate 688
                          --vocab 32000 --seq 256 --batch 4] [--prompt-len 16 --new-tokens 32]

Two workloads, each run `repeats` times with ours and theirs interleaved (the order alternates), after one
warm-up each; the median is reported and the ratio theirs / ours (> 1 means ours is faster):
  * train step: forward + cross-entropy + backward on a (batch, seq) batch, float32;
  * greedy decoding: a (batch, prompt_len) prompt, then new_tokens tokens one at a time through the KV cache
    (ours: the loop below; theirs: generate(do_sample=False)). Both must produce the same tokens.
Before timing, the logits of both models are compared, so the two really compute the same function.
The machine may be shared: absolute times are noisy, the interleaved ratio less so.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a checkout without installing
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from minipeft.checkpoint import hf_tensor_to_ours  # noqa: E402
from minipeft.config import ModelConfig  # noqa: E402
from minipeft.model import Transformer  # noqa: E402


def build_models(args):
    """A random LlamaForCausalLM and our Transformer holding the same weights."""
    import transformers
    hf_config = transformers.LlamaConfig(
        hidden_size=args.dim, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads or args.heads, intermediate_size=args.intermediate,
        vocab_size=args.vocab, max_position_embeddings=max(args.seq, args.prompt_len + args.new_tokens),
        rms_norm_eps=1e-5, tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    theirs = transformers.LlamaForCausalLM(hf_config)
    theirs.generation_config.eos_token_id = None      # decode exactly new_tokens tokens, like our loop
    cfg = ModelConfig.from_hf_config(hf_config.to_dict())
    with torch.device("meta"):
        ours = Transformer(cfg)
    ours.load_state_dict(dict(hf_tensor_to_ours(k, v.clone(), cfg) for k, v in theirs.state_dict().items()),
                         assign=True)
    return ours, theirs


def train_step(model, tokens, is_hf):
    logits = model(input_ids=tokens).logits if is_hf else model(tokens)            # (B, T, V)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    loss.backward()
    model.zero_grad(set_to_none=True)


@torch.no_grad()
def greedy_ours(model, prompt, new_tokens):
    """prompt (B, P) -> (B, new_tokens): argmax decoding with the KV cache."""
    logits, cache = model(prompt, use_cache=True)
    next_token = logits[:, -1].argmax(-1, keepdim=True)                             # (B, 1)
    generated = [next_token]
    for _ in range(new_tokens - 1):
        logits, cache = model(next_token, past_key_values=cache, use_cache=True)
        next_token = logits[:, -1].argmax(-1, keepdim=True)
        generated.append(next_token)
    return torch.cat(generated, dim=1)


@torch.no_grad()
def greedy_theirs(model, prompt, new_tokens):
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                         max_new_tokens=new_tokens, pad_token_id=0)
    return out[:, prompt.shape[1]:]


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(name, ours_fn, theirs_fn, repeats):
    ours_fn(), theirs_fn()                                                          # warm-up
    ours_times, theirs_times = [], []
    for r in range(repeats):
        if r % 2 == 0:
            ours_times.append(timed(ours_fn)), theirs_times.append(timed(theirs_fn))
        else:
            theirs_times.append(timed(theirs_fn)), ours_times.append(timed(ours_fn))
    ours_ms, theirs_ms = 1000 * statistics.median(ours_times), 1000 * statistics.median(theirs_times)
    print(f"{name:<22} ours {ours_ms:9.1f} ms   transformers {theirs_ms:9.1f} ms   "
          f"ratio theirs/ours {theirs_ms / ours_ms:5.2f}")
    return ours_ms, theirs_ms


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads (multi-head attention)")
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--skip", choices=["train", "decode"], action="append", default=[])
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    import transformers
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {args.threads}, "
          f"median of {args.repeats}")
    print(f"model: dim {args.dim}, {args.layers} layers, {args.heads} heads ({args.kv_heads or args.heads} kv), "
          f"ffn {args.intermediate}, vocab {args.vocab}; float32")
    ours, theirs = build_models(args)

    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    with torch.no_grad():
        check = tokens[:, :64]
        reference = theirs(input_ids=check).logits
        error = ((ours(check) - reference).abs().max() / reference.abs().max()).item()
    print(f"logit check: relative difference {error:.1e}")
    if error > 1e-4:
        raise SystemExit("the two models disagree; timings would be meaningless")

    if "train" not in args.skip:
        ours.train(), theirs.train()
        print(f"train step: batch {args.batch} x seq {args.seq}, forward + cross-entropy + backward")
        compare("  forward+backward", lambda: train_step(ours, tokens, False),
                lambda: train_step(theirs, tokens, True), args.repeats)
    if "decode" not in args.skip:
        ours.eval(), theirs.eval()
        prompt = tokens[:, :args.prompt_len]
        same = torch.equal(greedy_ours(ours, prompt, args.new_tokens), greedy_theirs(theirs, prompt, args.new_tokens))
        print(f"greedy decoding: batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens "
              f"(same tokens: {same})")
        compare("  greedy decode", lambda: greedy_ours(ours, prompt, args.new_tokens),
                lambda: greedy_theirs(theirs, prompt, args.new_tokens), args.repeats)


if __name__ == "__main__":
    main()
