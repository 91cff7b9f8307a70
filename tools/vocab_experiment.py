"""Does extending the vocabulary help a small model on Chinese? Fine-tune with and without the extension.

    python tools/vocab_experiment.py [--model minipeft/assets/tiny-llama] \\
        [--data minipeft/assets/demo_data/train.json] [--steps 150] [--out runs/vocab_experiment]

1. The Chinese records of --data (those with a CJK character) not longer than --max-seq-len tokens with the
   base tokenizer are split into train / validation (seeded). A Chinese BPE SentencePiece model
   (--sp-vocab-size pieces) is trained on the training records' text only (plus --sp-corpus, if given) and
   merged into the base tokenizer (minipeft.vocab.merge_sentencepiece_models); the model is resized to it
   (new embedding/output rows = mean of the old rows) and saved as OUT/extended-model.
2. Two runs with the same budget, each from the same base weights and seed: the base model with the base
   tokenizer, and the resized model with the extended tokenizer. Both train LoRA plus the full
   tok_embeddings and output (LoRAConfig(extra_trainable=("tok_embeddings", "output"))), with the same
   records per batch, steps, learning rate and warm-up + cosine schedule (AdamW).
3. Each run is scored on the validation records by the loss per character of the responses:

       loss/char = sum over response tokens (EOS included) of -ln p(token | context)  /  characters of the
                   responses

   Token counts differ between the tokenizers, so loss per token is not comparable; loss per character
   is (nats per character of the same text; divide by ln 2 for bits). Printed before and after training.
4. The extended run's adapter is saved (it holds the LoRA tensors and the full embedding and output
   matrices), reloaded onto OUT/extended-model, and must give the same validation loss.

Results go to OUT/results.json. OUT appears whole when the run ends (an existing one is replaced only with
--overwrite, which may not remove an input).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from minipeft import assets_dir
from minipeft import cli_types as T
from minipeft.cli_errors import run_main
from minipeft.checkpoint import load_model
from minipeft.fileio import atomic_folder
from minipeft.data import AlpacaEncoder, collate, epoch_order, read_records, train_val_split
from minipeft.peft import LoRAConfig, apply_peft, load_adapter, save_adapter
from minipeft.tokenizer import Tokenizer
from minipeft.train import batch_loss, lr_factor
from minipeft.vocab import (VocabError, has_cjk, merge_sentencepiece_models, resize_checkpoint, tokens_per_char,
                            train_sentencepiece)


@torch.no_grad()
def loss_per_char(model, examples, records, pad_id, batch_size, device) -> dict:
    """Summed response NLL (nats) over the examples, divided by their responses' characters and tokens."""
    model.eval()
    total_nll, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start:start + batch_size], pad_id).items()}
        total_nll += batch_loss(model, batch, reduction="sum").item()
        tokens += int((batch["labels"][:, 1:] != -100).sum())
    chars = sum(len(r.output) for r in records)
    model.train()
    return {"loss_per_char": total_nll / chars, "loss_per_token": total_nll / tokens, "tokens": tokens,
            "chars": chars}


def run_arm(name, model_folder, tokenizer, train_records, val_records, args, device):
    """LoRA + trainable tok_embeddings/output on model_folder with `tokenizer`; returns metrics and the model."""
    encoder = AlpacaEncoder(tokenizer, args.max_seq_len)
    train, train_stats = encoder.encode_all(train_records)
    val, val_stats = encoder.encode_all(val_records)
    if train_stats.kept != len(train_records) or val_stats.kept != len(val_records):
        raise SystemExit(f"{name}: records were dropped while encoding; raise --max-seq-len")
    torch.manual_seed(args.seed)
    base = load_model(model_folder, dtype=torch.float32)
    model = apply_peft(base, LoRAConfig(rank=args.lora_rank, alpha=2 * args.lora_rank, targets=("wq", "wk", "wv", "wo"),
                                        extra_trainable=("tok_embeddings", "output"))).to(device)
    print(f"[{name}] vocab {base.config.vocab_size:,}; {model.report}; train {train_stats.summary()}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, 0.999), weight_decay=0.0)
    warmup = max(1, round(0.05 * args.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, args.steps, warmup))
    before = loss_per_char(model, val, val_records, tokenizer.pad_id, args.batch_size, device)
    history = []
    batches_per_epoch = math.ceil(len(train) / args.batch_size)
    started = time.time()
    model.train()
    for step in range(args.steps):
        epoch, position = divmod(step, batches_per_epoch)
        order = epoch_order(len(train), args.seed, epoch)
        chosen = order[position * args.batch_size:(position + 1) * args.batch_size]
        batch = {k: v.to(device) for k, v in collate([train[i] for i in chosen], tokenizer.pad_id).items()}
        loss = batch_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        history.append(loss.item())
        if (step + 1) % args.log_every == 0 or step == 0:
            print(f"[{name}] step {step + 1:4d}/{args.steps}  train loss/token {loss.item():.4f}  "
                  f"({time.time() - started:.0f}s)", flush=True)
    after = loss_per_char(model, val, val_records, tokenizer.pad_id, args.batch_size, device)
    print(f"[{name}] validation loss/char {before['loss_per_char']:.4f} -> {after['loss_per_char']:.4f} "
          f"(loss/token {before['loss_per_token']:.4f} -> {after['loss_per_token']:.4f}, "
          f"{after['tokens']:,} tokens for {after['chars']:,} characters)")
    return {"val_before": before, "val_after": after, "train_loss_first": history[0],
            "train_loss_last10": sum(history[-10:]) / len(history[-10:]), "train_tokens": train_stats.prompt_tokens
            + train_stats.response_tokens, "trainable": model.report.trainable, "seconds": time.time() - started,
            "val": val}, model


def build_parser() -> argparse.ArgumentParser:
    parser = T.ArgumentParser(prog="vocab_experiment.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(assets_dir() / "tiny-llama"), help="base checkpoint folder")
    parser.add_argument("--data", default=str(assets_dir() / "demo_data" / "train.json"),
                        help="Alpaca records; the Chinese ones are used")
    parser.add_argument("--sp-corpus", help="extra Chinese text (one line per text) for the SentencePiece model")
    parser.add_argument("--sp-vocab-size", type=T.vocab_size, default=1000)
    parser.add_argument("--val-fraction", type=T.open_fraction, default=0.1)
    parser.add_argument("--max-records", type=T.positive_int, default=None, help="use at most this many Chinese records")
    parser.add_argument("--max-seq-len", type=T.seq_len, default=512)
    parser.add_argument("--steps", type=T.positive_int, default=150)
    parser.add_argument("--batch-size", type=T.batch_size, default=8)
    parser.add_argument("--lr", type=T.positive_float, default=2e-3)
    parser.add_argument("--lora-rank", type=T.dim, default=8)
    parser.add_argument("--seed", type=T.seed, default=0)
    parser.add_argument("--log-every", type=T.positive_int, default=25)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="runs/vocab_experiment", help="a new folder (it appears when the run ends)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    with atomic_folder(out, args.overwrite, error=VocabError, inputs=[args.model, args.data, args.sp_corpus]) as work:
        return experiment(args, work, out)


def experiment(args, work: Path, out: Path) -> int:
    """The experiment, written into the temporary folder `work` that becomes `out` when it ends."""
    device = torch.device(args.device)

    base_tokenizer_path = Path(args.model) / "tokenizer.model"
    base_tokenizer = Tokenizer(base_tokenizer_path)
    records, problems = read_records(args.data)
    records = [r for r in records if has_cjk(r.instruction + r.input + r.output)]
    encoder = AlpacaEncoder(base_tokenizer, args.max_seq_len)
    fits = [r for r in records if len(encoder.encode_prompt(r)) + len(base_tokenizer.encode(r.output, bos=False,
                                                                                              eos=True)) <= args.max_seq_len]
    print(f"{len(records)} Chinese records in {args.data}; {len(fits)} fit in {args.max_seq_len} tokens with the "
          f"base tokenizer")
    fits = fits[:args.max_records] if args.max_records else fits
    train_records, val_records = train_val_split(fits, args.val_fraction, args.seed)

    # The Chinese SentencePiece model: trained on the training records only (validation text held out).
    sp_lines = [line for r in train_records for text in (r.instruction, r.input, r.output)
                for line in text.splitlines() if line.strip()]
    if args.sp_corpus:
        sp_lines += [line for line in Path(args.sp_corpus).read_text(encoding="utf-8").splitlines() if line.strip()]
    extra = train_sentencepiece(sp_lines, work / "zh_sp.model", args.sp_vocab_size)
    extended_tokenizer_path = work / "extended_tokenizer.model"
    stats = merge_sentencepiece_models(base_tokenizer_path, extra, extended_tokenizer_path)
    extended_tokenizer = Tokenizer(extended_tokenizer_path)
    val_texts = [t for r in val_records for t in (r.instruction, r.input, r.output) if t]
    tpc_before = tokens_per_char(base_tokenizer, val_texts)
    tpc_after = tokens_per_char(extended_tokenizer, val_texts)
    print(f"extension: {stats['added']:,} pieces added ({stats['base_size']:,} -> {stats['new_size']:,}); "
          f"tokens/char on the validation records {tpc_before:.3f} -> {tpc_after:.3f}")
    extended_model = work / "extended-model"
    resize_checkpoint(args.model, extended_model, extended_tokenizer_path)

    results = {"args": vars(args), "records": {"train": len(train_records), "val": len(val_records)},
               "merge": stats, "tokens_per_char_val": {"before": tpc_before, "after": tpc_after}}
    base_result, _ = run_arm("base vocab", args.model, base_tokenizer, train_records, val_records, args, device)
    ext_result, ext_model = run_arm("extended vocab", extended_model, extended_tokenizer, train_records,
                                    val_records, args, device)

    # The adapter (LoRA + full embedding/output) saves and reloads onto the resized checkpoint.
    save_adapter(ext_model, work / "adapter")
    reloaded = load_adapter(load_model(extended_model, dtype=torch.float32), work / "adapter").to(device)
    reloaded_val = loss_per_char(reloaded, ext_result["val"], val_records, extended_tokenizer.pad_id,
                                 args.batch_size, device)
    print(f"adapter reloaded from {out / 'adapter'}: validation loss/char {reloaded_val['loss_per_char']:.6f} "
          f"(trained model: {ext_result['val_after']['loss_per_char']:.6f})")
    for result in (base_result, ext_result):
        del result["val"]
    results.update({"base_vocab": base_result, "extended_vocab": ext_result,
                    "reloaded_val_loss_per_char": reloaded_val["loss_per_char"]})
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    b, e = base_result["val_after"]["loss_per_char"], ext_result["val_after"]["loss_per_char"]
    print(f"validation loss per character after {args.steps} steps: base vocab {b:.4f}, extended vocab {e:.4f} "
          f"({(e - b) / b:+.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, "vocab_experiment.py"))
