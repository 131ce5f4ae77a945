"""Story rails on held-out prompts: dev vs frozen test per configuration, category and language; output rails;
labels; rails latency.

Scores every local rail configuration (no LLM needed; ``self_check`` is in benchmarks/story.py) on the
development part (``data/story/redteam.yaml``, what the rules and the classifier were tuned on) and on the
frozen test parts (``redteam_test.yaml``, never tuned on; ``redteam_test2.yaml``, written after the first was
scored once). For the learned classifier the honest development
figure is out of fold (5-fold, the classifier never saw the prompt it scores): printed as ``guarded
(dev, out of fold)``. Then the output rails on labeled story passages, the share of ImageNet's 1000 class
names the input rails drop when used as labels, and the rails' p50 latency per prompt (NeMo input + dialog
rails, this machine's cores). With an NVIDIA key in $NVIDIA_API_KEY the ``nemoguard`` configuration runs too.

    .venv/bin/python benchmarks/rails.py [--spec default] [--configurations deterministic guarded]
"""

from __future__ import annotations

import argparse
import os
import time

from course_utils.core.config import load_config
from course_utils.core.report import markdown_table
from course_utils.genai.safety_classifier import classifier_cache_dir, default_classifier
from course_utils.genai.story_rails import (
    OUTPUT_DEV_FILE,
    OUTPUT_TEST_FILE,
    REDTEAM_FILE,
    REDTEAM_TEST2_FILE,
    REDTEAM_TEST_FILE,
    RedTeamResult,
    Verdict,
    default_blocklist,
    evaluate_output_rails,
    evaluate_rails,
    load_passages,
    load_redteam,
    output_markdown,
    redteam_markdown,
    safety_models,
)


def out_of_fold(items: list, cache: object) -> RedTeamResult:
    """The guarded input rails on dev without the dialog rails, the classifier scored out of fold."""
    classifier = default_classifier("input", cache)  # type: ignore[arg-type]
    blocklist = default_blocklist()
    verdicts = [Verdict(blocklist.check(i.text) is not None or score > classifier.threshold)
                for i, score in zip(items, classifier.oof_scores)]
    return RedTeamResult("guarded (dev, out of fold)", items, verdicts, [], split="dev")


def imagenet_labels() -> list[str]:
    """ImageNet's 1000 class names (offline, from torchvision's weights metadata)."""
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="default")
    parser.add_argument("--splits", nargs="+", default=["dev", "test", "test2"])
    parser.add_argument("--configurations", nargs="+", default=["deterministic", "semantic", "guarded", "nemoguard"])
    args = parser.parse_args()
    config = load_config(args.spec)
    cache, safety = classifier_cache_dir(config), safety_models(config)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    started = time.perf_counter()
    for source in ("input", "output"):
        print(f"{source} classifier: {default_classifier(source, cache).describe()}")
    print(f"classifiers trained or loaded in {time.perf_counter() - started:.1f} s\n")

    dev = load_redteam(REDTEAM_FILE)
    parts = {"dev": dev, "test": load_redteam(REDTEAM_TEST_FILE), "test2": load_redteam(REDTEAM_TEST2_FILE)}
    results = [out_of_fold(dev, cache)]
    for name in args.configurations:
        for split, items in ((s, parts[s]) for s in args.splits):
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
    outputs = [evaluate_output_rails(name, load_passages(path), split=split, safety=safety, cache_dir=cache)
               for name in args.configurations if name != "nemoguard" or safety is not None
               for split, path in (("dev", OUTPUT_DEV_FILE), ("test", OUTPUT_TEST_FILE))]
    print(output_markdown(outputs) + "\n")

    print("## Labels: ImageNet's class names through the input rails (as a folder of photos would be)\n")
    labels = imagenet_labels()
    label_items = [type(dev[0])(label, False, "label") for label in labels]
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
