"""Seconds per picture of the configured text-to-image pipeline, by size and scheduler (CPU, 1 thread).

Offline this is the tiny random-weight pipeline: its figures time the code path (text encoder, UNet,
scheduler, VAE at that size), not SD-Turbo. Run:
``.venv/bin/python benchmarks/imagegen_tiny.py [--spec smoke] [--set workspace=/tmp/ws] [--sizes 64 256 512]``.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from course_utils.cli import _parse_sets
from course_utils.core.config import load_config
from course_utils.genai import imagegen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="smoke")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 512])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = load_config(args.spec, _parse_sets(args.set))
    generator = imagegen.load_generator(config)
    print(f"model {generator.source.name} (real weights: {generator.source.real_weights}); {generator.plan.reason}\n")
    print("| scheduler | size px | steps | s per picture (median) |\n|---|---|---|---|")
    for scheduler in ("default", "ddim", "euler_a", "lcm"):
        generator.use_scheduler(scheduler)
        for size in args.sizes:
            seconds = [generator.generate("a cat", steps=config.imagegen.steps, size=size).seconds
                       for _ in range(args.repeats)]
            print(f"| {scheduler} | {size} | {config.imagegen.steps} | {statistics.median(seconds):.2f} |")


if __name__ == "__main__":
    main()
