"""The guarded story: offline latency per rail configuration, rails overhead, and the red-team table.

Runs the offline default (llama.cpp serving SmolLM2-135M, ``llm.threads`` threads) on the default spec:
the same short story with each rail configuration (after a warm-up), the deterministic rails' overhead
against no rails on an identical request (temperature 0, fixed seed), and every configuration on the
red-team set (the LLM self check on a 24-prompt sample).

    .venv/bin/python benchmarks/story.py [--runs 5] [--spec default]
"""

from __future__ import annotations

import argparse
import os
import statistics

from course_utils.core.config import load_config
from course_utils.core.report import markdown_table
from course_utils.genai.story import StoryTeller, rails_overhead
from course_utils.genai.story_rails import evaluate_rails, load_redteam, rail_configurations, redteam_markdown

LABELS = ["tabby cat", "teapot"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--spec", default="default")
    args = parser.parse_args()
    config = load_config(args.spec)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores · llm.threads={config.llm.threads}")

    rows = []
    for name in ("none", "deterministic", "guarded"):
        teller = StoryTeller(config, name).warm_up()
        results = [teller.tell(LABELS, length="short") for _ in range(args.runs)]
        streamed = [teller.stream(LABELS, length="short").collect() for _ in range(args.runs)]
        rows.append({
            "rails": name, "story p50 s": statistics.median(r.timings["story_s"] for r in results),
            "total p50 s (story + image prompt)": statistics.median(r.timings["total_s"] for r in results),
            "stream first text p50 s": statistics.median(r.timings["first_chunk_s"] for r in streamed),
            "tokens/s": statistics.median(r.tokens_per_second for r in results),
        })
    print(markdown_table(rows) + "\n")

    overhead = rails_overhead(config, LABELS, "deterministic", runs=args.runs)
    print(f"deterministic rails overhead: {overhead.overhead:+.1%} (no rails {statistics.median(overhead.unguarded_s):.2f} s,"
          f" rails {statistics.median(overhead.guarded_s):.2f} s, median of {args.runs}, same 120-token story)\n")

    teller = StoryTeller(config, "none")
    items = load_redteam()
    results = [evaluate_rails(name, load_redteam(sample=24, seed=0) if name == "self_check" else items, teller.endpoint)
               for name in rail_configurations()]
    print(redteam_markdown(results))


if __name__ == "__main__":
    main()
