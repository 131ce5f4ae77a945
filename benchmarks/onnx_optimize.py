"""Node counts of every registry backbone's ONNX export, raw and after each optimization tool.

For each backbone (random weights) and each exporter: export with a dynamic batch (traced at batch 2),
check the raw graph against PyTorch at batch 1, 3 and 8, then count nodes after
``polygraphy surgeon sanitize --fold-constants``, onnxsim and onnxslim alone and after the course's
pipeline, each checked at batch 3; the chosen graph is checked again at batch 1, 3 and 8.

    .venv/bin/python benchmarks/onnx_optimize.py                     # every backbone, both exporters
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

from course_utils.deploy.graph_optimize import (
    COURSE_PIPELINE,
    SINGLE_TOOLS,
    ParityChecker,
    optimize_graph,
    tool_versions,
)
from course_utils.deploy.onnx_export import effective_opset, export_onnx, randomize_zero_weights
from course_utils.vision import zoo


def measure(name: str, exporter: str, opset: int, work: Path) -> dict[str, Any]:
    """One row of the table: export, parity of the raw graph, every tool alone, the course's pipeline."""
    item = zoo.entry(name)
    row: dict[str, Any] = {"model": item.alias, "exporter": exporter, "input": item.input_size}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = randomize_zero_weights(zoo.load(name, pretrained=False))
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
    full = ParityChecker(model, size)
    raw_parity = full.check(raw)
    row["raw_rel_1_3_8"] = raw_parity.max_rel_diff
    if not raw_parity.passed:
        row["error"] = f"raw export differs from PyTorch (max rel. diff {raw_parity.max_rel_diff:.2g})"
        return row
    started = time.perf_counter()
    result = optimize_graph(raw, ParityChecker(model, size, batches=(3,)), work)
    row["optimize_s"] = time.perf_counter() - started
    row["raw"] = result.raw.stats.nodes
    for record in result.singles:
        row[record.step] = record.stats.nodes if record.kept else f"({record.note})"
    trace = [result.raw.stats.nodes] + [r.stats.nodes if r.kept else f"x{r.stats.nodes}" for r in result.pipeline]
    row["pipeline_trace"] = "→".join(str(n) for n in trace)
    row["course"] = next((r.stats.nodes for r in reversed(result.pipeline) if r.kept), result.raw.stats.nodes)
    row["chosen"] = result.chosen.stats.nodes
    row["chosen_rel_1_3_8"] = full.check(result.chosen.path).max_rel_diff  # type: ignore[arg-type]
    best_single = min((r.stats.nodes for r in result.singles if r.kept), default=row["raw"])
    row["course_le_best_single"] = row["course"] <= best_single
    return row


HEADER = ("| backbone | exporter | input | raw | sanitize | onnxsim | onnxslim | course pipeline | chosen | "
          "reduction | rel. diff raw @1/3/8 | rel. diff chosen @1/3/8 | course ≤ best tool | export s | optimize s |")


def format_row(row: dict[str, Any]) -> str:
    """One backbone and exporter as a Markdown table row."""
    if "raw" not in row:
        return f"| {row['model']} | {row['exporter']} | {row['input']} | {row['error']} |" + " |" * 11
    return (f"| {row['model']} | {row['exporter']} | {row['input']} | {row['raw']} | {row['sanitize']} | "
            f"{row['onnxsim']} | {row['onnxslim']} | {row['course']} | {row['chosen']} | "
            f"{1 - row['chosen'] / row['raw']:.0%} | {row['raw_rel_1_3_8']:.1e} | {row['chosen_rel_1_3_8']:.1e} | "
            f"{'yes' if row['course_le_best_single'] else 'no'} | {row['export_s']:.1f} | {row['optimize_s']:.1f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(zoo.REGISTRY), help="registry names or aliases")
    parser.add_argument("--exporters", nargs="*", default=["torchscript", "dynamo"], choices=["torchscript", "dynamo"])
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    started = time.perf_counter()
    print(HEADER + "\n|" + "---|" * (HEADER.count("|") - 1), flush=True)
    with tempfile.TemporaryDirectory(prefix="onnx-bench-") as folder:
        for name in args.models:
            for exporter in args.exporters:
                rows.append(measure(name, exporter, args.opset, Path(folder)))
                print(format_row(rows[-1]), flush=True)
                for extra in Path(folder).iterdir():
                    extra.unlink()
                gc.collect()
    print(f"\nsingle tools: {', '.join(SINGLE_TOOLS)}; course pipeline: {' → '.join(COURSE_PIPELINE)}; "
          f"{args.threads} thread(s); {time.perf_counter() - started:.0f} s in all")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in tool_versions().items()))
    print("\npipeline node counts step by step (x: rolled back):")
    for row in rows:
        print(f"- {row['model']} / {row['exporter']}: {row.get('pipeline_trace', row.get('error'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
