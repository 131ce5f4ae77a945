"""How the input classifier's settings were chosen: leave one retired test part out of the development data.

The development part (``data/story/redteam.yaml``) holds the course's own prompts and, at its end, six
earlier test parts that were retired into it (their entries carry ``source:``, the part's file name). Each
was written at another time, by another author, so holding one out and training on the rest is a fairer
rehearsal of a new, unseen set than random folds of one author's prompts are (random folds put a near-twin
of every prompt in the training folds). For each setting in the grid (JSON, changes to
``data/story/classifier.yaml``'s ``input`` section) the classifier is trained once without
each part, and judges the held-out part together with the keyword rules, as the ``guarded`` rails do.
The frozen test part is never read here. The rule for choosing (2026-12-07): the least
shortfall from the targets, max(0, 95% - blocked) + max(0, false positives - 5%).

    .venv/bin/python benchmarks/rails_select.py '[{}, {"encoder_gamma": 10.0}, {"ngram_weight": 0.5}]'
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

from course_utils.genai import safety_classifier as sc
from course_utils.genai.story_rails import REDTEAM_FILE, default_blocklist


def sources(path: Path = REDTEAM_FILE) -> dict[str, str]:
    """Each development text's source: the retired test part it came from (its ``source``), or "course"."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return {d["text"]: d.get("source", "course") for key in ("adversarial", "benign") for d in data[key]}


def rates(rows: list[tuple[bool, bool]]) -> tuple[float, float]:
    """Blocked share of the harmful rows and of the benign ones, from (harmful, blocked) pairs."""
    harmful = [blocked for is_harmful, blocked in rows if is_harmful]
    benign = [blocked for is_harmful, blocked in rows if not is_harmful]
    return sum(harmful) / max(len(harmful), 1), sum(benign) / max(len(benign), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid", nargs="?", default="[{}]", help="JSON list of changes to the input settings")
    args = parser.parse_args()
    pool, origin = sc.input_training_set(), sources()
    held_parts = sorted({s for s in origin.values() if s != "course"})
    blocklist = default_blocklist()

    def keyword(text: str) -> bool:
        return blocklist.check(text, "input") is not None

    base = sc.classifier_settings()["input"]
    print(f"{len(pool.texts)} development prompts; held out in turn: {', '.join(held_parts)}\n")
    print("| settings | blocked | false positives | en | zh-Hans | zh-Hant | per part | shortfall |\n"
          "|---|---|---|---|---|---|---|---|")
    for change in json.loads(args.grid):
        started, rows = time.perf_counter(), []
        for part in held_parts:
            train = [i for i, t in enumerate(pool.texts) if origin.get(t) != part]
            data = sc.TrainingSet([pool.texts[i] for i in train], [pool.labels[i] for i in train])
            classifier = sc.SafetyClassifier({**base, **change}, sc.encoder_available()).fit(data, keyword)
            rows += [(part, sc.language_group(t), label != sc.ALLOW, keyword(t) or classifier.score(t).blocked)
                     for t, label in zip(pool.texts, pool.labels) if origin.get(t) == part]
        blocked, false_positive = rates([(h, b) for _, _, h, b in rows])
        by_lang = [rates([(h, b) for _, g, h, b in rows if g == lang]) for lang in sc.LANGUAGE_GROUPS]
        by_part = [rates([(h, b) for p, _, h, b in rows if p == part]) for part in held_parts]
        shortfall = max(0.0, 0.95 - blocked) + max(0.0, false_positive - 0.05)
        cells = [f"{b:.0%} / {f:.0%}" for b, f in by_lang] + [", ".join(f"{b:.0%} / {f:.0%}" for b, f in by_part)]
        print(f"| {json.dumps(change)} | {blocked:.1%} | {false_positive:.1%} | " + " | ".join(cells)
              + f" | {shortfall:.1%} |  ({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
