"""Time minipeft against its peers where users spend their time, same weights, one process, interleaved.

    OMP_NUM_THREADS=2 python tools/bench.py [--threads 2] [--repeats 7] [--write docs/bench.md]
        [--dim 256 --layers 4 --heads 8 --kv-heads 4 --intermediate 688 --vocab 32000 --seq 256 --batch 4]
        [--prompt-len 16 --new-tokens 64] [--masked 0.8]
    PYTHONPATH=/path/with/litgpt ...     # litgpt (pip install --target ... litgpt lightning ...) as a second peer

Peers: transformers' LlamaForCausalLM (+ peft for LoRA), each through its own documented path, and litgpt's
GPT when it can be imported (it is never a dependency of minipeft or its tests). Workloads (float32):
  * full step: every position labelled; forward + loss + backward, all weights trainable. Ours:
    label_only_loss (the trainer's path); transformers: model(input_ids, labels=...).loss; litgpt: its
    model's logits and litgpt.utils.chunked_cross_entropy (what its finetune scripts do).
  * LoRA step: r=8 on q and v, the first `masked` share of each row labelled -100 (a prompt); ours:
    PeftModel.loss; transformers + peft: model(input_ids, labels=labels).loss; litgpt: litgpt.lora.GPT.
  * greedy decode: batch x prompt_len prompt, new_tokens tokens; ours: minipeft.generate.generate (static
    cache); transformers: generate(do_sample=False).
Before timing, each workload checks that the contenders agree: the same loss (to 1e-5) and the same tokens.
Every timed call runs `repeats` times, contenders interleaved (the order rotates), after one warm-up; the
median is reported, and the ratio ours / peer (time: below 1 means ours is faster).
"""

import argparse
import copy
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from minipeft import cli_types as T  # noqa: E402
from minipeft.checkpoint import hf_tensor_to_ours  # noqa: E402
from minipeft.cli_errors import run_main  # noqa: E402
from minipeft.config import ModelConfig  # noqa: E402
from minipeft.fileio import write_text_atomic  # noqa: E402
from minipeft.generate import generate  # noqa: E402
from minipeft.loss import IGNORE_INDEX, label_only_loss  # noqa: E402
from minipeft.model import Transformer  # noqa: E402
from minipeft.peft import LoRAConfig, apply_peft  # noqa: E402
from minipeft.peft.hf_export import export_lora_to_hf_peft  # noqa: E402
from minipeft.reservation import reserve_output  # noqa: E402

LORA = dict(rank=8, alpha=16)


def build_models(args):
    """A random LlamaForCausalLM and our Transformer holding the same weights."""
    import transformers
    hf_config = transformers.LlamaConfig(
        hidden_size=args.dim, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, intermediate_size=args.intermediate, vocab_size=args.vocab,
        max_position_embeddings=max(args.seq, args.prompt_len + args.new_tokens), rms_norm_eps=1e-5,
        tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    theirs = transformers.LlamaForCausalLM(hf_config)
    theirs.generation_config.eos_token_id = None      # decode exactly new_tokens tokens, like ours
    cfg = ModelConfig.from_hf_config(hf_config.to_dict())
    with torch.device("meta"):
        ours = Transformer(cfg)
    ours.load_state_dict(dict(hf_tensor_to_ours(k, v.clone(), cfg) for k, v in theirs.state_dict().items()),
                         assign=True)
    return ours, theirs


def build_litgpt(args, theirs, lora: bool):
    """litgpt's GPT (or litgpt.lora.GPT) with the transformers model's weights, via litgpt's own converter."""
    import litgpt.lora
    import litgpt.model
    from litgpt.scripts.convert_hf_checkpoint import copy_weights_hf_llama
    fields = dict(name="bench", block_size=max(args.seq, args.prompt_len + args.new_tokens), vocab_size=args.vocab,
                  padded_vocab_size=args.vocab, n_layer=args.layers, n_head=args.heads, n_embd=args.dim,
                  n_query_groups=args.kv_heads, head_size=args.dim // args.heads, rotary_percentage=1.0,
                  parallel_residual=False, bias=False, norm_class_name="RMSNorm", norm_eps=1e-5,
                  mlp_class_name="LLaMAMLP", intermediate_size=args.intermediate, rope_base=10000)
    if lora:
        config = litgpt.lora.Config(**fields, lora_r=LORA["rank"], lora_alpha=LORA["alpha"], lora_query=True,
                                    lora_value=True)
        model = litgpt.lora.GPT(config)
    else:
        config = litgpt.model.Config(**fields)
        model = litgpt.model.GPT(config)
    state = {}
    copy_weights_hf_llama(config, {}, state, {k: v.clone() for k, v in theirs.state_dict().items()})
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("lora_" in k for k in missing), (missing, unexpected)
    if lora:
        litgpt.lora.mark_only_lora_as_trainable(model)
    return model


def step(loss_fn, model):
    """One training step's work: forward + loss + backward (the optimizer is the same for everyone)."""
    def run():
        loss = loss_fn()
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()
    return run


def litgpt_loss(model, tokens, labels):
    from litgpt.utils import chunked_cross_entropy
    return chunked_cross_entropy(model(tokens)[..., :-1, :], labels[..., 1:])


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(contenders: dict, repeats: int) -> dict:
    """name -> callable; -> name -> median seconds. Interleaved: the order rotates every repeat."""
    for fn in contenders.values():
        fn()                                                                        # warm-up
    names = list(contenders)
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(timed(contenders[name]))
    return {name: statistics.median(t) for name, t in times.items()}


def report(rows, title, medians, check):
    ours = medians["minipeft"]
    cells = [f"{1000 * medians[n]:.0f} ms" if medians[n] == medians[n] else "-" for n in medians]   # nan: not run
    ratios = {n: ours / medians[n] for n in medians if n != "minipeft" and medians[n] == medians[n]}
    line = f"| {title} | " + " | ".join(cells) + " | " + ", ".join(f"{r:.2f}x vs {n}" for n, r in ratios.items()) + f" | {check} |"
    print(line, flush=True)
    rows.append(line)
    return ratios


def build_parser() -> argparse.ArgumentParser:
    """The flags; the sizes are bounded (minipeft/cli_types.py) so a typo never allocates a huge model."""
    parser = T.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=T.threads, default=2)
    parser.add_argument("--repeats", type=T.int_range(1, 1000), default=7, help="timed calls per contender")
    parser.add_argument("--dim", type=T.dim, default=256)
    parser.add_argument("--layers", type=T.layers, default=4)
    parser.add_argument("--heads", type=T.dim, default=8)
    parser.add_argument("--kv-heads", type=T.dim, default=4)
    parser.add_argument("--intermediate", type=T.dim, default=688)
    parser.add_argument("--vocab", type=T.vocab_size, default=32000)
    parser.add_argument("--seq", type=T.seq_len, default=256)
    parser.add_argument("--batch", type=T.batch_size, default=4)
    parser.add_argument("--prompt-len", type=T.seq_len, default=16)
    parser.add_argument("--new-tokens", type=T.seq_len, default=64)
    parser.add_argument("--masked", type=T.closed_fraction, default=0.8,
                        help="share of each row labelled -100 (LoRA step)")
    parser.add_argument("--skip", choices=["full", "lora", "decode"], action="append", default=[])
    parser.add_argument("--write", type=Path, default=None, help="put the table into this markdown file")
    return parser


def main(argv=None) -> dict:
    """Run the workloads; -> {workload: ratios} (the table is printed, and written with --write)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.prompt_len > args.seq:
        parser.error(f"argument --prompt-len: the prompt is cut from a --seq {args.seq} row; expected at most "
                     f"{args.seq}, got {args.prompt_len}")

    torch.set_num_threads(args.threads)
    import peft
    import transformers
    try:
        import litgpt  # noqa: F401
        from importlib.metadata import version
        has_litgpt, litgpt_note = True, f"litgpt {version('litgpt')}"
    except ImportError as error:
        has_litgpt, litgpt_note = False, f"litgpt not importable ({error})"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    header = [f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
              f"{litgpt_note}; {args.threads} threads, median of {args.repeats}, load average {load:.1f} at start",
              f"model: dim {args.dim}, {args.layers} layers, {args.heads} heads / {args.kv_heads} kv heads, ffn "
              f"{args.intermediate}, vocab {args.vocab}; float32; batch {args.batch} x seq {args.seq}"]
    print("\n".join(header), flush=True)
    ours, theirs = build_models(args)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    peers = "transformers" + (" | litgpt" if has_litgpt else "")
    rows = [f"| workload | minipeft | {peers} | time ratio (ours / peer; target) | agreement |",
            "| --- | ---: | ---: " + ("| ---: " if has_litgpt else "") + "| --- | --- |"]
    print("\n".join(rows), flush=True)
    results = {}

    if "full" not in args.skip:
        mine, hf = copy.deepcopy(ours).train(), copy.deepcopy(theirs).train()
        contenders = {"minipeft": step(lambda: label_only_loss(mine, tokens, tokens), mine),
                      "transformers": step(lambda: hf(input_ids=tokens, labels=tokens).loss, hf)}
        if has_litgpt:
            lit = build_litgpt(args, theirs, lora=False).train()
            contenders["litgpt"] = step(lambda: litgpt_loss(lit, tokens, tokens), lit)
        losses = {n: fn() for n, fn in contenders.items()}
        check = agreement(losses)
        results["full"] = report(rows, "full fine-tuning step, every position labelled (target <= 1.00x vs "
                                 "transformers)", compare(contenders, args.repeats), check)
        del mine, hf, contenders

    if "lora" not in args.skip:
        labels = tokens.clone()
        labels[:, :int(args.masked * args.seq)] = IGNORE_INDEX
        mine = apply_peft(copy.deepcopy(ours), LoRAConfig(targets=("wq", "wv"), **LORA)).train()
        with torch.no_grad():                                                      # B != 0: LoRA changes the loss
            gen = torch.Generator().manual_seed(2)
            for name, p in mine.named_parameters():
                if name.endswith("lora_B"):
                    p.copy_(0.01 * torch.randn(p.shape, generator=gen))
        import peft as hf_peft
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "hf-lora"                                    # a new folder: the export never overwrites
            export_lora_to_hf_peft(mine, folder)
            hf = hf_peft.PeftModel.from_pretrained(copy.deepcopy(theirs), str(folder), is_trainable=True).train()
        contenders = {"minipeft": step(lambda: mine.loss(tokens, labels), mine),
                      "transformers": step(lambda: hf(input_ids=tokens, labels=labels).loss, hf)}
        if has_litgpt:
            lit = build_litgpt(args, theirs, lora=True).train()
            contenders["litgpt"] = step(lambda: litgpt_loss(lit, tokens, labels), lit)
        losses = {n: fn() for n, fn in contenders.items()}
        if has_litgpt:                                                             # its LoRA B starts at 0
            losses["litgpt"] = None
        check = agreement(losses)
        results["lora"] = report(rows, f"LoRA r=8 q,v step, first {args.masked:.0%} of each row -100 (target "
                                 "<= 0.67x vs transformers+peft)", compare(contenders, args.repeats), check)
        del mine, hf, contenders

    if "decode" not in args.skip:
        mine, hf = ours.eval(), theirs.eval()
        prompt = tokens[:, :args.prompt_len]
        prompts = prompt.tolist()

        def ours_decode():
            return torch.tensor(generate(mine, prompts, args.new_tokens))

        @torch.no_grad()
        def theirs_decode():
            out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                              max_new_tokens=args.new_tokens, pad_token_id=0)
            return out[:, prompt.shape[1]:]
        same = torch.equal(ours_decode(), theirs_decode())
        medians = compare({"minipeft": ours_decode, "transformers": theirs_decode}, args.repeats)
        if has_litgpt:
            medians["litgpt"] = float("nan")
        results["decode"] = report(rows, f"greedy decode, batch {args.batch}, prompt {args.prompt_len}, "
                                   f"{args.new_tokens} new tokens (target <= 0.50x vs generate)", medians,
                                   f"same tokens: {same}")
    if args.write is not None:
        write_markdown(args.write, header, rows, argv)
    return results


def agreement(losses: dict) -> str:
    """'same loss' if every given loss is within 1e-5 of ours; the losses otherwise."""
    ours = losses["minipeft"]
    diffs = {n: abs(v - ours) for n, v in losses.items() if n != "minipeft" and v is not None}
    same = all(d <= 1e-5 for d in diffs.values())
    return f"loss {ours:.6f}, " + ", ".join(f"diff {d:.1e} vs {n}" for n, d in diffs.items()) + \
        ("" if same else " (DIFFERENT)")


def write_markdown(path: Path, header, rows, argv):
    """Replace the text between the bench markers of `path` with this run's command and table (the rest of the
    file is kept: --write updates a results page). The file is reserved while it is read and written, and replaced
    in one step (a crash leaves the old page or the new one)."""
    begin, end = "<!-- bench:begin -->", "<!-- bench:end -->"
    extra = ":" + os.path.dirname(os.path.dirname(__import__("litgpt").__file__)) if "litgpt" in sys.modules else ""
    command = f"PYTHONPATH=.{extra} OMP_NUM_THREADS=2 .venv/bin/python tools/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    block = "\n".join([begin, f"Run {stamp}:", "", "    " + command.strip(), "", "```", *header, "```", "", *rows,
                       end])
    with reserve_output(path, overwrite=True):
        text = path.read_text(encoding="utf-8") if path.exists() else f"# Benchmark\n\n{begin}\n{end}\n"
        if begin in text and end in text:
            text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
        else:
            text = text + "\n" + block + "\n"
        write_text_atomic(path, text)


def run(argv=None) -> int:
    """main() as a command: exit status 0 once the table is printed."""
    main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(run, "bench.py"))
