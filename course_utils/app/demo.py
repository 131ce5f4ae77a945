"""Instructor demo mode: build every artifact the app uses ahead of a live demo (``prepare-demo``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from course_utils.app.canvas import explain
from course_utils.app.catalog import model_choices, model_list_cached
from course_utils.core.artifacts import FinetuneRecord, MissingArtifactError, PtqRecord, StaleArtifactError
from course_utils.core.config import CourseConfig
from course_utils.core.ledger import Ledger

LOG = logging.getLogger(__name__)


# --- Instructor demo mode: build everything ahead of time ---------------------------------------------------


@dataclass
class DemoStep:
    """One artifact ``prepare_demo`` made sure of or looked at.

    ``status`` is ``ready`` (already there), ``built``, ``skipped`` (not for this machine), ``failed``, or,
    when only looking (``build=False``), ``missing`` (``detail`` says what building would do) or
    ``unchecked`` (the story model, which only a build reaches).
    """

    name: str
    status: str
    seconds: float
    detail: str


def _stage_step(ready: Callable[[CourseConfig], str], make: Callable[[CourseConfig], str],
                what: str) -> Callable[[CourseConfig, bool], tuple[str, str]]:
    """A prepare step over a pipeline stage: ``ready`` when its valid artifact exists, else its stage's ``run``."""

    def prepare(config: CourseConfig, build: bool) -> tuple[str, str]:
        try:
            return "ready", ready(config)
        except (MissingArtifactError, StaleArtifactError) as why:
            if not build:
                return "missing", f"{what}: {why}"
        return "built", make(config)

    return prepare


def _finetuned_ready(config: CourseConfig) -> str:
    return Ledger(config.workspace).require(FinetuneRecord).checkpoint.path


def _finetune(config: CourseConfig) -> str:
    from course_utils.vision import finetune

    return f"val top-1 {finetune.run(config).evaluation.top1:.1%}"


def _onnx_ready(config: CourseConfig) -> str:
    from course_utils.deploy.tensorrt_engines import onnx_model

    return onnx_model(config).path.name


def _export(config: CourseConfig) -> str:
    from course_utils.deploy import onnx_export

    stage = onnx_export.run(config)
    return f"{stage.record.optimized.name} from the {stage.deployed.kind} model ({stage.deployed.reason})"


def _int8_ready(config: CourseConfig) -> str:
    from course_utils.deploy.tensorrt_engines import onnx_model

    record = Ledger(config.workspace).require(PtqRecord, made_from={"onnx": onnx_model(config).sha256})
    return record.cpu_int8.name if record.cpu_int8 else "no CPU INT8 model"


def _quantize(config: CourseConfig) -> str:
    from course_utils.deploy import ptq

    return f"best CPU INT8: {ptq.run(config).record.metrics['best_cpu_variant']}"


def _engines_ready(config: CourseConfig) -> str:
    from course_utils.deploy.tensorrt_engines import engines_here, onnx_model, wanted_precisions

    engines = engines_here(config, onnx_model(config))
    if missing := [precision for precision in wanted_precisions(config) if precision not in engines]:
        # notebook 05 builds FP32/FP16 and notebook 06 INT8: the demo needs every configured precision
        raise MissingArtifactError(f"no {'/'.join(missing)} engine is built for this ONNX model on this GPU and "
                                   "TensorRT yet")
    return ", ".join(path.name for path in engines.values())


def _build_engines(config: CourseConfig) -> str:
    from course_utils.deploy import tensorrt_engines

    builds = tensorrt_engines.run(config).builds
    return ", ".join(f"{precision}: {'ok' if not isinstance(made, Exception) else made}"
                     for precision, made in builds.items())


def _prepare_engines(config: CourseConfig, build: bool) -> tuple[str, str]:
    from course_utils.core.environment import tensorrt_version
    from course_utils.deploy.tensorrt_engines import detect_gpu

    if tensorrt_version() is None or detect_gpu() is None:
        return "skipped", "no TensorRT and GPU here: the app offers PyTorch and ONNX Runtime"
    return _stage_step(_engines_ready, _build_engines,
                       "builds the TensorRT engines (FP32/FP16: notebook 05, INT8: notebook 06)")(config, build)


def _kit_ready(config: CourseConfig) -> str:
    from course_utils.deploy import jetson_kit

    if (kit := jetson_kit.existing_kit(config)) is None:
        raise MissingArtifactError("no deploy kit for the current ONNX model and settings yet")
    return kit.archive.name


def _make_kit(config: CourseConfig) -> str:
    from course_utils.deploy import jetson_kit

    kit = jetson_kit.run(config)
    return f"{kit.archive.name}: copy it to a Jetson and follow its README.md"


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
        return ("ready", "cached") if model_list_cached(config) else \
            ("missing", "caches the app's model list, so the page starts without importing PyTorch")
    return "ready", ", ".join(choice.label for choice in model_choices(config))


PREPARE_STEPS: dict[str, Callable[[CourseConfig, bool], tuple[str, str]]] = {
    "fine-tuned model": _stage_step(_finetuned_ready, _finetune, "fine-tunes the configured backbone (notebook 02)"),
    "ONNX export": _stage_step(_onnx_ready, _export, "exports and optimizes the deployed model (notebook 04)"),
    "INT8 calibration": _stage_step(_int8_ready, _quantize, "calibrates and measures the INT8 models (notebook 06)"),
    "TensorRT engines": _prepare_engines,
    "Jetson deploy kit": _stage_step(_kit_ready, _make_kit, "writes the deploy kit for a Jetson (notebook 05)"),
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
    each step says ``ready``, ``missing`` (and what it would do), ``skipped`` or ``unchecked``.
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
