"""Story rails on held-out prompts: dev (out of fold) vs the frozen test part per configuration, category and
language; output rails; labels; rails latency.

Scores every local rail configuration (no LLM needed; ``self_check`` is in benchmarks/story.py) on the
development part (``data/story/redteam.yaml``, what the rules and the classifier were tuned on, six retired
test parts included) and on the frozen test part (``redteam_test7.yaml``, written by an author who never saw
the rules, opened after the rails were frozen). For the learned classifier the honest development figure is
out of fold (5 folds, the classifier never saw the prompt it scores): ``guarded (out of fold)``; ``guarded``
on dev is in-sample and means nothing (benchmarks/rails_select.py holds out whole retired parts instead).
Then the output rails on labeled story passages, the share of ImageNet's 1000 class names the input rails
drop when used as labels, and the rails' p50 latency per prompt (NeMo input + dialog rails, this machine's
cores). With an NVIDIA key in $NVIDIA_API_KEY the ``nemoguard`` configuration runs too.

    .venv/bin/python benchmarks/rails.py [--spec default] [--splits dev test] [--no-labels]
"""

from __future__ import annotations

import argparse
import os
import time

from course_utils.core.config import load_config
from course_utils.core.report import markdown_table
from course_utils.genai.safety_classifier import classifier_cache_dir, default_classifier
from course_utils.genai.story_rails import (
    RedTeamItem,
    evaluate_output_rails,
    evaluate_rails,
    load_passages,
    load_redteam,
    out_of_fold,
    output_markdown,
    output_parts,
    redteam_markdown,
    redteam_parts,
    safety_models,
)


def imagenet_labels() -> list[str]:
    """ImageNet's 1000 class names (offline, from torchvision's weights metadata)."""
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="default")
    parser.add_argument("--splits", nargs="+", default=list(redteam_parts()), choices=list(redteam_parts()))
    parser.add_argument("--configurations", nargs="+", default=["deterministic", "semantic", "guarded", "nemoguard"])
    parser.add_argument("--no-labels", action="store_true", help="skip the ImageNet class names")
    args = parser.parse_args()
    config = load_config(args.spec)
    cache, safety = classifier_cache_dir(config), safety_models(config)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    started = time.perf_counter()
    for source in ("input", "output"):
        print(f"{source} classifier: {default_classifier(source, cache).describe()}")
    print(f"classifiers trained or loaded in {time.perf_counter() - started:.1f} s\n")

    parts = {split: load_redteam(path) for split, path in redteam_parts().items() if split in args.splits}
    results = [out_of_fold(parts["dev"], cache)] if "dev" in parts else []
    for name in args.configurations:
        for split, items in parts.items():
            results.append(evaluate_rails(name, items, split=split, safety=safety, cache_dir=cache))
    print("## Input and dialog rails: blocked adversarial prompts, false positives on benign ones\n")
    print(redteam_markdown(results) + "\n")
    tested = [r for r in results if r.split.startswith("test") and not r.skipped]
    print("## False positives by the harm a benign test prompt brushes against\n")
    print(markdown_table([{"configuration": r.configuration, "split": r.split, **{k: f"{v:.0%}" for k, v in
                                                                 r.false_positives_by_category.items()}}
                          for r in tested]) + "\n")
    for r in tested:
        print(f"### {r.configuration} on {r.split}: missed {len(r.misses())}, false positives {len(r.false_positives())}")
        for item in r.misses():
            print(f"- missed [{item.category}, {item.lang}, {','.join(item.tags) or '-'}] {item.text}")
        for item, verdict in r.false_positives():
            print(f"- blocked [benign {item.category}, {item.lang}] {item.text} <- {verdict.rail}")
        print()

    print("## Output rails on labeled story passages\n")
    passages = output_parts()
    outputs = [evaluate_output_rails(name, load_passages(path), split=split, safety=safety, cache_dir=cache)
               for name in args.configurations if name != "nemoguard" or safety is not None
               for split, path in passages.items()]
    print(output_markdown(outputs) + "\n")
    if args.no_labels:
        return

    print("## Labels: ImageNet's class names through the input rails (as a folder of photos would be)\n")
    labels = imagenet_labels()
    label_items = [RedTeamItem(label, False, "label") for label in labels]
    for name in args.configurations:
        result = evaluate_rails(name, label_items, split="imagenet labels", safety=safety, cache_dir=cache,
                                stages=("input",))  # labels go through the input rails only (StoryTeller.screen)
        if result.skipped:
            continue
        dropped = [i.text for i, _ in result.false_positives()]
        print(f"- {name}: {len(dropped)} of {len(labels)} dropped ({len(dropped) / len(labels):.1%}): "
              f"{', '.join(dropped[:40])}{' …' if len(dropped) > 40 else ''}")


if __name__ == "__main__":
    main()
