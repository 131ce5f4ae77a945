"""``python -m course_utils``: every stage of the course as a subcommand, TAO-style.

Each subcommand loads the same config as the notebooks (``--spec``, ``--set key=value``), so a
hackathon team can script the pipeline without opening a notebook.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import yaml

from course_utils.core.config import ConfigError, CourseConfig, load_config


def _parse_sets(pairs: list[str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set expects key=value (for example train.epochs_head=1), got {pair!r}.")
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise ConfigError(f"--set {pair!r}: the value is not valid YAML ({' '.join(str(error).split())}); "
                              "quote strings, e.g. --set 'llm.model=\"name:tag\"'.") from None
    return overrides


def _config(args: argparse.Namespace) -> CourseConfig:
    return load_config(args.spec, _parse_sets(args.set))


def cmd_doctor(args: argparse.Namespace) -> int:
    from course_utils.doctor import doctor_report, format_doctor

    report = doctor_report(_config(args), probe_network=not args.no_network)
    print(json.dumps(report, indent=2, default=str) if args.json else format_doctor(report))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from course_utils.vision.data import DATASETS, resolve_dataset

    if args.list:
        for name, spec in DATASETS.items():
            print(f"{name:18} {spec.description}")
        return 0
    dataset = resolve_dataset(_config(args))
    print(json.dumps(dataset.summary(), indent=2))
    for converted in dataset.converted:
        print(f"converted {converted.path}: {converted.conversion}", file=sys.stderr)
    for skipped in dataset.skipped:
        print(f"skipped {skipped.path}: {skipped.reason}", file=sys.stderr)
    return 0


def cmd_run_all(args: argparse.Namespace) -> int:
    from course_utils.core.notebooks import run_all

    overrides = _parse_sets(args.set)  # every notebook gets them as OVERRIDES, as this config does
    run_all(load_config(args.spec, overrides), only=args.only, overrides=overrides)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from course_utils.core.ledger import Ledger
    from course_utils.core.report import load_run, write_comparison, write_report

    config = _config(args)
    out = Path(args.out) if args.out else config.workspace
    if args.compare:
        paths = write_comparison(load_run(Path(args.compare[0])), load_run(Path(args.compare[1])), out)
    else:
        paths = write_report(Ledger(config.workspace), out)
    for path in paths:
        print(path)
    return 0


def cmd_editions(args: argparse.Namespace) -> int:
    from pathlib import Path

    from course_utils.lessons.editions import EDITIONS, SOURCE_LANGUAGE, edition_dir
    from course_utils.lessons.translations import build_language_editions, translated_languages

    out = Path(args.out) if args.out else _config(args).workspace / "editions"
    for language in args.language or [SOURCE_LANGUAGE, *translated_languages()]:
        files, kept_english = build_language_editions(out, language)
        for edition in EDITIONS:
            print(f"{language:6} {edition:10} {edition_dir(out, language, edition)}")
        written = sum(file.written for file in files)
        print(f"{language:6} {written} notebook(s) written, {len(files) - written} unchanged")
        if kept_english:
            print(f"{language:6} {len(kept_english)} Markdown cell(s) kept in English, untranslated or stale: "
                  f"python -m course_utils translations {language} --english")
    print("The learner edition goes to learners, the instructor edition to instructors.")
    return 0


def cmd_translations(args: argparse.Namespace) -> int:
    from course_utils.lessons.translations import describe_issues, translated_languages, translation_issues

    to_fix = 0
    for language in args.language or translated_languages():
        issues = translation_issues(language)
        for line in describe_issues(issues, show_english=args.english):
            print(f"{language} {line}")
        cells = len({(issue.notebook, issue.cell_id) for issue in issues})
        hint = "" if args.english else " (--english shows their text and hash)"
        print(f"{language}: {cells} cell(s) to translate or fix{hint}" if issues
              else f"{language}: every Markdown cell of every notebook is translated, current and intact")
        to_fix += len(issues)
    return 1 if to_fix else 0


def cmd_zoo(args: argparse.Namespace) -> int:
    from course_utils.core.report import markdown_table
    from course_utils.vision.zoo import registry_table

    rows = registry_table(_config(args).workspace / "cache")
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(markdown_table(rows, ["name", "alias", "family", "year", "source", "input_size", "params",
                                    "imagenet_top1", "weights_local"]))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from course_utils.vision import distributed, finetune

    overrides = _parse_sets(args.set) | ({"train.gpus": args.gpus} if args.gpus is not None else {})
    config = load_config(args.spec, overrides)
    if config.train.gpus > 1:
        print(distributed.plan_launch(config.train.gpus).describe(config.train), file=sys.stderr, flush=True)
    result = finetune.run(config)
    print(json.dumps({"checkpoint": result.record.checkpoint.path, **result.record.metrics}, indent=2))
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from course_utils.vision import prune

    result = prune.run(_config(args))
    print(json.dumps(result.record.metrics, indent=2))
    print(f"ships: the {result.deployed.kind} model, because {result.deployed.reason}")
    return 0


def cmd_build_engine(args: argparse.Namespace) -> int:
    from course_utils.deploy import tensorrt_engines as te

    stage = te.run(_config(args), plan_for=args.plan_for, precisions=args.precisions)
    if stage.not_built_because:
        print(f"No engine built ({stage.not_built_because}): the plan for TensorRT {stage.target} on {stage.gpu.name}.\n")
    print(te.build_route(stage.target).explain() + "\n")
    print(te.plans_text(stage.plans))
    if stage.builds:
        print(json.dumps(stage.record.metrics, indent=2))
    return 0 if stage.built or args.plan_for else 1


def cmd_benchmark(args: argparse.Namespace) -> int:
    from course_utils.deploy import final_benchmark

    print(final_benchmark.run(_config(args)).markdown())
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from course_utils.deploy import onnx_export

    stage = onnx_export.run(_config(args), rebuild=args.rebuild)
    print(onnx_export.steps_markdown(stage.artifacts) + "\n")
    print(f"exported the {stage.deployed.kind} model ({stage.deployed.reason})")
    print(json.dumps(stage.record.metrics, indent=2))
    return 0


def cmd_jetson_kit(args: argparse.Namespace) -> int:
    from pathlib import Path

    from course_utils.core.report import markdown_table
    from course_utils.deploy import jetson_kit

    kit = jetson_kit.run(_config(args), out_dir=Path(args.out) if args.out else None)
    print(markdown_table(kit.routes_table()) + "\n")
    print(f"{'reused' if kit.reused else 'wrote'} {kit.folder}\narchive {kit.archive}\n"
          f"Copy it to the Jetson and follow its README.md (python3 trt_kit.py all).")
    return 0


def cmd_import_results(args: argparse.Namespace) -> int:
    from pathlib import Path

    from course_utils.core.report import markdown_table
    from course_utils.deploy import jetson_kit

    record = jetson_kit.import_results(_config(args), Path(args.file))
    print(markdown_table([{"runtime": key, **row} for key, row in record.metrics.items()]))
    print(f"saved as the ledger's device_run record: {record.device}")
    return 0


def cmd_prepare_demo(args: argparse.Namespace) -> int:
    from course_utils.app.demo import demo_manifest_path, prepare_demo

    config = _config(args)
    steps = prepare_demo(config, report=lambda s: print(f"{s.status:>8}  {s.name:<18} {s.seconds:7.1f} s  {s.detail}",
                                                  flush=True))
    print(f"Manifest: {demo_manifest_path(config)}")
    return 1 if any(step.status == "failed" for step in steps) else 0


def cmd_serve_app(args: argparse.Namespace) -> int:
    import subprocess

    from course_utils.app.server import serve_command, serve_environment, write_page

    config = _config(args)
    if args.host not in {"127.0.0.1", "localhost", "::1"}:
        print(f"warning: serving on {args.host}: anyone who can reach this machine can use the app.", file=sys.stderr)
    command = serve_command(write_page(config), args.host, args.port)
    print(f"Narrative Canvas on http://{args.host}:{args.port}/ (Ctrl-C stops it)", flush=True)
    try:
        return subprocess.call(command, env=serve_environment(config, _parse_sets(args.set)))
    except KeyboardInterrupt:
        return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from course_utils.deploy import ptq

    print(json.dumps(ptq.run(_config(args)).record.metrics, indent=2))
    return 0


def cmd_qat(args: argparse.Namespace) -> int:
    from course_utils.deploy import qat

    print(json.dumps(qat.run(_config(args)).metrics(), indent=2))
    return 0


def cmd_story(args: argparse.Namespace) -> int:
    from course_utils.genai.story import StoryOptions, storyteller

    config = _config(args)
    if args.redteam:
        return _story_redteam(config, args)
    if args.file or args.json:
        raise ConfigError("--file and --json go with --redteam: story --redteam [--file PATH] [--json].")
    options = StoryOptions(args.style, args.theme, args.length, args.language, args.instruction)
    stream = storyteller(config, args.rails).stream(args.labels, options)
    for chunk in stream:
        print(chunk, end="", flush=True)
    result = stream.result
    if result is None or result.blocked:
        print(f"\n[blocked by {result.blocked_by if result else '?'}] {result.message if result else ''}")
        return 3
    print(f"\n\nimage prompt: {result.image_prompt}\n[{result.rails} rails, {result.timings['total_s']:.1f} s, "
          f"{result.tokens_per_second:.0f} tokens/s, {result.endpoint}]")
    return 0


def _story_redteam(config: CourseConfig, args: argparse.Namespace) -> int:
    """Every rail configuration on a red-team file (``--file``), or on the dev and frozen test parts."""
    from pathlib import Path

    from course_utils.genai.safety_classifier import classifier_cache_dir
    from course_utils.genai.story import storyteller
    from course_utils.genai.story_rails import (
        evaluate_rails,
        load_redteam,
        load_redteam_parts,
        rail_configurations,
        redteam_markdown,
        safety_models,
    )

    loaded = ([(Path(args.file).name, load_redteam(Path(args.file), config.llm.redteam_sample, config.seed))]
              if args.file else list(load_redteam_parts(config).items()))
    teller = storyteller(config, "none")
    names = list(rail_configurations())
    ep = teller.endpoint if "self_check" in names else None
    safety, cache = safety_models(config), classifier_cache_dir(config)
    results = [evaluate_rails(name, items, ep, split=split, safety=safety, cache_dir=cache)
               for split, items in loaded for name in names]
    if args.json:
        for result in results:
            print(json.dumps(result.row(), ensure_ascii=False))
    else:
        print(redteam_markdown(results))
    return 0


def cmd_speak(args: argparse.Namespace) -> int:
    import shutil

    from course_utils.genai.speech import speak

    path = speak(args.text, _config(args))
    print(shutil.copyfile(path, args.out) if args.out else path)
    return 0


def cmd_transcribe(args: argparse.Namespace) -> int:
    from course_utils.genai.speech import transcribe

    transcript = transcribe(args.audio, _config(args))
    for note in transcript.notes:
        print(f"note: {note}", file=sys.stderr)
    print(transcript.text)
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "doctor": (cmd_doctor, "what this machine has and what the course can do on it"),
    "data": (cmd_data, "list the datasets, or fetch/verify/build the configured one"),
    "run-all": (cmd_run_all, "the main job: run every notebook headless and write the report"),
    "report": (cmd_report, "rebuild report.md/report.html from the results ledger, or compare two runs"),
    "editions": (cmd_editions, "write the learner and instructor editions of every notebook, in every language"),
    "translations": (cmd_translations, "list the untranslated, stale or mangled cells of each translated edition"),
    "speak": (cmd_speak, "read a text aloud into a WAV file (the offline voice, or NeMo when available)"),
    "transcribe": (cmd_transcribe, "turn speech in an audio file (WAV, FLAC, MP3, ...) into text"),
    "zoo": (cmd_zoo, "the pretrained model registry: names, sources, sizes, local weights"),
    "train": (cmd_train, "fine-tune the configured backbone on the configured dataset"),
    "prune": (cmd_prune, "structured pruning sweep, retraining, and the kept pruned model (workspace/models/pruned.pt)"),
    "export": (cmd_export, "export the deployed model to ONNX (dynamic batch), verify and optimize it"),
    "build-engine": (cmd_build_engine, "TensorRT FP32/FP16/INT8 engines from the optimized ONNX (or their plan)"),
    "benchmark": (cmd_benchmark, "the final benchmark: every runtime and precision that exists, side by side"),
    "quantize": (cmd_quantize, "INT8 post-training quantization: CPU models (ONNX Runtime) and Q/DQ for TensorRT"),
    "qat": (cmd_qat, "quantization-aware training with ModelOpt, exported as Q/DQ ONNX and checked in ONNX Runtime"),
    "jetson-kit": (cmd_jetson_kit, "the Jetson deploy kit: a folder and .tar.gz to build and measure engines on the device"),
    "import-results": (cmd_import_results, "merge a deploy kit's results.json (figures measured on a Jetson) into the ledger"),
    "prepare-demo": (cmd_prepare_demo, "build every artifact the Narrative Canvas app uses, ahead of a live demo"),
    "serve-app": (cmd_serve_app, "serve the Narrative Canvas app as a standalone page (Voila, localhost)"),
    "story": (cmd_story, "a guarded story from classifier labels (streamed), or the red-team table with --redteam"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m course_utils", description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--spec", default=None, help="spec name in data/specs or a YAML path (default: $COURSE_SPEC or default)")
    common.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting, e.g. --set train.epochs_head=1 (repeatable)")
    common.add_argument("--debug", action="store_true", help="show the full traceback of the course's own errors")
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
        elif name == "train":
            command.add_argument("--gpus", type=int, metavar="N",
                                 help="train on N GPUs with DDP, one process each (CPU processes over gloo without "
                                      "a GPU); sets train.gpus. $MASTER_PORT picks the rendezvous port")
        elif name == "export":
            command.add_argument("--rebuild", action="store_true", help="export again even if a valid export is cached")
        elif name == "build-engine":
            command.add_argument("--plan-for", metavar="VERSION",
                                 help="print the route and commands for this TensorRT version (e.g. 8.5.2) only")
            command.add_argument("--precisions", nargs="+", choices=["fp32", "fp16", "int8"], metavar="PRECISION",
                                 help="build only these of engine.precisions (fp32 fp16 int8; default: all); "
                                      "INT8 after `quantize`, which makes its Q/DQ ONNX")
        elif name == "jetson-kit":
            command.add_argument("--out", metavar="DIR", help="write the kit into DIR (default: workspace/jetson-kit)")
        elif name == "import-results":
            command.add_argument("file", help="the results.json that `python3 trt_kit.py all` wrote on the device")
        elif name == "serve-app":
            command.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
            command.add_argument("--port", type=int, default=8866, help="port (default 8866)")
        elif name == "story":
            command.add_argument("--labels", nargs="+", default=["tabby cat", "teapot"], help="what the story is about")
            command.add_argument("--style", default="fairy_tale", help="a style of data/story/catalog.yaml")
            command.add_argument("--theme", default="friendship", help="a theme of data/story/catalog.yaml")
            command.add_argument("--length", default="short", help="short, medium or long")
            command.add_argument("--language", default="en", help="en or zh")
            command.add_argument("--instruction", default="", help="your own idea for the story")
            command.add_argument("--rails", default=None, help="a configuration of data/story/rail_configs.yaml "
                                                               "(default: llm.rails)")
            command.add_argument("--redteam", action="store_true", help="score every rail configuration on the "
                                 "red-team set (dev and frozen test parts) instead of writing a story")
            command.add_argument("--file", help="with --redteam: your own red-team file (YAML like "
                                 "data/story/redteam.yaml, or JSON Lines with text and label block/allow)")
            command.add_argument("--json", action="store_true", help="with --redteam: one JSON row per configuration")
        elif name == "speak":
            command.add_argument("text", help="what to say")
            command.add_argument("--out", help="copy the WAV here (default: print its cached path)")
        elif name == "transcribe":
            command.add_argument("audio", help="an audio file")
        elif name == "report":
            command.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"),
                                 help="two runs side by side (compare.md/compare.html): each a workspace folder, or a "
                                      "folder holding a report.json such as workspace/runs/<timestamp>")
            command.add_argument("--out", metavar="DIR", help="write into DIR (default: the workspace)")
        elif name == "editions":
            command.add_argument("--out", metavar="DIR", help="write into DIR (default: workspace/editions)")
            command.add_argument("--language", nargs="*", help="only these languages (default: en and every "
                                 "language with files in notebooks/translations/)")
        elif name == "translations":
            command.add_argument("language", nargs="*", help="the languages to check (default: all), e.g. zh-CN")
            command.add_argument("--english", action="store_true",
                                 help="show each cell's English text and the source_sha256 to record")
        elif name == "run-all":
            command.add_argument("--only", nargs="*", help="run only notebooks whose names start with these prefixes")
    return parser


def main(argv: list[str] | None = None) -> int:
    from course_utils.core.errors import CourseError
    from course_utils.core.lazy import as_missing_dependency

    args = build_parser().parse_args(argv)
    try:
        try:
            return args.func(args)
        except ModuleNotFoundError as missing:  # an optional stack not installed: name its extra
            raise as_missing_dependency(missing) or missing
    except CourseError as error:  # a problem the user can fix: its message alone (any other error is a bug)
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
