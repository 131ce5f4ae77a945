"""Whole-block pruning: which blocks to drop, compared on dev (issue 19, 2026-12-08).

``prune.cheapest_covering_set`` (the course's: the set of blocks that saves ``--ratio`` of the MACs for the
least summed increase of the training loss, solved exactly) against the usual shortcut, the cheapest block per
MAC saved first until the ratio is reached. Both read the same block scores (``prune.blocks_to_drop``), and
each pruned model retrains exactly as ``prune.prune_and_retrain`` does, on the dev splits, teachers and held-out
dev images of ``prune_frontier.py --select`` (never the validation split). Prints one row per seed and selection
and the means; every run is cached under ``<workspace>/benchmarks/block_selection``.

    .venv/bin/python benchmarks/prune_block_selection.py [--spec default] [--ratio 0.4] [--seeds 42 7 1]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from prune_frontier import dev_teacher, with_prune

from course_utils.core import session
from course_utils.vision import prune
from course_utils.vision.data import dev_split, resolve_dataset

Selection = Callable[[list[tuple[str, float, int]], float, int], list[str]]


def cheapest_per_mac_first(blocks: list[tuple[str, float, int]], needed: float, total: int) -> list[str]:
    """The shortcut: blocks by loss increase per MAC saved until ``needed`` MACs are saved (it may overshoot)."""
    chosen: list[str] = []
    saved = 0
    for name, _, macs in sorted(blocks, key=lambda block: block[1] / block[2]):
        if saved >= needed:
            break
        if not prune.overlaps(name, chosen):
            chosen.append(name)
            saved += macs
    return chosen


SELECTIONS: dict[str, Selection] = {"cheapest covering set": prune.cheapest_covering_set,
                                    "cheapest per MAC first": cheapest_per_mac_first}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="default")
    parser.add_argument("--ratio", type=float, default=0.4, help="the fraction of the MACs to remove")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 7, 1], help="dev splits, as --select")
    args = parser.parse_args(argv)
    config = session.start(args.spec, {})
    config = with_prune(config, scope="whole_blocks", ratio=args.ratio)
    dataset = resolve_dataset(config)
    print("| seed | selection | blocks dropped | MACs saved | dev top-1 before retraining | dev top-1 after |")
    print("|---|---|---:|---:|---:|---:|")
    scores: dict[str, list[tuple[float, float]]] = {name: [] for name in SELECTIONS}
    course_selection = prune.cheapest_covering_set
    try:
        for seed in args.seeds:
            seeded = config.model_copy(update={"seed": seed})
            outer = dev_split(dataset, config.prune.dev_fraction, seed)
            teacher = dev_teacher(seeded, outer)
            total = prune.macs_and_params(teacher)[0]
            for name, select in SELECTIONS.items():
                prune.cheapest_covering_set = select  # blocks_to_drop looks it up when called
                folder = config.workspace / "benchmarks" / "block_selection" / name.replace(" ", "_")
                run = prune.prune_and_retrain(teacher, outer, seeded.model_copy(update={"workspace": folder}),
                                              ratio=args.ratio)
                dropped = prune.pruning_record(prune.load_pruned(run.model_path))["dropped_blocks"]
                scores[name].append((run.val_top1_after_retrain, 1 - run.macs / total))
                print(f"| {seed} | {name} | {len(dropped)} | {1 - run.macs / total:.1%} | "
                      f"{run.val_top1_before_retrain:.3f} | {run.val_top1_after_retrain:.3f} |", flush=True)
    finally:
        prune.cheapest_covering_set = course_selection
    for name, rows in scores.items():
        print(f"| mean | {name} | | {sum(r[1] for r in rows) / len(rows):.1%} | | "
              f"{sum(r[0] for r in rows) / len(rows):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
