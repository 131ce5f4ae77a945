"""Every registry backbone (random weights: speed does not depend on them): parameters, GMACs, PyTorch CPU latency.

Rows are cached in ``<workspace>/benchmarks/zoo_latency.jsonl`` (keyed by model, threads and torch version);
``--budget-s`` stops starting new rows after that many seconds, so a run in chunks resumes where it stopped.

Usage: python benchmarks/zoo_latency.py [--threads 1] [--models resnet50 deit-tiny ...] [--budget-s 420] [--fresh]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from row_cache import RowCache

from course_utils.core.config import load_config
from course_utils.core.report import markdown_table
from course_utils.vision import zoo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="*", default=list(zoo.REGISTRY), help="registry names or aliases")
    parser.add_argument("--budget-s", type=float, default=None, help="start no new row after this many seconds")
    parser.add_argument("--fresh", action="store_true", help="measure again even where a cached row matches")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    cache = RowCache(load_config("default").workspace / "benchmarks" / "zoo_latency.jsonl")
    rows, missing, started = [], 0, time.perf_counter()
    for name in args.models:
        key = {"model": zoo.entry(name).name, "threads": args.threads, "torch": torch.__version__}
        row = None if args.fresh else cache.get(key)
        if row is None and args.budget_s is not None and time.perf_counter() - started > args.budget_s:
            missing += 1
            continue
        if row is None:
            row = zoo.profile(name, threads=args.threads)
            row["family"] = zoo.entry(name).family
            row["offline_weights"] = "ImageNet (packaged)" if zoo.entry(name).package_weights else "none (random init)"
            cache.put(key, row)
        rows.append(row)
        print(f"{row['alias']:18} {row['latency_ms_b1']:8.1f} ms", flush=True)
    print(f"\nCPU latency at batch 1, {args.threads} thread(s), torch {torch.__version__}; "
          + (f"{missing} models still to measure: run again to resume.\n" if missing else "every model measured.\n"))
    print(markdown_table(rows, ["alias", "family", "offline_weights", "input_size", "params", "gmacs", "latency_ms_b1"]))


if __name__ == "__main__":
    main()
