"""``python -m course_utils``: every stage of the course as a subcommand, TAO-style.

Each subcommand loads the same config as the notebooks (``--spec``, ``--set key=value``), so a
hackathon team can script the pipeline without opening a notebook.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

import yaml

from course_utils.config import ConfigError, CourseConfig, load_config


def _parse_sets(pairs: list[str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set expects key=value (for example train.epochs_head=1), got {pair!r}.")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def _config(args: argparse.Namespace) -> CourseConfig:
    return load_config(args.spec, _parse_sets(args.set))


def cmd_doctor(args: argparse.Namespace) -> int:
    from course_utils.doctor import doctor_report, format_doctor

    report = doctor_report(_config(args), probe_network=not args.no_network)
    print(json.dumps(report, indent=2, default=str) if args.json else format_doctor(report))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from course_utils.data import DATASETS, resolve_dataset

    if args.list:
        for name, spec in DATASETS.items():
            print(f"{name:18} {spec.description}")
        return 0
    dataset = resolve_dataset(_config(args))
    print(json.dumps(dataset.summary(), indent=2))
    for skipped in dataset.skipped:
        print(f"skipped {skipped.path}: {skipped.reason}", file=sys.stderr)
    return 0


def cmd_run_all(args: argparse.Namespace) -> int:
    from course_utils.notebooks import run_all

    run_all(_config(args), only=args.only)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from course_utils.ledger import Ledger
    from course_utils.report import write_report

    config = _config(args)
    for path in write_report(Ledger(config.workspace).read(), config.workspace):
        print(path)
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    from course_utils.report import markdown_table
    from course_utils.zoo import registry_table

    rows = registry_table(_config(args).workspace / "cache")
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(markdown_table(rows, ["name", "alias", "family", "year", "source", "input_size", "params",
                                    "imagenet_top1", "weights_local"]))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from course_utils.data import resolve_dataset
    from course_utils.finetune import models_dir, summary, train_classifier
    from course_utils.ledger import Ledger
    from course_utils.zoo import save_classifier

    config = _config(args)
    dataset = resolve_dataset(config)
    model, result, evaluation = train_classifier(config, dataset)
    saved = save_classifier(model, models_dir(config) / "finetuned.pt")
    metrics = {**summary(model, result, evaluation, dataset), "checkpoint": str(saved)}
    Ledger(config.workspace).record("finetune", metrics)
    print(json.dumps(metrics, indent=2))
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "doctor": (cmd_doctor, "what this machine has and what the course can do on it"),
    "data": (cmd_data, "list the datasets, or fetch/verify/build the configured one"),
    "run-all": (cmd_run_all, "the main job: run every notebook headless and write the report"),
    "report": (cmd_report, "rebuild report.md/report.html from the results ledger"),
    "zoo": (cmd_zoo, "the pretrained model registry: names, sources, sizes, local weights"),
    "train": (cmd_train, "fine-tune the configured backbone on the configured dataset"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m course_utils", description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--spec", default=None, help="spec name in data/specs or a YAML path (default: $COURSE_SPEC or default)")
    common.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting, e.g. --set train.epochs_head=1 (repeatable)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (func, help_text) in COMMANDS.items():
        command = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        command.set_defaults(func=func)
        if name in {"doctor", "zoo"}:
            command.add_argument("--json", action="store_true", help="print as JSON")
        if name == "doctor":
            command.add_argument("--no-network", action="store_true", help="skip the online check")
        elif name == "data":
            command.add_argument("--list", action="store_true", help="list the registry")
        elif name == "run-all":
            command.add_argument("--only", nargs="*", help="run only notebooks whose names start with these prefixes")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
