"""Generate the demo instruction data the package ships (the tasks and the generator: minipeft/demo_data.py).

    python tools/make_demo_data.py --out runs/demo_data --seed 0
    python tools/make_demo_data.py --out minipeft/assets/demo_data --seed 0 --overwrite   # the shipped files

The same seed gives byte-identical files. The folder appears whole or not at all; an existing --out (the default is
the shipped demo data) is replaced only with --overwrite.
"""

import argparse
import sys
from pathlib import Path

from minipeft import assets_dir
from minipeft import cli_types as T
from minipeft.cli_errors import run_main
from minipeft.demo_data import write_demo_data


def build_parser() -> argparse.ArgumentParser:
    ap = T.ArgumentParser(prog="make_demo_data.py",
                          description="Generate the bilingual demo instruction data (train.json, heldout.json).")
    ap.add_argument("--out", type=Path, default=assets_dir() / "demo_data")
    ap.add_argument("--seed", type=T.seed, default=0)
    ap.add_argument("--train-size", type=T.int_range(1, 30000), default=1600,
                    help="training records (at most 30000: with the held-out ones, the word lists give about 40000 "
                    "distinct records)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out folder (the default --out is "
                    "the shipped demo data)")
    ap.add_argument("--heldout-size", type=T.int_range(1, 10000), default=160, help="held-out records (at most 10000)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    train, heldout = write_demo_data(args.out, args.seed, args.train_size, args.heldout_size,
                                     overwrite=args.overwrite)
    print(f"wrote {len(train)} training and {len(heldout)} held-out records to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, "make_demo_data.py"))
