"""Generate the demo instruction data the package ships (the tasks and the generator: minipeft/demo_data.py).

    python tools/make_demo_data.py --out minipeft/assets/demo_data --seed 0

The same seed gives byte-identical files.
"""

import argparse
import sys
from pathlib import Path

from minipeft import assets_dir
from minipeft.demo_data import write_demo_data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Generate the bilingual demo instruction data (train.json, heldout.json).")
    ap.add_argument("--out", type=Path, default=assets_dir() / "demo_data")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-size", type=int, default=1600)
    ap.add_argument("--heldout-size", type=int, default=160)
    args = ap.parse_args(argv)
    train, heldout = write_demo_data(args.out, args.seed, args.train_size, args.heldout_size)
    print(f"wrote {len(train)} training and {len(heldout)} held-out records to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
