"""INT8 on ONNX Runtime CPU: every PTQ recipe of the course model side by side, a per-layer profile, latency.

Runs notebook 06's pipeline for a spec (the FP32 ONNX, the calibration set = the training images) and:

1. quantizes the base CPU recipe (U8S8, MinMax, Q/DQ, per-channel weights) and profiles FP32 and INT8 with ONNX
   Runtime's profiler (``enable_profiling``) at batch 8: time per layer, per layer kind and per op type;
2. quantizes every other recipe: per-tensor weights, QOperator, ``reduce_range``, S8 activations, graph
   preparations before quantizing (``quant_pre_process``, ONNX Runtime's optimized model, onnxslim),
   ``extra_options``, and the layers the profile shows not to gain kept in FP32 (``nodes_to_exclude``);
3. measures each model's accuracy: agreement with FP32 on the training images (the *dev* criterion the recipe
   is chosen on) and top-1 on the validation split (reported, never chosen on);
4. times all models in interleaved rounds (FP32, recipe 1, recipe 2, ... FP32, ...) at batch 1, 4 and 8 for
   each thread count, so that load from other jobs hits every model alike; median over rounds of each
   model's p50 latency and of its throughput (batch / mean latency, as ``runtimes.Latency.throughput``).

INT8 files are cached in ``<workspace>/int8`` (``ptq.quantize``), accuracy rows and each thread count's
timings in ``<workspace>/benchmarks/int8_cpu.jsonl``: an interrupted run resumes where it stopped.

    COURSE_DATA_CACHE=../shared/data .venv/bin/python benchmarks/int8_cpu.py [--spec default] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from row_cache import RowCache

from course_utils.core.config import load_config
from course_utils.core.report import markdown_table
from course_utils.core.timing import measure_latency
from course_utils.deploy import ptq
from course_utils.deploy.calibration import build_calibration_set
from course_utils.deploy.runtimes import OrtRunner, validation_arrays
from course_utils.vision.data import resolve_dataset

PROFILE_BATCH = ptq.LATENCY_BATCHES[-1]


def recipes(base: ptq.Recipe, times: list[ptq.LayerTime]) -> list[ptq.Recipe]:
    """Every recipe compared: one option changed from ``base`` at a time, then the layers kept in FP32."""
    slow = ptq.layers_to_keep_fp32(times, 1.0)
    below = ptq.layers_to_keep_fp32(times, 1.5)
    depthwise = tuple(t.node for t in times if t.kind == "depthwise")
    stem = tuple(t.node for t in times if t.kind == "stem")
    chosen = [base, replace(base, per_channel=False), replace(base, quant_format="qoperator"),
              replace(base, reduce_range=True), replace(base, activations="s8", extra=(("ActivationSymmetric", False),)),
              replace(base, prepare="ort-preprocess"), replace(base, prepare="ort-optimized"),
              replace(base, prepare="onnxslim"),
              replace(base, extra=(("ForceQuantizeNoInputCheck", True),)),
              replace(base, extra=(("MatMulConstBOnly", True),))]
    for label, nodes in (("slow", slow), ("below1.5x", below), ("depthwise", depthwise), ("stem", stem)):
        if nodes and all(r.keep_fp32 != nodes for r in chosen):
            chosen.append(replace(base, keep_fp32=nodes, label=label))
    return chosen


def accuracy_row(made: ptq.Int8Model | None, path: Path, val: tuple[np.ndarray, np.ndarray], dev: np.ndarray,
                 reference: dict[str, np.ndarray]) -> dict[str, Any]:
    """Top-1 on the validation split, agreement with FP32 there and on the training images (dev), size."""
    with OrtRunner(path, threads=1) as runner:
        val_pred, dev_pred = ptq.predictions(runner, val[0]), ptq.predictions(runner, dev)
    labels = val[1]
    return {"val_top1": float((val_pred == labels).mean()),
            "top1_drop_vs_fp32": float((reference["val"] == labels).mean() - (val_pred == labels).mean()),
            "val_agreement": float((val_pred == reference["val"]).mean()),
            "dev_agreement": float((dev_pred == reference["dev"]).mean()),
            "size_mb": path.stat().st_size / 2**20, "reused": bool(made and made.reused)}


def timings(paths: Mapping[str, Path], threads: int, batches: tuple[int, ...], input_size: int, rounds: int,
            iterations: int) -> dict[str, dict[str, float]]:
    """Interleaved rounds over every model: median p50 (ms) per batch and median throughput (images/s) per batch."""
    runners = {name: OrtRunner(path, threads=threads) for name, path in paths.items()}
    p50: dict[tuple[str, int], list[float]] = {}
    rate: dict[tuple[str, int], list[float]] = {}
    for _ in range(rounds):
        for name, runner in runners.items():
            for batch in batches:
                latency = measure_latency(runner, batch, input_size, 2, iterations)
                p50.setdefault((name, batch), []).append(latency.p50_ms)
                rate.setdefault((name, batch), []).append(latency.throughput)
    for runner in runners.values():
        runner.close()
    return {name: {**{f"p50_ms_b{b}": statistics.median(p50[name, b]) for b in batches},
                   **{f"images_per_s_b{b}": statistics.median(rate[name, b]) for b in batches}} for name in paths}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="default")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=10, help="timed runs per model, batch and round")
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 4, 8])
    parser.add_argument("--fresh", action="store_true", help="measure again even where cached rows match")
    args = parser.parse_args()

    config = load_config(args.spec)
    cache = RowCache(config.workspace / "benchmarks" / "int8_cpu.jsonl")
    dataset = resolve_dataset(config)
    fp32, preprocessing = ptq.course_fp32_onnx(config)
    transform = preprocessing.eval_transform()
    calibration = build_calibration_set(dataset.samples["train"], transform, config.quant.calibration_images,
                                        ptq.calibration_batch(config), config.seed, fp32.input_name)
    val = validation_arrays(dataset.samples["val"], transform)
    with OrtRunner(fp32.path, threads=1) as runner:
        reference = {"val": ptq.predictions(runner, val[0]), "dev": ptq.predictions(runner, calibration.images)}
    folder = ptq.int8_dir(config)

    base = ptq.Recipe("onnxruntime", "minmax")
    base_model = ptq.quantize(fp32, base, calibration, folder)
    times = ptq.layer_times(fp32.path, base_model.path, PROFILE_BATCH, fp32.input_size)
    ops = {"fp32": ptq.time_by_op(ptq.node_times(fp32.path, PROFILE_BATCH, fp32.input_size)),
           base.name: ptq.time_by_op(ptq.node_times(base_model.path, PROFILE_BATCH, fp32.input_size))}

    paths: dict[str, Path] = {"fp32": fp32.path}
    rows: dict[str, dict[str, Any]] = {}
    for recipe in recipes(base, times):
        made = ptq.quantize(fp32, recipe, calibration, folder)
        paths[recipe.name] = made.path
        key = {"accuracy": made.path.name, "val": len(val[1]), "dev": calibration.sha256}
        row = None if args.fresh else cache.get(key)
        if row is None:
            row = accuracy_row(made, made.path, val, calibration.images, reference)
            cache.put(key, row)
        rows[recipe.name] = {"fp32_layers": len(recipe.keep_fp32), **row}
    rows = {"fp32": {"fp32_layers": len(times), **accuracy_row(None, fp32.path, val, calibration.images, reference)},
            **rows}

    batches = tuple(args.batches)
    for threads in args.threads:
        key = {"timing": sorted(p.name for p in paths.values()), "threads": threads, "batches": list(batches),
               "rounds": args.rounds, "iterations": args.iterations}
        timed = None if args.fresh else cache.get(key)
        if timed is None:
            timed = timings(paths, threads, batches, fp32.input_size, args.rounds, args.iterations)
            timed["load_average"] = {"1min": os.getloadavg()[0]}
            cache.put(key, timed)
        for name in paths:
            for column, value in timed[name].items():
                rows[name][f"t{threads}_{column}"] = value
            rows[name][f"t{threads}_throughput_x_b8"] = (timed[name]["images_per_s_b8"]
                                                        / timed["fp32"]["images_per_s_b8"])
        print(f"{threads} thread(s): load average {timed['load_average']['1min']:.1f} after timing")

    print(f"{dataset.name}: {len(val[1])} validation images; {len(calibration)} calibration (= dev) images; "
          f"{args.rounds} rounds x {args.iterations} runs; threads {args.threads}")
    print(f"\nPer layer kind, batch {PROFILE_BATCH}, 1 thread (ONNX Runtime profiler, ms per batch), FP32 vs {base.name}:")
    print(markdown_table(ptq.gains_by_kind(times)))
    print(f"\nPer op type (ms per batch at batch {PROFILE_BATCH}, 1 thread):")
    names = sorted(set(ops["fp32"]) | set(ops[base.name]), key=lambda op: -(ops["fp32"].get(op, 0)
                                                                             + ops[base.name].get(op, 0)))
    print(markdown_table([{"op": op, "fp32_ms": ops["fp32"].get(op, 0.0), "int8_ms": ops[base.name].get(op, 0.0)}
                          for op in names]))
    print("\nPer layer (FP32 graph order):")
    print(markdown_table([{"node": t.node, "kind": t.kind, "fp32_ms": t.fp32_ms, "int8_ms": t.int8_ms, "gain": t.gain}
                          for t in times]))
    eligible = [name for name, row in rows.items() if name != "fp32" and row["dev_agreement"] >= ptq.MIN_DEV_AGREEMENT]
    speed = f"t{args.threads[0]}_images_per_s_b8"
    best = max(eligible, key=lambda name: rows[name][speed]) if eligible else None
    print(f"\nRecipes (chosen on dev agreement >= {ptq.MIN_DEV_AGREEMENT} and throughput at batch 8 with "
          f"{args.threads[0]} thread(s): {best}):")
    print(markdown_table([{"model": name, **row} for name, row in rows.items()]))


if __name__ == "__main__":
    main()
