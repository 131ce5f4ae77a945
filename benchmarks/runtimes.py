"""PyTorch eager vs ONNX Runtime (1 and 2 intra-op threads) on the course model, CPU, batch 1/4/8.

Speed does not depend on the classifier head's weights, so the script builds efficientnet-lite0 with its
ImageNet weights and a fresh 2-class head, exports it with a dynamic batch (or times ``--onnx PATH``,
e.g. notebook 04's optimized ONNX) and runs the course's one benchmark (``course_utils.deploy.runtimes``).

    .venv/bin/python benchmarks/runtimes.py [--iterations 30] [--warmup 5] [--onnx PATH]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

from course_utils.core.report import markdown_table
from course_utils.deploy.runtimes import OrtRunner, benchmark, results_rows
from course_utils.vision.inference import TorchRunner


def export(model: object, path: Path, size: int) -> Path:
    """The classifier as ONNX with a dynamic batch (traced at batch 2, as the ONNX stage does)."""
    import torch

    torch.onnx.export(model, (torch.randn(2, 3, size, size),), str(path), input_names=["images"],
                      output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=17, dynamo=False)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet-lite0")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--onnx", type=Path, help="time this ONNX instead of a fresh export")
    args = parser.parse_args()

    import torch

    from course_utils.vision.zoo import load

    model = load(args.backbone, ["ants", "bees"]).eval()
    size = model.preprocessing.input_size
    with tempfile.TemporaryDirectory() as folder:
        onnx_path = args.onnx or export(model, Path(folder) / "model.onnx", size)
        runners = [TorchRunner(model, threads=1), OrtRunner(onnx_path, threads=1),
                   OrtRunner(onnx_path, threads=2)]
        results = benchmark(runners, [1, 4, 8], size, args.warmup, args.iterations)
    print(f"# {args.backbone} {size} px · {platform.processor() or platform.machine()} · {os.cpu_count()} cores · "
          f"torch {torch.__version__} · {args.iterations} timed runs after {args.warmup} warm-up\n")
    print(markdown_table([{k: v for k, v in row.items() if k != "val top-1"} for row in results_rows(results)]))
    eager, ort1, ort2 = (r.latencies[8].throughput for r in results)
    print(f"\nthroughput at batch 8: ONNX Runtime 1 thread {ort1 / eager:.2f}x PyTorch eager, "
          f"2 threads {ort2 / eager:.2f}x; 2 threads vs 1: {ort2 / ort1:.2f}x")


if __name__ == "__main__":
    main()
