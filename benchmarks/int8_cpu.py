"""INT8 on ONNX Runtime CPU: FP32 and every PTQ variant of the course model, accuracy and interleaved latency.

Runs notebook 06's pipeline for a spec (the FP32 ONNX, the calibration set, every recipe; INT8 files are
reused from ``<workspace>/int8`` when valid), then times all models in interleaved rounds (FP32, variant
1, variant 2, ... FP32, ...) so that load from other jobs hits every model alike, and reports the median
over rounds of each model's p50 latency and of its batch-8 throughput (batch / mean latency, as
``runtimes.Latency.throughput``).

    COURSE_DATA_CACHE=../shared/data .venv/bin/python benchmarks/int8_cpu.py [--spec default] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Mapping
from typing import Any

from course_utils.core.config import load_config
from course_utils.core.report import markdown_table
from course_utils.core.timing import measure_latency
from course_utils.deploy import ptq
from course_utils.deploy.calibration import build_calibration_set
from course_utils.deploy.runtimes import OrtRunner, validation_arrays
from course_utils.vision.data import resolve_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="default")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=10, help="timed runs per model, batch and round")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    config = load_config(args.spec)
    dataset = resolve_dataset(config)
    fp32, preprocessing = ptq.course_fp32_onnx(config)
    transform = preprocessing.eval_transform()
    calibration = build_calibration_set(dataset.samples["train"], transform, config.quant.calibration_images,
                                        ptq.calibration_batch(config), config.seed, fp32.input_name)
    images, labels = validation_arrays(dataset.samples["val"], transform)
    baseline, reference = ptq.measure_fp32(fp32, images, labels, config)
    results = {"fp32": baseline}
    for recipe in ptq.course_recipes(config.quant):
        made = ptq.quantize(fp32, recipe, calibration, ptq.int8_dir(config))
        results[recipe.name] = ptq.measure_int8(made, images, labels, config, reference, latency=False)
    runners = {name: OrtRunner(result.path, threads=args.threads) for name, result in results.items()}
    p50: dict[tuple[str, int], list[float]] = {}
    throughput: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, runner in runners.items():
            for batch in (1, 8):
                latency = measure_latency(runner, batch, fp32.input_size, 2, args.iterations)
                p50.setdefault((name, batch), []).append(latency.p50_ms)
                if batch == 8:
                    throughput.setdefault(name, []).append(latency.throughput)
    median = {key: statistics.median(values) for key, values in p50.items()}
    images_per_s = {name: statistics.median(values) for name, values in throughput.items()}
    rows: list[Mapping[str, Any]] = [
        {"model": name, "target": result.target, "val_top1": result.val_top1,
         "top1_drop_vs_fp32": result.top1_drop_vs_fp32, "agreement_with_fp32": result.agreement_with_fp32,
         "size_mb": result.size_mb, "p50_ms_b1": median[name, 1], "p50_ms_b8": median[name, 8],
         "speedup_b8": median["fp32", 8] / median[name, 8], "images_per_s_b8": images_per_s[name],
         "throughput_x_b8": images_per_s[name] / images_per_s["fp32"]}
        for name, result in results.items()]
    print(f"{dataset.name}: {len(labels)} validation images; {len(calibration)} calibration images; "
          f"{args.rounds} rounds x {args.iterations} runs; {args.threads} thread(s); "
          f"load average {os.getloadavg()[0]:.1f}")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
