"""Train the tiny LLaMA the package ships: a SentencePiece tokenizer, then a small decoder from scratch.

    PYTHONPATH=. python tools/pretrain_tiny.py --corpus ../shared/data/shakespeare.txt \
        --corpus ../shared/data/kjv.txt --corpus ../shared/data/tang_song_poems_zh.txt:0.15 --out runs/tiny

Steps:
 (a) tokenizer: SentencePiece BPE as LLaMA's (byte fallback, digits split, unk 0 / bos 1 / eos 2, no pad
     piece, identity normalisation so newlines survive as the byte piece <0x0A>), trained on the training
     part of the corpus with small files repeated so every file has a say (--tokenizer-min-share).
 (b) model: each file is cut at a line boundary; its last --val-fraction of the text is held out for
     validation. A training sample picks a file with the weight given after ':' in --corpus (default:
     proportional to its token count), then a random window w of seq_len tokens inside it; the model
     reads [bos] + w[:-1] and predicts w, so every sample looks like the start of a prompt:

         loss = mean_t  -log softmax(model([bos] + w[:-1]))[t, w[t]]        over t = 0..seq_len-1

     AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), linear warm-up then cosine decay to
     lr * min_lr_ratio, gradient clipping at 1.0.
 (c) output in --out: tokenizer.model, train_state.pt (resumable: model, optimizer, step, RNG states,
     history; written via temp file + rename every --save-every steps), loss_curve.png, metrics.json,
     val_text.txt (a slice of held-out text) and tiny-llama/ (our checkpoint folder, fp16).

Perplexity of a text (used for metrics.json and by tests/test_assets.py): encode the text without bos,
cut the ids into consecutive chunks of at most seq_len tokens, score each chunk c as [bos] + c[:-1] -> c,
and take exp(total negative log-likelihood / total number of scored tokens).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing

from minipeft.config import ModelConfig  # noqa: E402
from minipeft.fileio import write_atomic  # noqa: E402
from minipeft.model import Transformer  # noqa: E402


class PretrainError(ValueError):
    """Bad arguments or corpus files for pretraining."""


# ---------------------------------------------------------------------------------------------------
# corpus
# ---------------------------------------------------------------------------------------------------
def parse_corpus_arg(arg: str):
    """'path' or 'path:weight' -> (Path, weight or None)."""
    path, weight = arg, None
    head, sep, tail = arg.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
            path = head
        except ValueError:
            pass
    p = Path(path)
    if not p.is_file():
        raise PretrainError(f"--corpus {arg!r}: no such file {p}")
    if weight is not None and weight <= 0:
        raise PretrainError(f"--corpus {arg!r}: the sampling weight after ':' must be positive")
    return p, weight


def split_train_val(text: str, val_fraction: float):
    """Cut at the first line boundary after (1 - val_fraction) of the characters: (train_text, val_text)."""
    cut = int(len(text) * (1.0 - val_fraction))
    newline = text.find("\n", cut)
    cut = len(text) if newline < 0 else newline + 1
    return text[:cut], text[cut:]


def first_lines(text: str, max_chars: int) -> str:
    """The leading whole lines of text, at most max_chars characters (at least one line)."""
    out, size = [], 0
    for line in text.splitlines(keepends=True):
        if out and size + len(line) > max_chars:
            break
        out.append(line)
        size += len(line)
    return "".join(out)


# ---------------------------------------------------------------------------------------------------
# (a) tokenizer
# ---------------------------------------------------------------------------------------------------
def train_tokenizer(train_texts, out_dir: Path, vocab_size: int, min_share: float, seed: int, threads: int) -> Path:
    """SentencePiece BPE in LLaMA's setup. Each text whose share of all characters is below min_share is
    repeated until it reaches about min_share, so a small Chinese file still gets its characters as pieces."""
    import sentencepiece as spm

    total = sum(len(t) for t in train_texts)
    lines = []
    for text in train_texts:
        repeats = max(1, round(min_share * total / max(1, len(text))))
        text_lines = [line for line in text.splitlines() if line.strip()]
        lines.extend(text_lines * repeats)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt", delete=False) as f:
        f.write("\n".join(lines) + "\n")
        input_path = f.name
    prefix = out_dir / "tokenizer"
    spm.set_random_generator_seed(seed)           # sentence sampling and shuffling
    try:
        spm.SentencePieceTrainer.train(
            input=input_path, model_prefix=str(prefix), model_type="bpe", vocab_size=vocab_size,
            character_coverage=0.9995, byte_fallback=True, split_digits=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=True, allow_whitespace_only_pieces=True,
            input_sentence_size=400_000, shuffle_input_sentence=True, seed_sentencepiece_size=1_000_000,
            max_sentence_length=8192, num_threads=threads, minloglevel=2,
        )
    except RuntimeError as e:     # e.g. more distinct characters than --vocab-size can hold
        raise PretrainError(f"training the tokenizer (--vocab-size {vocab_size}) failed: {e}") from None
    finally:
        os.unlink(input_path)
    (out_dir / "tokenizer.vocab").unlink(missing_ok=True)
    return prefix.with_suffix(".model")


class SPTokenizer:
    """The few calls this script needs (minipeft.tokenizer.Tokenizer is the package's full wrapper)."""

    def __init__(self, path: Path):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.bos_id, self.eos_id, self.vocab_size = self.sp.bos_id(), self.sp.eos_id(), self.sp.vocab_size()

    def encode(self, text: str):
        return self.sp.encode(text)


# ---------------------------------------------------------------------------------------------------
# (b) model training
# ---------------------------------------------------------------------------------------------------
def sample_batch(streams, weights, batch_size, seq_len, bos_id, generator):
    """Pick a stream per row by weight, then a random window of seq_len tokens: inputs (B, T), targets (B, T)."""
    rows = torch.multinomial(weights, batch_size, replacement=True, generator=generator)   # (B,)
    targets = torch.empty(batch_size, seq_len, dtype=torch.long)
    for b, s in enumerate(rows.tolist()):
        stream = streams[s]
        start = int(torch.randint(0, len(stream) - seq_len + 1, (1,), generator=generator))
        targets[b] = stream[start:start + seq_len]
    inputs = torch.cat([torch.full((batch_size, 1), bos_id, dtype=torch.long), targets[:, :-1]], dim=1)
    return inputs, targets                                                                 # (B, T) each


def chunk_examples(ids: torch.Tensor, seq_len: int, bos_id: int):
    """Consecutive chunks c of at most seq_len ids -> list of (inputs [bos]+c[:-1], targets c), each (1, len)."""
    out = []
    for start in range(0, len(ids), seq_len):
        chunk = ids[start:start + seq_len]
        inputs = torch.cat([torch.tensor([bos_id]), chunk[:-1]])
        out.append((inputs[None], chunk[None]))
    return out


@torch.no_grad()
def mean_nll(model, examples) -> float:
    """Mean next-token negative log-likelihood (nats) over all target tokens of the examples."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for inputs, targets in examples:
        logits = model(inputs).float()                                                     # (1, T, V)
        total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        count += targets.numel()
    model.train(was_training)
    return total / count


def lr_at(step: int, max_steps: int, lr: float, warmup: int, min_lr_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine from lr down to lr * min_lr_ratio at max_steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def atomic_torch_save(obj, path: Path) -> None:
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def plot_losses(history, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    train = history["train"]
    if train:
        steps, losses = zip(*train)
        window = 20          # running mean over the last 20 logged steps, to see the trend through the noise
        smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="train (per step)")
        ax.plot(steps, smooth, color="tab:blue", label="train (running mean of 20)")
    if history["val"]:
        steps, losses = zip(*history["val"])
        ax.plot(steps, losses, "o-", color="tab:orange", label="validation (held-out text)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def save_checkpoint_folder(model, cfg: ModelConfig, folder: Path, tokenizer_path: Path) -> None:
    """Our checkpoint folder (config.json + model.safetensors + tokenizer.model) in fp16."""
    from minipeft.checkpoint import save_model
    save_model(model, cfg, folder, tokenizer_path=tokenizer_path, dtype=torch.float16,
               overwrite=True)                       # this run's own folder, re-saved at each checkpoint


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", action="append", required=True,
                    help="plain-text file, optionally path:weight for its sampling weight (repeat the flag)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--overwrite", action="store_true", help="start afresh in an --out folder that already holds files")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--n-layers", type=int, default=4)
    ap.add_argument("--n-heads", type=int, default=6)
    ap.add_argument("--n-kv-heads", type=int, default=3)
    ap.add_argument("--multiple-of", type=int, default=32)
    ap.add_argument("--max-seq-len", type=int, default=512, help="max_seq_len written into the config")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--resume", type=Path, default=None, help="a train_state.pt written by an earlier run")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--save-every", type=int, default=250)
    ap.add_argument("--val-fraction", type=float, default=0.015)
    ap.add_argument("--val-windows", type=int, default=8, help="held-out windows per file for the periodic val loss")
    ap.add_argument("--val-text-chars", type=int, default=1500, help="characters per file in val_text.txt")
    ap.add_argument("--tokenizer", type=Path, default=None, help="use this tokenizer.model instead of training one")
    ap.add_argument("--tokenizer-min-share", type=float, default=0.01)
    ap.add_argument("--max-minutes", type=float, default=None, help="stop (and finish normally) after this long")
    ap.add_argument("--stop-at-step", type=int, default=None,
                    help="stop at this step (the schedule still follows --steps); to try out --resume")
    args = ap.parse_args(argv)

    if args.seq_len > args.max_seq_len:
        raise PretrainError(f"--seq-len {args.seq_len} exceeds --max-seq-len {args.max_seq_len}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = args.out
    if out.is_file():
        raise PretrainError(f"--out {out}: is a file; expected a folder")
    if out.is_dir() and any(out.iterdir()) and args.resume is None:
        if not args.overwrite:
            raise PretrainError(f"--out {out}: already holds files; continue it with --resume {out / 'train_state.pt'}, "
                                "choose a new --out, or pass --overwrite to start afresh there")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    # ---- corpus: train / held-out split per file ----
    corpus = [parse_corpus_arg(a) for a in args.corpus]
    texts = [p.read_text(encoding="utf-8") for p, _ in corpus]
    splits = [split_train_val(t, args.val_fraction) for t in texts]
    for (p, _), (train_text, val_text) in zip(corpus, splits):
        if not val_text.strip():
            raise PretrainError(f"{p}: too short to hold out {args.val_fraction:.1%} for validation")

    # ---- (a) tokenizer ----
    tokenizer_path = out / "tokenizer.model"
    if args.tokenizer is not None:
        tokenizer_path = args.tokenizer
    elif not tokenizer_path.exists():
        t0 = time.time()
        train_tokenizer([s[0] for s in splits], out, args.vocab_size, args.tokenizer_min_share, args.seed, args.threads)
        print(f"tokenizer: trained {args.vocab_size} pieces in {time.time() - t0:.0f} s -> {tokenizer_path}")
    tok = SPTokenizer(tokenizer_path)
    if tok.vocab_size != args.vocab_size:
        raise PretrainError(f"{tokenizer_path} has {tok.vocab_size} pieces, --vocab-size is {args.vocab_size}")

    # ---- tokenise ----
    t0 = time.time()
    train_streams, val_streams = [], []
    for (p, _), (train_text, val_text) in zip(corpus, splits):
        train_streams.append(torch.tensor(tok.encode(train_text), dtype=torch.long))
        val_streams.append(torch.tensor(tok.encode(val_text), dtype=torch.long))
        if len(train_streams[-1]) <= args.seq_len:
            raise PretrainError(f"{p}: only {len(train_streams[-1])} training tokens, need more than --seq-len")
    weights = torch.tensor([w if w is not None else float("nan") for _, w in corpus], dtype=torch.float64)
    token_counts = torch.tensor([len(s) for s in train_streams], dtype=torch.float64)
    given = ~torch.isnan(weights)
    # Files without a weight share what the given weights leave, in proportion to their token counts.
    rest = max(0.0, 1.0 - float(weights[given].sum()))
    if (~given).any():
        weights[~given] = rest * token_counts[~given] / token_counts[~given].sum()
    weights = weights / weights.sum()
    for (p, _), s, v, w in zip(corpus, train_streams, val_streams, weights.tolist()):
        print(f"  {p.name}: {len(s):,} train tokens, {len(v):,} held-out tokens, sampling weight {w:.3f}")
    print(f"tokenised in {time.time() - t0:.0f} s")

    # held-out windows for the periodic val loss (evenly spaced, the same at every evaluation)
    val_examples = []
    for v in val_streams:
        examples = chunk_examples(v, args.seq_len, tok.bos_id)
        stride = max(1, len(examples) // args.val_windows)
        val_examples.extend(examples[::stride][:args.val_windows])

    # val_text.txt: the leading lines of each file's held-out text (what the shipped perplexity is measured on)
    val_text_parts = [first_lines(val_text, args.val_text_chars) for _, val_text in splits]
    val_text = "".join(part if part.endswith("\n") else part + "\n" for part in val_text_parts)
    atomic_write_text(out / "val_text.txt", val_text)

    # ---- model ----
    cfg = ModelConfig(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                      vocab_size=tok.vocab_size, multiple_of=args.multiple_of, norm_eps=1e-5,
                      max_seq_len=args.max_seq_len)
    device = torch.device(args.device)
    model = Transformer(cfg).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(args.seed)
    history = {"train": [], "val": []}
    step, elapsed_before = 0, 0.0

    def text_perplexities(m):
        """Perplexity of val_text.txt as a whole and of each file's part of it."""
        per_part, total_nll, total_count = {}, 0.0, 0
        for (p, _), part in zip(corpus, val_text_parts):
            ids = torch.tensor(tok.encode(part), dtype=torch.long)
            examples = [(i.to(device), t.to(device)) for i, t in chunk_examples(ids, args.seq_len, tok.bos_id)]
            nll = mean_nll(m, examples)
            per_part[p.name] = {"perplexity": math.exp(nll), "tokens": len(ids)}
        ids = torch.tensor(tok.encode(val_text), dtype=torch.long)
        examples = [(i.to(device), t.to(device)) for i, t in chunk_examples(ids, args.seq_len, tok.bos_id)]
        return math.exp(mean_nll(m, examples)), len(ids), per_part

    if args.resume is not None:
        if not args.resume.is_file():
            raise PretrainError(f"--resume {args.resume}: no such file")
        state = torch.load(args.resume, map_location=device, weights_only=True)
        if state["config"] != cfg.to_dict():
            raise PretrainError(f"--resume {args.resume}: saved config {state['config']} differs from the "
                                f"flags' config {cfg.to_dict()}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        step, history, elapsed_before = state["step"], state["history"], state["elapsed_s"]
        random_init = state["random_init"]
        print(f"resumed from {args.resume} at step {step}")
    else:
        ppl, n_tokens, per_part = text_perplexities(model)
        random_init = {"val_loss": mean_nll(model, val_examples), "val_text_perplexity": ppl,
                       "val_text_per_file": per_part}
        print(f"random init: val loss {random_init['val_loss']:.3f}, val_text perplexity {ppl:.1f} ({n_tokens} tokens)")

    def save_state():
        atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                           "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                           "history": history, "elapsed_s": elapsed_before + time.time() - t_start,
                           "config": cfg.to_dict(), "random_init": random_init, "args": vars(args) | {
                               "out": str(args.out), "resume": str(args.resume), "tokenizer": str(args.tokenizer)}},
                          out / "train_state.pt")

    print(f"model: {model.num_parameters():,} parameters, {cfg.to_dict()}")
    tokens_per_step = args.batch_size * args.seq_len
    t_start = time.time()
    model.train()
    from tqdm import tqdm
    bar = tqdm(total=args.steps, initial=step, desc="pretrain", dynamic_ncols=True, mininterval=5)
    while step < args.steps:
        if args.max_minutes is not None and elapsed_before + time.time() - t_start > 60 * args.max_minutes:
            print(f"stopping at step {step}: --max-minutes {args.max_minutes} reached")
            break
        if args.stop_at_step is not None and step >= args.stop_at_step:
            break
        lr = lr_at(step, args.steps, args.lr, args.warmup, args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        inputs, targets = sample_batch(train_streams, weights, args.batch_size, args.seq_len, tok.bos_id, generator)
        logits = model(inputs.to(device))                                                  # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.to(device).flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        history["train"].append((step, loss.item()))
        elapsed = elapsed_before + time.time() - t_start
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}",
                        tok_s=f"{(step * tokens_per_step) / max(elapsed, 1e-9):.0f}")
        if step % args.eval_every == 0 or step == args.steps:
            val_loss = mean_nll(model, [(i.to(device), t.to(device)) for i, t in val_examples])
            history["val"].append((step, val_loss))
            bar.write(f"step {step}: train loss {loss.item():.3f}, val loss {val_loss:.3f}, {elapsed / 60:.1f} min")
            plot_losses(history, out / "loss_curve.png", f"tiny LLaMA pretraining ({model.num_parameters() / 1e6:.1f}M params)")
        if step % args.save_every == 0:
            save_state()
    bar.close()
    save_state()
    wall_s = elapsed_before + time.time() - t_start

    # ---- final evaluation and outputs ----
    if not history["val"] or history["val"][-1][0] != step:
        history["val"].append((step, mean_nll(model, val_examples)))
    plot_losses(history, out / "loss_curve.png", f"tiny LLaMA pretraining ({model.num_parameters() / 1e6:.1f}M params)")
    ppl_fp32, _, _ = text_perplexities(model)
    # The shipped weights are fp16: measure what a user loading them gets (fp16-rounded weights, fp32 maths).
    shipped = Transformer(cfg).to(device)
    shipped.load_state_dict({k: v.to(torch.float16).to(v.dtype) for k, v in model.state_dict().items()})
    ppl, n_tokens, per_part = text_perplexities(shipped)
    last = [l for _, l in history["train"][-50:]]
    model_dir = out / "tiny-llama"
    save_checkpoint_folder(model.cpu(), cfg, model_dir, tokenizer_path)
    atomic_write_text(model_dir / "val_text.txt", val_text)
    metrics = {
        "steps": step, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "tokens_seen": step * tokens_per_step, "wall_s": round(wall_s, 1),
        "tokens_per_s": round(step * tokens_per_step / wall_s, 1) if wall_s > 0 else None,
        "parameters": model.num_parameters(), "config": cfg.to_dict(),
        "corpus": {p.name: {"train_tokens": len(s), "heldout_tokens": len(v), "sampling_weight": round(w, 4)}
                   for (p, _), s, v, w in zip(corpus, train_streams, val_streams, weights.tolist())},
        "final_train_loss_mean_last_50": sum(last) / len(last) if last else None,
        "final_val_loss": history["val"][-1][1],
        "val_text_perplexity": ppl, "val_text_tokens": n_tokens, "val_text_per_file": per_part,
        "val_text_perplexity_fp32_weights": ppl_fp32,
        "random_init": random_init,
        "file_bytes": {f.name: f.stat().st_size for f in sorted(model_dir.iterdir())},
        "args": sys.argv[1:] if argv is None else list(argv),
    }
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    print(f"done: {step} steps in {wall_s / 60:.1f} min, val loss {metrics['final_val_loss']:.3f}, "
          f"val_text perplexity {ppl:.1f} (random init {random_init['val_text_perplexity']:.1f}) -> {model_dir}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except PretrainError as err:
        sys.exit(f"error: {err}")
