"""Pruning that keeps its accuracy: settings chosen on a dev split, then the accuracy-vs-MACs frontier on val.

Two parts, each printing a table (figures name their split):

``--select`` chooses the retraining settings on **dev** images, never on the validation split. The training
images are split (``data.dev_split``, the spec's ``prune.dev_fraction`` and seed) into train and dev; a teacher
is fine-tuned from ImageNet with notebook 02's settings on the train part alone (picking its epoch on a dev part
of *that*), and every candidate prunes it at ``--ratio`` and retrains exactly as ``prune.prune_and_retrain``
does (on that same inner split), then is scored on the held-out dev images. The candidates are searched
greedily, one question per stage (distillation weight and temperature, importance criterion, iterative steps
and retraining budget): each stage starts from the best settings so far, ties go to the cheaper candidate.

``--frontier`` prunes notebook 02's fine-tuned model (its ledger record in the workspace) at each ``--ratios``
with and without distillation, everything else as the spec says, and reports **val** top-1 (scored once per
configuration), dev top-1 (the dev part retraining picked its epoch on), MACs, parameters and CPU latency at
batch 1 and 8 with one thread: PyTorch eager and ONNX Runtime. Run nothing else meanwhile: the latencies are
measured on this machine's cores.

Rows are cached in ``<workspace>/benchmarks/prune_frontier.jsonl`` (and every pruned run in
``<workspace>/prune``); ``--budget-s`` stops starting new rows after that many seconds, so a long run goes
in chunks that resume where the last one stopped:

    .venv/bin/python benchmarks/prune_frontier.py --select --budget-s 480
    .venv/bin/python benchmarks/prune_frontier.py --frontier --budget-s 480
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from row_cache import RowCache, source_digest

from course_utils.core import session
from course_utils.core.config import CourseConfig
from course_utils.core.environment import package_version
from course_utils.core.timing import measure_latency
from course_utils.vision import finetune, prune
from course_utils.vision.data import ImageFolderDataset, dev_split, resolve_dataset

# The greedy search: one question per stage, each candidate a change to the best ``prune`` settings so far.
# Retraining budgets stay at most 4 epochs: the main job's time budget (notebook 03 on 2 CPU cores).
STAGES: list[tuple[str, list[dict[str, Any]]]] = [
    ("distillation", [{"distill": False}] + [{"distill": True, "distill_alpha": alpha, "distill_temperature": t}
                                             for alpha in (0.5, 0.9) for t in (2.0, 4.0)]),
    ("schedule", [{}, {"retrain_epochs": 4}, {"steps": 3, "step_epochs": 1, "retrain_epochs": 2}]),
    ("learning rate", [{}, {"retrain_lr": 5e-4}, {"retrain_lr": 2e-3}, {"retrain_lr": 2.5e-4}]),
    ("importance", [{"importance": name} for name in ("l2", "taylor", "hessian")]),
    ("distillation at that rate", [{}, {"distill": True, "distill_alpha": 0.5, "distill_temperature": 2.0},
                                   {"distill": True, "distill_alpha": 0.9, "distill_temperature": 4.0}]),
    # What is pruned, at about the same MACs: every channel at ratio 0.25 (-44%), or only the channels inside
    # the blocks, which needs a higher ratio for a similar saving (0.4: -42%).
    ("scope", [{}, {"scope": "within_blocks", "ratio": 0.4}, {"scope": "within_blocks", "ratio": 0.45}]),
    ("distillation within blocks", [{}, {"distill": True, "distill_alpha": 0.5, "distill_temperature": 2.0}]),
    # Depth instead of width: whole residual blocks go (ratio: the fraction of MACs) in one step, and the
    # same 4 epochs retrain them.
    ("whole blocks", [{}, {"scope": "whole_blocks", "ratio": 0.4, "steps": 1, "retrain_epochs": 4}]),
    ("retraining whole blocks", [{}, {"retrain_lr": 2.5e-4},
                                 {"distill": True, "distill_alpha": 0.5, "distill_temperature": 2.0}]),
]
SOURCES = [Path(__file__), Path(prune.__file__), Path(finetune.__file__)]


def with_prune(config: CourseConfig, **changes: Any) -> CourseConfig:
    """``config`` with its ``prune`` section changed (validated like the spec)."""
    return config.model_copy(update={"prune": config.prune.model_validate({**config.prune.model_dump(), **changes})})


def retrain_epochs(settings: dict[str, Any]) -> int:
    """Every epoch a candidate retrains, over all its steps (ties in the search go to the fewest)."""
    return (settings["steps"] - 1) * settings["step_epochs"] + settings["retrain_epochs"]


def dev_teacher(config: CourseConfig, outer: ImageFolderDataset) -> finetune.Classifier:
    """Notebook 02's fine-tuning on the train part of ``outer`` alone, its epoch picked on an inner dev part."""
    inner = dev_split(outer, config.prune.dev_fraction, config.seed)
    model, _, _ = finetune.train_classifier(config, inner)
    return model


def select(config: CourseConfig, ratio: float, seeds: list[int], cache: RowCache, deadline: float,
           stages: list[str] | None = None) -> bool:
    """The greedy search on dev; prints one row per candidate and the settings chosen. False if out of time.

    Every candidate runs once per seed (each seed its own dev split, teacher and retraining): the dev
    top-1 is their mean, since one image of a 49-image dev split is 2 points. ``stages`` runs only the
    stages named, starting from the spec's settings (an earlier search's choice); a candidate may set its
    own ``ratio``.
    """
    dataset = resolve_dataset(config)
    folds = []
    for seed in seeds:
        seeded = config.model_copy(update={"seed": seed})
        outer = dev_split(dataset, config.prune.dev_fraction, seed)
        teacher = dev_teacher(seeded, outer)
        folds.append((seeded, outer, teacher, finetune.evaluate(teacher, outer.samples["val"]).top1))
    best = {**config.prune.model_dump(), "ratio": ratio}
    print(f"Dev search at ratio {ratio}, seeds {seeds}: retrain on {len(folds[0][1].samples['train'])} training "
          f"images (an inner dev split picks the epoch), score on {len(folds[0][1].samples['val'])} held-out dev "
          f"images; the unpruned teachers score {sum(f[3] for f in folds) / len(folds):.3f} on them.\n")
    print("| stage | candidate | dev top-1 (mean) | per seed | MACs (M) | retrain epochs | retrain s |")
    print("|---|---|---:|---|---:|---:|---:|")
    for stage, candidates in STAGES:
        if stages and stage not in stages:
            continue
        scored: list[tuple[float, int, int, dict[str, Any]]] = []
        for index, change in enumerate(candidates):
            settings = {**best, **change}
            rows = []
            for seeded, outer, teacher, _ in folds:
                key = {"part": "select", "ratio": settings["ratio"], "settings": settings, "seed": seeded.seed,
                       "train": config.train.model_dump(), "code": source_digest(*SOURCES)}
                row = cache.get(key)
                if row is None:
                    if time.monotonic() > deadline:
                        return False
                    run = prune.prune_and_retrain(teacher, outer, with_prune(seeded, **settings),
                                                  ratio=settings["ratio"])
                    row = {"dev_top1": run.val_top1_after_retrain, "macs": run.macs, "seconds": run.retrain_seconds}
                    cache.put(key, row)
                rows.append(row)
            mean = sum(row["dev_top1"] for row in rows) / len(rows)
            scored.append((round(mean, 6), -retrain_epochs(settings), -index, settings))
            label = ", ".join(f"{k}={v}" for k, v in change.items()) or "as before"
            per_seed = " ".join(f"{row['dev_top1']:.2f}" for row in rows)
            print(f"| {stage} | {label} | {mean:.3f} | {per_seed} | "
                  f"{rows[0]['macs'] / 1e6:.1f} | {retrain_epochs(settings)} | "
                  f"{sum(r['seconds'] for r in rows) / len(rows):.0f} |", flush=True)
        best = max(scored, key=lambda item: item[:3])[3]
    chosen = {k: v for k, v in best.items() if k in {"ratio", "scope", "importance", "steps", "step_epochs", "retrain_epochs",
                                                     "retrain_lr", "distill", "distill_alpha",
                                                     "distill_temperature"}}
    print(f"\nChosen on dev: {chosen}")
    return True


def ort_latency(model: finetune.Classifier, config: CourseConfig) -> dict[str, float]:
    """ONNX Runtime CPU p50 latency (ms) at batch 1 and 8 with ``config.benchmark.threads`` threads."""
    from course_utils.deploy.onnx_export import export_onnx
    from course_utils.deploy.runtimes import OrtRunner

    size, bench = model.preprocessing.input_size, config.benchmark
    with tempfile.TemporaryDirectory() as folder:
        path = export_onnx(model, Path(folder) / "model.onnx", size)
        with OrtRunner(path, threads=bench.threads) as runner:
            return {f"ort_ms_b{batch}": round(measure_latency(runner, batch, size, bench.warmup,
                                                              bench.iterations).p50_ms, 2) for batch in (1, 8)}


def frontier(config: CourseConfig, ratios: list[float], cache: RowCache, deadline: float) -> bool:
    """Val top-1, MACs and latency at every ratio, with and without distillation. False if out of time."""
    from course_utils.vision.deployment import load_finetuned

    dataset, model = resolve_dataset(config), load_finetuned(config)
    print(f"{model.backbone} fine-tuned on {dataset.name}; prune settings {config.prune.model_dump()}\n")
    print("| ratio | distilled | params (M) | MACs (M) | MACs saved | val top-1 | drop (points) | dev top-1 | "
          "torch ms b1 | torch ms b8 | ORT ms b1 | ORT ms b8 | retrain s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    unpruned: dict[str, Any] | None = None
    for ratio in ratios:
        for distill in ([False] if ratio == 0.0 else [True, False]):
            settings = with_prune(config, distill=distill)
            key = {"part": "frontier", "ratio": ratio, "model": prune.fingerprint(model),
                   "settings": settings.prune.model_dump(), "train": config.train.model_dump(),
                   "benchmark": config.benchmark.model_dump(), "seed": config.seed,
                   "onnxruntime": package_version("onnxruntime"), "code": source_digest(*SOURCES)}
            row = cache.get(key)
            if row is None:
                if time.monotonic() > deadline:
                    return False
                run = prune.prune_and_retrain(model, dataset, settings, ratio=ratio)
                row = {"params": run.params, "macs": run.macs, "val_top1": run.val_top1_after_retrain,
                       "dev_top1": run.dev_top1_after_retrain, "torch_ms_b1": run.latency_ms_b1,
                       "torch_ms_b8": run.latency_ms_b8, "seconds": run.retrain_seconds,
                       **ort_latency(prune.load_pruned(run.model_path), config)}
                cache.put(key, row)
            unpruned = unpruned or row
            dev = "" if row["dev_top1"] is None else f"{row['dev_top1']:.3f}"
            print(f"| {ratio:g} | {'yes' if distill else 'no'} | {row['params'] / 1e6:.2f} | {row['macs'] / 1e6:.1f} "
                  f"| {1 - row['macs'] / unpruned['macs']:.0%} | {row['val_top1']:.3f} "
                  f"| {100 * (unpruned['val_top1'] - row['val_top1']):.1f} | {dev} | {row['torch_ms_b1']:.1f} "
                  f"| {row['torch_ms_b8']:.1f} | {row['ort_ms_b1']:.1f} | {row['ort_ms_b8']:.1f} "
                  f"| {row['seconds']:.0f} |", flush=True)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="default")
    parser.add_argument("--select", action="store_true", help="choose the retraining settings on dev")
    parser.add_argument("--frontier", action="store_true", help="val top-1 / MACs / latency at every ratio")
    parser.add_argument("--ratio", type=float, default=0.25, help="the ratio the dev search prunes at")
    parser.add_argument("--stages", nargs="+", choices=[name for name, _ in STAGES],
                        help="run only these stages of the search, from the spec's settings")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 7, 1], help="dev splits the search averages")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.1, 0.25, 0.4, 0.5])
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="start no new row after this many seconds (rerun to resume)")
    args = parser.parse_args(argv)
    config = session.start(args.spec, {})
    cache = RowCache(config.workspace / "benchmarks" / "prune_frontier.jsonl")
    deadline = time.monotonic() + args.budget_s
    done = True
    if args.select:
        done = select(config, args.ratio, args.seeds, cache, deadline, args.stages) and done
    if args.frontier:
        done = frontier(config, list(dict.fromkeys(args.ratios)), cache, deadline) and done
    if not done:
        print(f"\nOut of the {args.budget_s:.0f} s budget: rerun to measure the remaining rows.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
