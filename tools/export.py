"""Fine-tune here, use anywhere: export a model or an adapter to Hugging Face transformers / peft, or import a
peft adapter trained elsewhere.

    python tools/export.py CHECKPOINT --out OUT                            # the model -> a transformers folder
    python tools/export.py CHECKPOINT --adapter RUN/adapter --out OUT      # the adapter -> a peft folder
    python tools/export.py CHECKPOINT --adapter RUN/adapter --merge --out OUT   # LoRA merged -> a transformers folder
    python tools/export.py CHECKPOINT --import-peft PEFT_FOLDER --out OUT  # a peft adapter -> our adapter folder
        [--dtype float16|bfloat16|float32] [--max-shard-size 5GB] [--tokenizer PATH] [--overwrite]

CHECKPOINT is our folder (or a Meta / Hugging Face one: load_model reads them). A model export writes the
family's layout (checkpoint/hf_export_model.py: LlamaForCausalLM, BloomForCausalLM, GlmForCausalLM for ChatGLM2,
THUDM/chatglm-6b's own layout for ChatGLM-6B) with the checkpoint's tokenizer files; an adapter export writes
peft's adapter_config.json + adapter_model.safetensors for that model (peft/hf_export.py), and a full fine-tuning
run's folder is the whole model, so it is exported as one. Whatever peft cannot hold exactly is refused in one
line. OUT is reserved while it is written and appears whole; an existing OUT needs --overwrite.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from minipeft import cli_types as T
from minipeft.checkpoint import (DEFAULT_MAX_SHARD_SIZE, DTYPES, export_model_to_hf, folder_tokenizer,
                                 iter_checkpoint_tensors, load_model, open_checkpoint)
from minipeft.cli_errors import run_main
from minipeft.peft import PeftConfigError, export_adapter_to_hf_peft, load_adapter, merge_lora, save_adapter
from minipeft.plugins import add_plugin_flag, load_plugins


def build_parser() -> argparse.ArgumentParser:
    parser = T.ArgumentParser(prog="export.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="the base model's folder (ours, Meta or Hugging Face)")
    parser.add_argument("--out", required=True, help="the folder to write (must not exist unless --overwrite)")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--adapter", default=None, help="an adapter folder (save_adapter / finetune.py) to export")
    what.add_argument("--import-peft", default=None, metavar="PEFT_FOLDER",
                      help="a Hugging Face peft adapter folder to write as our adapter folder")
    parser.add_argument("--merge", action="store_true", help="with a LoRA --adapter: write the merged model instead")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="dtype of the exported model's weights (default: the checkpoint's)")
    parser.add_argument("--max-shard-size", type=T.byte_size, default=DEFAULT_MAX_SHARD_SIZE,
                        help="split the weights into shards above this size (default 5GB)")
    parser.add_argument("--tokenizer", default=None, help="the tokenizer file to include (default: the checkpoint's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out (as a whole, at the end)")
    add_plugin_flag(parser)
    return parser


def stored_dtype(checkpoint) -> torch.dtype:
    """The dtype of the checkpoint's first floating tensor (the export keeps it unless --dtype says otherwise)."""
    for _, tensor in iter_checkpoint_tensors(checkpoint):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def main(argv=None) -> int:
    load_plugins(argv)                     # a plugin's method may be the adapter's
    args = build_parser().parse_args(argv)
    if args.merge and not args.adapter:
        raise PeftConfigError("--merge needs --adapter (the LoRA folder to merge into the checkpoint)")
    tokenizer = Path(args.tokenizer) if args.tokenizer else open_checkpoint(args.checkpoint).tokenizer_path \
        or folder_tokenizer(Path(args.checkpoint))
    dtype = DTYPES[args.dtype] if args.dtype else stored_dtype(args.checkpoint)
    model = load_model(args.checkpoint, dtype=torch.float32)          # merges and copies in full precision
    if args.import_peft:
        save_adapter(load_adapter(model, args.import_peft), args.out, overwrite=args.overwrite)
        print(f"imported {args.import_peft} (Hugging Face peft) -> {args.out} (our adapter folder)")
        return 0
    if args.adapter:
        model = load_adapter(model, args.adapter)
        if model.trains_base:                                          # full fine-tuning: the whole model
            model = model.base
        elif args.merge:
            if model.method != "lora":
                raise PeftConfigError(f"--merge: the adapter is {model.method!r}; only LoRA merges into the weights "
                                      f"(export it without --merge as a peft adapter)")
            model = merge_lora(model)
        else:
            export_adapter_to_hf_peft(model, args.out, overwrite=args.overwrite)
            print(f"{model.method} adapter -> {args.out} (Hugging Face peft: PeftModel.from_pretrained(model, OUT), "
                  f"model = this checkpoint exported with tools/export.py)")
            return 0
    export_model_to_hf(model.eval(), args.out, tokenizer_path=tokenizer, dtype=dtype,
                       max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    print(f"{model.config.family} model ({str(dtype).removeprefix('torch.')}) -> {args.out} (Hugging Face layout"
          f"{', with the tokenizer' if tokenizer else ', no tokenizer found'})")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, "export.py"))
