"""Instructor demo mode: build every artifact the app uses ahead of a live demo (``prepare-demo``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from course_utils.app.canvas import explain
from course_utils.app.catalog import (
    _cached_model_choices,
    _engines,
    _onnx_fp32_path,
    finetuned_path,
    model_choices,
)
from course_utils.core.config import CourseConfig

LOG = logging.getLogger(__name__)


# --- Instructor demo mode: build everything ahead of time ---------------------------------------------------


@dataclass
class DemoStep:
    """One artifact ``prepare_demo`` made sure of: ``ready`` (already there), ``built``, ``skipped`` or ``failed``."""

    name: str
    status: str
    seconds: float
    detail: str


def _prepare_finetuned(config: CourseConfig, build: bool) -> tuple[str, str]:
    if finetuned_path(config).exists():
        return "ready", str(finetuned_path(config))
    if not build:
        return "missing", "fine-tunes the configured backbone (notebook 02)"
    from course_utils.core.ledger import Ledger
    from course_utils.vision.data import resolve_dataset
    from course_utils.vision.finetune import summary, train_classifier
    from course_utils.vision.zoo import save_classifier

    dataset = resolve_dataset(config)
    model, result, evaluation = train_classifier(config, dataset)
    save_classifier(model, finetuned_path(config))
    Ledger(config.workspace).record("finetune", {**summary(model, result, evaluation, dataset),
                                                 "checkpoint": str(finetuned_path(config))})
    return "built", f"val top-1 {evaluation.top1:.1%}"


def _prepare_onnx(config: CourseConfig, build: bool) -> tuple[str, str]:
    if (path := _onnx_fp32_path(config)) is not None:
        return "ready", str(path)
    if not build:
        return "missing", "exports and optimizes the ONNX model (notebook 04)"
    from course_utils.deploy.tensorrt_engines import course_onnx_model

    return "built", str(course_onnx_model(config).path)


def _prepare_int8(config: CourseConfig, build: bool) -> tuple[str, str]:
    from course_utils.deploy.runtimes import ptq_cpu_model

    if (path := ptq_cpu_model(config.workspace)) is not None:
        return "ready", str(path)
    if not build:
        return "missing", "calibrates and measures the INT8 models (notebook 06)"
    from course_utils.deploy.ptq import run_ptq

    metrics = run_ptq(config)
    return "built", f"{metrics['best_cpu_variant']}: {metrics['best_cpu_model_path']}"


def _prepare_engines(config: CourseConfig, build: bool) -> tuple[str, str]:
    from course_utils.core.environment import tensorrt_version
    from course_utils.deploy.tensorrt_engines import detect_gpu

    if tensorrt_version() is None or detect_gpu() is None:
        return "skipped", "no TensorRT and GPU here: the app offers PyTorch and ONNX Runtime"
    if (onnx := _onnx_fp32_path(config)) is not None and _engines(config, onnx):
        return "ready", ", ".join(str(path) for path in _engines(config, onnx).values())
    if not build:
        return "missing", "builds the TensorRT engines (notebook 05)"
    from course_utils.deploy.tensorrt_engines import build_course_engines, course_onnx_model
    from course_utils.vision.data import resolve_dataset
    from course_utils.vision.zoo import entry

    builds = build_course_engines(config, resolve_dataset(config), course_onnx_model(config),
                                  entry(config.model.backbone).preprocessing.eval_transform())
    return "built", ", ".join(f"{precision}: {'ok' if not isinstance(made, Exception) else made}"
                              for precision, made in builds.items())


def _prepare_picture(config: CourseConfig, build: bool) -> tuple[str, str]:
    from course_utils.genai.imagegen import is_tiny_random, load_generator, resolve_model, tiny_pipeline_dir

    if not build:
        if Path(config.imagegen.model).is_dir() or is_tiny_random(tiny_pipeline_dir(config)):
            return "ready", "on disk (loaded with the first picture)"
        return "missing", f"resolves {config.imagegen.model} (download online, tiny random pipeline offline)"
    generator = load_generator(config, resolve_model(config))
    generation = generator.generate("a test picture", steps=1, size=64)
    weights = "real weights" if generator.source.real_weights else "RANDOM weights: pictures are noise"
    return "ready", f"{generator.source.name} ({weights}); a 1-step 64 px test in {generation.seconds:.2f} s"


def _prepare_story(config: CourseConfig, build: bool) -> tuple[str, str]:
    if not build:
        return "unchecked", (f"prepare-demo starts or reaches the {config.llm.provider} LLM and builds the "
                             f"{config.llm.rails} rails")
    from course_utils.genai.llm import check_endpoint
    from course_utils.genai.story import storyteller

    teller = storyteller(config).warm_up()
    return "ready", f"{teller.endpoint.describe()} answered in {check_endpoint(teller.endpoint):.1f} s"


def _prepare_app(config: CourseConfig, build: bool) -> tuple[str, str]:
    if not build:
        return ("ready", "cached") if _cached_model_choices(config) is not None else \
            ("missing", "caches the app's model list, so the page starts without importing PyTorch")
    return "ready", ", ".join(choice.label for choice in model_choices(config))


PREPARE_STEPS: dict[str, Callable[[CourseConfig, bool], tuple[str, str]]] = {
    "fine-tuned model": _prepare_finetuned,
    "ONNX export": _prepare_onnx,
    "INT8 calibration": _prepare_int8,
    "TensorRT engines": _prepare_engines,
    "picture model": _prepare_picture,
    "story model": _prepare_story,
    "app model list": _prepare_app,
}


def demo_manifest_path(config: CourseConfig) -> Path:
    """Where ``prepare_demo`` writes what it found and built: ``<workspace>/app/demo.json``."""
    return config.workspace / "app" / "demo.json"


def prepare_demo(config: CourseConfig, build: bool = True,
                 report: Callable[[DemoStep], None] = lambda step: None) -> list[DemoStep]:
    """Build every artifact the app can use, ahead of a live demo, so nothing trains or calibrates on stage.

    Each step reuses what is valid and builds what is missing; a failing step is reported and the
    others still run; the outcome goes to ``demo_manifest_path(config)``. ``build=False`` only looks:
    each step says ``ready``, ``missing`` (and what it would do) or ``skipped``.
    """
    from course_utils.core.atomic import write_json_atomic

    steps = []
    for name, prepare in PREPARE_STEPS.items():
        started = time.perf_counter()
        try:
            status, detail = prepare(config, build)
        except Exception as error:
            LOG.exception("prepare-demo: %s failed", name)
            status, detail = "failed", explain(error)
        steps.append(DemoStep(name, status, round(time.perf_counter() - started, 2), detail))
        report(steps[-1])
    if build:
        write_json_atomic(demo_manifest_path(config), {"spec": config.spec, "steps": [vars(s) for s in steps]})
    return steps
