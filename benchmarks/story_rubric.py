"""The story rubric on the fixed request set: labels, style, language, whole sentences, no leaked prompt, image
prompt keeps the labels, latency and tokens/s, per language, per prompt recipe and per offline model.

Tune on ``--split dev``; report ``--split test`` (never tuned on). Rows are cached in
``<workspace>/story/rubric.jsonl``: run it in chunks (``--max-new``) and it resumes where it stopped.

    .venv/bin/python benchmarks/story_rubric.py --split dev --recipes baseline tuned --models smollm2 gemma3-270m
    .venv/bin/python benchmarks/story_rubric.py --split test --recipes baseline tuned --models auto
"""

from __future__ import annotations

import argparse
import os

from course_utils.core.config import load_config
from course_utils.genai.story import StoryTeller
from course_utils.genai.story_rubric import RECIPES, StoryScore, load_requests, rubric_markdown, run_rubric


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=["dev", "test", "all"], default="dev")
    parser.add_argument("--recipes", nargs="+", default=["baseline", "tuned"], choices=list(RECIPES))
    parser.add_argument("--models", nargs="+", default=["auto"], help="llm.model values (auto: per language)")
    parser.add_argument("--languages", nargs="+", default=None, help="only these languages (en, zh)")
    parser.add_argument("--rails", default=None, help="a rail configuration (default: the spec's llm.rails)")
    parser.add_argument("--max-new", type=int, default=None, help="write at most this many new stories per run")
    parser.add_argument("--spec", default="default")
    parser.add_argument("--by", nargs="+", default=["model", "recipe", "language"])
    args = parser.parse_args()
    requests = load_requests(split=None if args.split == "all" else args.split, languages=args.languages)
    base = load_config(args.spec)
    cache = base.workspace / "story" / "rubric.jsonl"
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores · llm.threads={base.llm.threads} · "
          f"{len(requests)} requests ({args.split})")
    scores: list[StoryScore] = []
    written: list[StoryScore] = []
    for model in args.models:
        config = load_config(args.spec, {"llm": {"model": model}})
        for name in args.recipes:
            teller = StoryTeller(config, args.rails, recipe=RECIPES[name])
            for language in sorted({r.language for r in requests}):  # servers started before the clock runs
                teller.for_language(language).warm_up()
            budget = None if args.max_new is None else args.max_new - len(written)
            scores += run_rubric(teller, requests, cache, max_new=budget, on_row=written.append)
    print(rubric_markdown(scores, args.by))
    missing = len(args.models) * len(args.recipes) * len(requests) - len(scores)
    print(f"\n{len(written)} stories written now" + (f", {missing} still to write: run again to resume." if missing
                                                       else "."))


if __name__ == "__main__":
    main()
