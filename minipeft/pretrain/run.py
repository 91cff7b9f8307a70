"""The pretraining run of tools/pretrain_tiny.py (pretrain(args)): a tokenizer of the family's own kind, then a
small decoder, trained from scratch or further from a checkpoint (--init-from, Chinese-LLaMA's way).

 (a) tokenizer (tokenizer_training.py; the family's trainer and file: family_recipes.py): SentencePiece as
     LLaMA's (llama), SentencePiece with GLM's special pieces (chatglm) or byte-level BPE as BLOOM's (bloom),
     trained on the training part of the corpus with small files repeated so every file has a say
     (--tokenizer-min-share). --tokenizer or --init-from bring their own.
 (b) model: each file's last --val-fraction is held out (corpus.py). A training sample picks a file with the
     weight given after ':' in --corpus (default: proportional to its token count), then a random window of its
     tokens, laid out as the family's fine-tuning examples are (samples.py: [bos] + w[:-1] -> w for llama and
     bloom; w[:k] [gMASK] <sop> w[k:-1] -> w[k:] for chatglm):

         loss = mean over scored t of  -log softmax(model(inputs))[t, targets[t]]

     AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), linear warm-up then cosine decay to
     lr * min_lr_ratio, gradient clipping at 1.0.
 (c) output in --out: the tokenizer, train_state.pt (resumable: model, optimizer, step, RNG states, history;
     written via temp file + rename every --save-every steps), loss_curve.png, metrics.json, val_text.txt (a
     slice of held-out text) and the checkpoint folder --name (default tiny-<family>; our format, fp16).

Perplexity of a text (metrics.json, tests/test_assets.py): encode the text without marks, cut the ids into
consecutive chunks, score each as a sample with no context (samples.SampleLayout.chunk_examples), and take
exp(total negative log-likelihood / scored tokens); nats per character divides the same total by the text's
characters, which compares models whose tokenizers differ (Chinese-LLaMA's extended vocabulary).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..families import build_model, tokenizer_for
from ..fileio import write_text_atomic
from ..train.checkpoints import check_digests, load_plain
from ..train.config import TrainError, check_device
from ..train.stopping import StopSettingError, StopSignals
from .corpus import PretrainError, PretrainFailed, first_lines, parse_corpus_arg, read_corpus_text, split_train_val
from .outputs import reserve_pretrain_out, stop_before_training
from .family_recipes import SHAPE_FLAGS, model_config, pretrain_family, train_family_tokenizer
from .samples import IGNORE, SampleLayout, mean_nll, total_nll
from .state import atomic_torch_save, input_identity
from .tokenizer_training import TokenizerTrainingError


def lr_at(step: int, max_steps: int, lr: float, warmup: int, min_lr_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine from lr down to lr * min_lr_ratio at max_steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


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


def save_checkpoint_folder(model, cfg: ModelConfig, folder: Path, tokenizer_path: Path, inputs=()) -> None:
    """Our checkpoint folder (config.json + model.safetensors + the tokenizer file) in fp16; never over an input
    (the tokenizer, `inputs`: the --init-from folder), PretrainError otherwise."""
    from ..checkpoint import CheckpointError, save_model
    try:
        save_model(model, cfg, folder, tokenizer_path=tokenizer_path, dtype=torch.float16,
                   overwrite=True, inputs=inputs)    # this run's own folder, inside its reserved --out
    except CheckpointError as err:
        raise PretrainError(str(err)) from None


def pretrain(args, argv=None) -> int:
    """The whole run for the parsed flags (cli.build_arg_parser); argv is recorded in metrics.json (default
    sys.argv[1:]). PretrainError, naming the flag or file, for what cannot work. --out is this run's from the
    start (outputs.reserve_pretrain_out: the policy of every writer); SIGTERM / Ctrl-C during the loop stop it
    after the step (train/stopping.py)."""
    if args.seq_len > args.max_seq_len:
        raise PretrainError(f"--seq-len {args.seq_len} exceeds --max-seq-len {args.max_seq_len}")
    out = args.out
    if out.is_file():
        raise PretrainError(f"--out {out}: is a file; expected a folder")
    if next((p for p in out.parents if p.exists()), Path(".")).is_file():
        raise PretrainError(f"--out {out}: {next(p for p in out.parents if p.exists())} is a file, not a folder")
    try:
        check_device(args.device)
    except TrainError as err:
        raise PretrainError(str(err)) from None
    try:
        signals = StopSignals()
    except StopSettingError as err:
        raise PretrainError(str(err)) from None
    try:
        with reserve_pretrain_out(args):
            return _pretrain(args, argv, signals)
    finally:
        signals.__exit__()


def _pretrain(args, argv, signals: StopSignals) -> int:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = args.out
    signals.__enter__()                 # SIGTERM / Ctrl-C from here on: a stop at the next safe point
    found = set(out.iterdir())          # what --out held before this run (reserve_pretrain_out made it)
    initial_model = None
    if args.init_from is not None:
        given = [f"--{k.replace('_', '-')}" for k in SHAPE_FLAGS if getattr(args, k) is not None]
        if given:
            raise PretrainError(f"--init-from {args.init_from}: the folder fixes the model's shape; drop {', '.join(given)}")
        from ..checkpoint import CheckpointError, load_model
        from ..checkpoint.files import folder_tokenizer
        try:
            initial_model = load_model(args.init_from, dtype=torch.float32)
        except (CheckpointError, OSError, ValueError) as err:
            raise PretrainError(f"--init-from: {err}") from None
        if args.family not in (None, initial_model.config.family):
            raise PretrainError(f"--family {args.family}: the --init-from folder holds a {initial_model.config.family} model")
        args.tokenizer = args.tokenizer or folder_tokenizer(Path(args.init_from))
        if args.tokenizer is None:
            raise PretrainError(f"--init-from {args.init_from}: the folder has no tokenizer; pass --tokenizer")
    family = initial_model.config.family if initial_model is not None else (args.family or "llama")
    recipe = pretrain_family(family)
    title = f"tiny {recipe.title}"
    model_dir = out / (args.name or f"tiny-{family}")

    # ---- corpus: train / held-out split per file ----
    corpus = [parse_corpus_arg(a) for a in args.corpus]
    texts = [read_corpus_text(p) for p, _ in corpus]
    splits = [split_train_val(t, args.val_fraction) for t in texts]
    for (p, _), (train_text, val_text) in zip(corpus, splits):
        if not val_text.strip():
            raise PretrainError(f"{p}: too short to hold out {args.val_fraction:.1%} for validation")

    # ---- (a) tokenizer ----
    vocab_size = args.vocab_size or 4096
    tokenizer_path = out / recipe.tokenizer_file
    if args.tokenizer is not None:
        tokenizer_path = Path(args.tokenizer)
    elif not tokenizer_path.exists():
        t0 = time.time()
        try:
            train_family_tokenizer(family, [s[0] for s in splits], out, vocab_size, args.tokenizer_min_share,
                                   args.seed, args.threads)
        except TokenizerTrainingError as err:
            raise PretrainError(str(err)) from None
        print(f"tokenizer: trained {vocab_size} pieces in {time.time() - t0:.0f} s -> {tokenizer_path}")
    tok = tokenizer_for(family, tokenizer_path)
    from ..checkpoint import CheckpointError, check_tokenizer_family
    try:
        check_tokenizer_family(tok, family, f"--tokenizer {tokenizer_path}")
    except CheckpointError as err:
        raise PretrainError(str(err)) from None
    if args.tokenizer is None and tok.vocab_size != vocab_size:
        raise PretrainError(f"{tokenizer_path} has {tok.vocab_size} pieces, --vocab-size is {vocab_size}")
    state = None
    if args.resume is not None:      # before anything is written: the state file and the inputs it was made from
        if not args.resume.is_file():
            raise PretrainError(f"--resume {args.resume}: no such file")
        state = load_plain(args.resume, "train_state.pt of pretrain_tiny.py", PretrainError)
        if not isinstance(state, dict) or not {"config", "model", "optimizer", "step", "history"} <= set(state):
            raise PretrainError(f"--resume {args.resume}: not a train_state.pt of pretrain_tiny.py")
        check_digests(state.get("inputs", {}), input_identity(args, corpus, tokenizer_path), f"--resume {args.resume}",
                      PretrainError)
    samples = SampleLayout(family, args.seq_len, tok.bos_id, getattr(tok, "gmask_id", None), getattr(tok, "sop_id", None))

    # ---- tokenise ----
    t0 = time.time()
    train_streams, val_streams = [], []
    for (p, _), (train_text, val_text) in zip(corpus, splits):
        train_streams.append(torch.tensor(tok.encode(train_text, bos=False), dtype=torch.long))
        val_streams.append(torch.tensor(tok.encode(val_text, bos=False), dtype=torch.long))
        if len(train_streams[-1]) <= samples.window:
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
    device = torch.device(args.device)
    val_examples = []
    for v in val_streams:
        examples = samples.chunk_examples(v)
        stride = max(1, len(examples) // args.val_windows)
        val_examples.extend(examples[::stride][:args.val_windows])
    val_examples = [(i.to(device), t.to(device)) for i, t in val_examples]

    # val_text.txt: the leading lines of each file's held-out text (what the shipped perplexity is measured on)
    val_text_parts = [first_lines(val_text, args.val_text_chars) for _, val_text in splits]
    val_text = "".join(part if part.endswith("\n") else part + "\n" for part in val_text_parts)
    write_text_atomic(out / "val_text.txt", val_text)
    stop_before_training(signals, out, found)     # a stop during the tokenizer or the tokenising: nothing kept

    # ---- model ----
    if initial_model is not None:
        model, cfg = initial_model.to(device).train(), initial_model.config
        if tok.vocab_size > cfg.vocab_size:
            raise PretrainError(f"{tokenizer_path} has {tok.vocab_size} pieces, the --init-from model {cfg.vocab_size} rows")
    else:
        cfg = model_config(family, args, tok)
        model = build_model(cfg).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(args.seed)
    history = {"train": [], "val": []}
    step, elapsed_before = 0, 0.0

    def score(m, text):
        """(perplexity, scored tokens, nats per character) of a text."""
        ids = torch.tensor(tok.encode(text, bos=False), dtype=torch.long)
        examples = [(i.to(device), t.to(device)) for i, t in samples.chunk_examples(ids)]
        nll, count = total_nll(m, examples)
        return math.exp(nll / count), count, nll / max(1, len(text))

    def text_perplexities(m):
        """Perplexity of val_text.txt as a whole and of each file's part of it (with nats per character)."""
        per_part = {}
        for (p, _), part in zip(corpus, val_text_parts):
            ppl, count, per_char = score(m, part)
            per_part[p.name] = {"perplexity": ppl, "tokens": count, "chars": len(part), "nats_per_char": per_char}
        ppl, count, _ = score(m, val_text)
        return ppl, count, per_part

    start_kind = "random_init" if initial_model is None else "initial"
    if args.resume is not None:
        if state["config"] != cfg.to_dict():
            raise PretrainError(f"--resume {args.resume}: saved config {state['config']} differs from the "
                                f"flags' config {cfg.to_dict()}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        step, history, elapsed_before = state["step"], state["history"], state["elapsed_s"]
        start = state["start"]
        print(f"resumed from {args.resume} at step {step}")
    else:
        ppl, n_tokens, per_part = text_perplexities(model)
        start = {"val_loss": mean_nll(model, val_examples), "val_text_perplexity": ppl, "val_text_per_file": per_part}
        print(f"{start_kind.replace('_', ' ')}: val loss {start['val_loss']:.3f}, val_text perplexity {ppl:.1f} "
              f"({n_tokens} tokens)")

    def save_state():
        atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                           "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                           "history": history, "elapsed_s": elapsed_before + time.time() - t_start,
                           "config": cfg.to_dict(), "start": start, "inputs": input_identity(args, corpus, tokenizer_path),
                           "args": {
                               k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}},
                          out / "train_state.pt")

    print(f"model: {model.num_parameters():,} parameters, {cfg.to_dict()}")
    tokens_per_step = args.batch_size * args.seq_len
    t_start = time.time()
    model.train()
    from tqdm import tqdm
    bar = tqdm(total=args.steps, initial=step, desc="pretrain", dynamic_ncols=True, mininterval=5,
               disable=None)            # None: shown on a terminal only, so a captured stderr holds errors alone
    plot_title = f"{title} pretraining ({model.num_parameters() / 1e6:.1f}M params)"
    while step < args.steps:
        if args.max_minutes is not None and elapsed_before + time.time() - t_start > 60 * args.max_minutes:
            print(f"stopping at step {step}: --max-minutes {args.max_minutes} reached")
            break
        if args.stop_at_step is not None and step >= args.stop_at_step:
            break
        lr = lr_at(step, args.steps, args.lr, args.warmup, args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        inputs, targets = samples.sample_batch(train_streams, weights, args.batch_size, generator)
        logits = model(inputs.to(device))                                                  # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.to(device).flatten(), ignore_index=IGNORE)
        if not math.isfinite(loss.item()):
            raise PretrainFailed(f"step {step + 1}: the training loss is {loss.item()}; stopping (lower --lr); "
                                "nothing is saved after the last checkpoint")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        bad = next((n for n, p in model.named_parameters() if not bool(torch.isfinite(p.detach()).all())), None)
        if bad is not None:
            raise PretrainFailed(f"step {step}: {bad} holds non-finite values after the update; stopping (lower --lr)")
        history["train"].append((step, loss.item()))
        elapsed = elapsed_before + time.time() - t_start
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}",
                        tok_s=f"{(step * tokens_per_step) / max(elapsed, 1e-9):.0f}")
        if step % args.eval_every == 0 or step == args.steps:
            val_loss = mean_nll(model, val_examples)
            history["val"].append((step, val_loss))
            bar.write(f"step {step}: train loss {loss.item():.3f}, val loss {val_loss:.3f}, {elapsed / 60:.1f} min")
            plot_losses(history, out / "loss_curve.png", plot_title)
        if step % args.save_every == 0:
            save_state()
        if signals.after_step(step):
            bar.close()
            save_state()
            raise PretrainFailed(signals.message(step, args.steps, out / "train_state.pt",
                                                f"--resume {out / 'train_state.pt'}"))
    bar.close()
    save_state()
    wall_s = elapsed_before + time.time() - t_start

    # ---- final evaluation and outputs ----
    if not history["val"] or history["val"][-1][0] != step:
        history["val"].append((step, mean_nll(model, val_examples)))
    plot_losses(history, out / "loss_curve.png", plot_title)
    ppl_fp32, _, _ = text_perplexities(model)
    # The shipped weights are fp16: measure what a user loading them gets (fp16-rounded weights, fp32 maths).
    shipped = build_model(cfg).to(device)
    shipped.load_state_dict({k: v.to(torch.float16).to(v.dtype) for k, v in model.state_dict().items()})
    ppl, n_tokens, per_part = text_perplexities(shipped)
    last = [l for _, l in history["train"][-50:]]
    save_checkpoint_folder(model.cpu(), cfg, model_dir, tokenizer_path, inputs=[args.init_from])
    write_text_atomic(model_dir / "val_text.txt", val_text)
    metrics = {
        "family": family, "init_from": None if args.init_from is None else str(args.init_from),
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
        start_kind: start,
        "file_bytes": {f.name: f.stat().st_size for f in sorted(model_dir.iterdir())},
        "args": sys.argv[1:] if argv is None else list(argv),
    }
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    print(f"done: {step} steps in {wall_s / 60:.1f} min, val loss {metrics['final_val_loss']:.3f}, "
          f"val_text perplexity {ppl:.1f} ({start_kind.replace('_', ' ')} {start['val_text_perplexity']:.1f}) "
          f"-> {model_dir}")
    if signals.reason is not None:      # the outputs above were written whole; the run had nothing left to do
        print(f"note: {signals.reason} arrived during the final save; the run had finished and its outputs are "
              f"complete", file=sys.stderr)
    return 0
