"""Every registry backbone, built with random weights: parameters, GMACs and CPU latency at batch 1.

Usage: python benchmarks/zoo_latency.py [--threads 1] [--models resnet50 deit-tiny ...]
"""

from __future__ import annotations

import argparse
import warnings

import torch

from course_utils.core.report import markdown_table
from course_utils.vision import zoo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="*", default=list(zoo.REGISTRY), help="registry names or aliases")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    rows = []
    for name in args.models:
        row = zoo.profile(name, threads=args.threads)
        row["family"] = zoo.entry(name).family
        rows.append(row)
        print(f"{row['alias']:18} {row['latency_ms_b1']:8.1f} ms", flush=True)
    print(f"\nCPU latency at batch 1, {args.threads} thread(s), torch {torch.__version__}\n")
    print(markdown_table(rows, ["alias", "family", "input_size", "params", "gmacs", "latency_ms_b1"]))


if __name__ == "__main__":
    main()
