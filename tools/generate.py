"""Generate text from a minipeft checkpoint folder, optionally with a trained adapter on top.

    python tools/generate.py CHECKPOINT_FOLDER --prompt "..." [--prompt "..."] [--max-new-tokens 64]
        [--temperature 0] [--top-k K] [--top-p P] [--seed S] [--adapter ADAPTER_FOLDER] [--alpaca]
        [--tokenizer PATH] [--device cpu|cuda] [--dtype float32|bfloat16|float16]

Temperature 0 (the default) is greedy decoding. --alpaca wraps each prompt in the Alpaca template used
for fine-tuning (minipeft.data.format_prompt). The tokenizer is CHECKPOINT_FOLDER/tokenizer.model unless
--tokenizer is given. All prompts run as one left-padded batch; generation stops at the tokenizer's EOS.

The model is the one finetune.py trained and evaluated (minipeft.peft.inference.load_model_with_adapter): the base in float32 whatever
dtype the folder stores (finetune.py's --base-dtype auto for fp32 training), the adapter's parameters in
float32 as they were trained, so an adapter's logits here are those of the run's own final evaluation.
--dtype bfloat16 / float16 holds the base in half precision; an adapter's float32 parameters then run under
torch.autocast in that dtype, as finetune.py evaluates a --precision bf16 / fp16 run. Plugins (--plugin,
MINIPEFT_PLUGINS) are imported first, so an adapter of a method they register loads.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from minipeft import cli_types as T
from minipeft.checkpoint import DTYPES, check_tokenizer_family, folder_tokenizer
from minipeft.cli_errors import one_line, run_main
from minipeft.families import get_family, tokenizer_for
from minipeft.generate import GenerationError, check_generation, generate
from minipeft.peft.inference import load_model_with_adapter, precision_context
from minipeft.plugins import PluginError, add_plugin_flag, load_plugins


def build_parser() -> argparse.ArgumentParser:
    parser = T.ArgumentParser(prog="generate.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="our checkpoint folder (config.json + model.safetensors [+ tokenizer.model])")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    parser.add_argument("--max-new-tokens", type=T.seq_len, default=64,
                        help="tokens to generate per prompt (default 64)")
    parser.add_argument("--temperature", type=T.non_negative_float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=T.positive_int, default=None, help="sample from the k likeliest tokens only")
    parser.add_argument("--top-p", type=T.probability_mass, default=None,
                        help="sample from the smallest set of tokens whose probability reaches P, in (0, 1]")
    parser.add_argument("--seed", type=T.seed, default=None, help="makes sampling reproducible")
    parser.add_argument("--adapter", default=None, help="adapter folder written by save_adapter / finetune")
    parser.add_argument("--alpaca", action="store_true", help="wrap each prompt in the model family's template (Alpaca; ChatGLM: [Round n] 问：...答：)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.model or tokenizer.json (default: the checkpoint folder's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="dtype of the base weights (default float32, as finetune.py evaluates; an adapter stays "
                        "float32 and runs under autocast beside a half base)")
    add_plugin_flag(parser)
    return parser


def main(argv=None) -> int:
    try:
        load_plugins(argv)            # before the parser, so that a plugin's adapter folders load
    except PluginError as e:
        print(f"generate.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)

    tokenizer_path = (Path(args.tokenizer) if args.tokenizer else
                      folder_tokenizer(Path(args.checkpoint)) or Path(args.checkpoint) / "tokenizer.model")
    if not tokenizer_path.is_file():
        print(f"generate.py: error: no tokenizer at {tokenizer_path}; pass --tokenizer PATH", file=sys.stderr)
        return 2
    try:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise GenerationError(f"--device {args.device}: this machine has no CUDA device")
        model = load_model_with_adapter(args.checkpoint, args.adapter, dtype=DTYPES[args.dtype], device=args.device)
        family = model.config.family
        tokenizer = tokenizer_for(family, tokenizer_path)
        check_tokenizer_family(tokenizer, family, tokenizer_path)
        if tokenizer.vocab_size > model.config.vocab_size:
            print(f"generate.py: error: {tokenizer_path} has {tokenizer.vocab_size} pieces but the model's vocabulary "
                  f"is only {model.config.vocab_size}", file=sys.stderr)
            return 2
        texts = [get_family(family).prompt_format.render(p) if args.alpaca else p for p in args.prompt]   # family's template
        prompts = [tokenizer.encode(text, bos=True) for text in texts]
        check_generation(model, prompts, args.max_new_tokens, args.temperature, args.top_k, args.top_p)
        limit = model.config.max_seq_len
        for i, prompt in enumerate(prompts):
            if len(prompt) + args.max_new_tokens > limit:
                print(f"generate.py: warning: --prompt {i + 1}: {len(prompt)} tokens + --max-new-tokens "
                      f"{args.max_new_tokens} go past the model's max_seq_len {limit} ({args.checkpoint}/config.json); "
                      f"positions beyond it were never trained, expect worse text there", file=sys.stderr)
        with precision_context(model, args.device):
            outputs = generate(model, prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                               top_p=args.top_p, eos_id=tokenizer.eos_id, seed=args.seed, pad_id=tokenizer.pad_id)
    except (ValueError, OSError) as e:   # CheckpointError, TokenizerError, PeftConfigError, GenerationError
        print(f"generate.py: error: {one_line(e)}", file=sys.stderr)
        return 2

    for i, (text, prompt_ids, new_ids) in enumerate(zip(texts, prompts, outputs)):
        if len(texts) > 1:
            print(f"===== prompt {i + 1} of {len(texts)}")
        if args.alpaca:   # the response was trained as a text of its own after the template
            print(text + tokenizer.decode(new_ids))
        else:             # a continuation: decode it together with the prompt, so the spaces join right
            print(tokenizer.decode(prompt_ids + new_ids))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, "generate.py"))
