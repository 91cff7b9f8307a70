"""Convert a Meta (params.json + consolidated.NN.pth) or Hugging Face LLaMA / BLOOM folder into minipeft's format.

    python tools/convert_checkpoint.py SRC OUT [--dtype float16|bfloat16|float32] [--max-shard-size 5GB]

The format is detected from SRC's contents. Tensors are streamed one at a time (memory-mapped .pth,
safetensors read tensor by tensor), so peak memory stays near one copy of the weights. OUT must not exist;
it is written under a temporary name and renamed at the end, so a failed conversion leaves nothing behind.
The folder's tokenizer (tokenizer.model, or BLOOM's tokenizer.json) is copied beside the weights.
"""

import argparse
import sys

from minipeft import cli_types as T
from minipeft.checkpoint import DEFAULT_MAX_SHARD_SIZE, DTYPES, convert_checkpoint
from minipeft.cli_errors import one_line, run_main


def build_parser() -> argparse.ArgumentParser:
    parser = T.ArgumentParser(prog="convert_checkpoint.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="Meta, or Hugging Face LLaMA / BLOOM / ChatGLM, checkpoint folder")
    parser.add_argument("out", help="output folder (must not exist, or be empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT folder (as a whole, at the end)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="convert floating-point weights to this dtype (default: keep the source's)")
    parser.add_argument("--max-shard-size", type=T.byte_size, default=DEFAULT_MAX_SHARD_SIZE,
                        help="split model.safetensors into shards above this size, e.g. 5GB, 200MB (powers of 1024; "
                        "default 5GB)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = convert_checkpoint(args.src, args.out, dtype=DTYPES.get(args.dtype),
                                     max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    except (ValueError, OSError) as e:    # CheckpointError / ConfigError: the message names the file and the problem
        print(f"convert_checkpoint.py: error: {one_line(e)}", file=sys.stderr)
        return 2
    cfg = summary["config"]
    print(f"format detected : {summary['format']}")
    print(f"family          : {cfg.family}")
    print(f"model           : dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads "
          f"({cfg.n_kv_heads} kv), ffn {cfg.ffn_hidden_dim}, vocab {cfg.vocab_size}")
    print(f"parameters      : {summary['num_parameters']:,}")
    print(f"dtype           : {summary['dtype']}")
    print(f"tokenizer       : {summary['tokenizer'] or 'none in source'}")
    print(f"written to      : {summary['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, "convert_checkpoint.py"))
