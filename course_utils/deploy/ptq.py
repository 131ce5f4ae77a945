"""INT8 post-training quantization (PTQ) of the course's FP32 ONNX: one INT8 model per runtime, measured.

An INT8 model is made *for a runtime*. ONNX Runtime on an x86 CPU has fast integer kernels only for
unsigned 8-bit activations with signed 8-bit weights (U8S8), so the CPU models come from ONNX
Runtime's ``quantize_static`` with U8 activations. TensorRT wants symmetric signed 8-bit Q/DQ pairs
(S8S8, zero point 0), which NVIDIA ModelOpt's ONNX PTQ makes; on ONNX Runtime's CPU kernels that
same model runs *slower* than FP32. The course makes both, plus a TensorRT-style S8S8 model from
ONNX Runtime, and measures all of them on the same validation images and the same CPU.

Every INT8 file is cached in ``<workspace>/int8`` under a name and a sidecar keyed by the FP32
model's hash, the recipe, the calibration set's hash and the tool versions: a rerun reuses what is
still valid and rebuilds what is stale.

The FP32 model is the ONNX stage's optimized export of the model that ships (``course_fp32_onnx``; nothing
is exported here). ``run(config)`` is the stage in one call (``python -m course_utils quantize`` and
``prepare-demo``); notebook 06 teaches the same steps cell by cell. Both end with ``save_record``, which saves
the ``PtqRecord``: the best CPU INT8 model and the TensorRT Q/DQ model, made from the FP32 ONNX's hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from course_utils.core.artifacts import PtqRecord
from course_utils.core.atomic import atomic_path
from course_utils.core.config import CourseConfig, QuantConfig
from course_utils.core.environment import package_version
from course_utils.core.errors import CourseError
from course_utils.core.lazy import lazy_import
from course_utils.core.sealed_cache import cache_state, seal, sidecar
from course_utils.deploy.calibration import (
    CALIBRATORS,
    CalibrationCacheKey,
    CalibrationSet,
    Calibrator,
    calibration_cache_path,
)
from course_utils.deploy.tensorrt_engines import OnnxModel

Tool = Literal["onnxruntime", "modelopt"]
ARTIFACT_FORMAT = 1  # bump when the way an INT8 file is made changes in a way its key cannot see
ORT_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
MODELOPT_METHODS = ("max", "entropy")
LATENCY_BATCHES = (1, 8)


class QuantizationError(CourseError, RuntimeError):
    """A quantization that cannot run as asked; the message says what to do."""


Prepare = Literal["none", "ort-preprocess", "ort-optimized", "onnxslim"]


@dataclass(frozen=True)
class Recipe:
    """How one INT8 variant is made: the tool, its calibration method, the activation type, the runtime it is for.

    Weights are signed 8-bit, per output channel unless ``per_channel=False`` (one scale per tensor).
    ``high_precision``: the float type ModelOpt leaves between its Q/DQ pairs. FP32 runs on ONNX Runtime's CPU
    kernels and on weakly typed TensorRT (whose FP16 flag lowers it); strongly typed TensorRT 11 runs a layer
    in its tensors' type, so it gets an FP16 copy.

    ONNX Runtime only: ``quant_format`` (Q/DQ pairs, or QOperator's ``QLinearConv`` nodes), ``reduce_range``
    (7-bit weights, for CPUs without VNNI), ``prepare`` (a graph rewrite before quantizing: ONNX Runtime's
    ``quant_pre_process``, its own optimized model, or onnxslim), ``keep_fp32`` (node names left in FP32:
    ``nodes_to_exclude``, chosen from a per-layer profile by ``layers_to_keep_fp32``) and ``extra`` (more
    ``extra_options`` of ``quantize_static``, as ``(name, value)`` pairs).
    """

    tool: Tool
    method: str
    activations: Literal["u8", "s8"] = "u8"
    target: Literal["cpu", "tensorrt"] = "cpu"
    high_precision: Literal["fp32", "fp16"] = "fp32"
    per_channel: bool = True
    quant_format: Literal["qdq", "qoperator"] = "qdq"
    reduce_range: bool = False
    prepare: Prepare = "none"
    keep_fp32: tuple[str, ...] = ()
    extra: tuple[tuple[str, bool | int | float | str], ...] = ()
    label: str = ""  # a short name for ``keep_fp32``'s selection, e.g. "slow" or "depthwise"

    def __post_init__(self) -> None:
        methods = ORT_METHODS if self.tool == "onnxruntime" else MODELOPT_METHODS
        if self.method not in methods:
            raise QuantizationError(f"{self.tool} has no calibration method {self.method!r}: "
                                    f"choose {', '.join(methods)}.")
        if self.tool == "modelopt" and (self.activations, self.target) != ("s8", "tensorrt"):
            raise QuantizationError("ModelOpt's ONNX PTQ makes symmetric S8 Q/DQ for TensorRT only.")
        if self.tool == "onnxruntime" and self.high_precision != "fp32":
            raise QuantizationError("ONNX Runtime's quantize_static keeps FP32 between Q/DQ pairs; FP16 is ModelOpt's.")
        ort_only = (not self.per_channel, self.quant_format != "qdq", self.reduce_range, self.prepare != "none",
                    bool(self.keep_fp32), bool(self.extra))
        if self.tool == "modelopt" and any(ort_only):
            raise QuantizationError("per_channel, quant_format, reduce_range, prepare, keep_fp32 and extra are "
                                    "options of ONNX Runtime's quantize_static: leave them at their defaults for "
                                    "ModelOpt.")
        if self.keep_fp32 and not self.label:
            raise QuantizationError("Name the layers kept in FP32 with label= (e.g. label='slow'): it goes into the "
                                    "recipe's name.")

    @property
    def name(self) -> str:
        """``ort-u8s8-minmax``, ``ort-s8s8-minmax``, ``modelopt-entropy``, ``modelopt-entropy-fp16``; ONNX Runtime
        options that differ from the defaults add a suffix each (``-per-tensor``, ``-qop``, ``-fp32-slow5``...)."""
        if self.tool != "onnxruntime":
            return f"modelopt-{self.method}" + ("-fp16" if self.high_precision == "fp16" else "")
        suffixes = [
            "per-tensor" if not self.per_channel else "", "qop" if self.quant_format == "qoperator" else "",
            "reduce-range" if self.reduce_range else "", self.prepare if self.prepare != "none" else "",
            f"fp32-{self.label}{len(self.keep_fp32)}" if self.keep_fp32 else "",
            *(f"{key}={value}" for key, value in self.extra)]
        return "-".join([f"ort-{self.activations}s8-{self.method}", *filter(None, suffixes)])


def course_recipes(quant: QuantConfig) -> list[Recipe]:
    """The CPU models (U8S8, each configured method), ONNX Runtime's TensorRT-style S8S8 (symmetric, zero point 0)
    for contrast, and ModelOpt's Q/DQ for TensorRT (max, entropy)."""
    cpu = [Recipe("onnxruntime", method) for method in quant.methods]
    contrast = Recipe("onnxruntime", quant.methods[0], "s8", "tensorrt")  # TensorRT-style S8S8, run on the CPU
    return cpu + [contrast] + [Recipe("modelopt", method, "s8", "tensorrt") for method in MODELOPT_METHODS]


def tool_versions(tool: Tool) -> dict[str, str | None]:
    """The versions an INT8 file made by ``tool`` depends on."""
    names = ["onnx", "onnxruntime"] + (["modelopt"] if tool == "modelopt" else [])
    return {name: package_version(name) for name in names}


def artifact_key(model: OnnxModel, recipe: Recipe, calibration: CalibrationSet) -> dict[str, Any]:
    """Everything an INT8 file depends on: a change in any of it means a rebuild."""
    return {"format": ARTIFACT_FORMAT, "model_sha256": model.sha256, "recipe": asdict(recipe),
            "calibration_sha256": calibration.sha256, "calibration_images": len(calibration),
            "batch_size": calibration.batch_size, "seed": calibration.seed, "versions": tool_versions(recipe.tool)}


def key_digest(key: dict[str, Any]) -> str:
    """A short, stable hash of a key, for file names."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def reusable(path: Path, key: dict[str, Any]) -> bool:
    """True when ``path`` exists and its sidecar records ``key`` and the file's current hash."""
    return cache_state(path, key) == "valid"


def build_or_reuse(path: Path, key: dict[str, Any], make: Callable[[Path], None], force: bool = False) -> bool:
    """Reuse ``path`` when its sidecar matches ``key``; else ``make(tmp)`` writes it atomically. True if reused."""
    if not force and reusable(path, key):
        return True
    sidecar(path).unlink(missing_ok=True)
    with atomic_path(path) as tmp:
        make(tmp)
    seal(path, key)
    return False


def int8_dir(config: CourseConfig) -> Path:
    """Where the INT8 models of notebooks 06 and 07 live."""
    return config.workspace / "int8"


@contextlib.contextmanager
def quiet_quantizers() -> Iterator[None]:
    """Silence the quantizers' chatter: ONNX Runtime logs every bias scale it adjusts and prints progress,
    ModelOpt draws progress bars and reports the GPU it cannot find. Failures still raise."""
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


@dataclass(frozen=True)
class Int8Model:
    """An INT8 ONNX on disk: its recipe, how many images calibrated it, how long it took, whether it was reused."""

    recipe: Recipe
    path: Path
    calibration_images: int
    seconds: float
    reused: bool


def quantize(model: OnnxModel, recipe: Recipe, calibration: CalibrationSet, folder: Path,
             force: bool = False) -> Int8Model:
    """Make (or reuse) the INT8 ONNX of ``model`` for ``recipe``, calibrated on ``calibration``."""
    key = artifact_key(model, recipe, calibration)
    path = Path(folder) / f"{model.sha256[:12]}_{recipe.name}_{key_digest(key)}.onnx"
    make = _quantize_onnxruntime if recipe.tool == "onnxruntime" else _quantize_modelopt
    started = time.perf_counter()
    with quiet_quantizers():
        reused = build_or_reuse(path, key, lambda out: make(model, recipe, calibration, out), force)
    return Int8Model(recipe, path, len(calibration), time.perf_counter() - started, reused)


def _quantize_onnxruntime(model: OnnxModel, recipe: Recipe, calibration: CalibrationSet, output: Path) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".prepare-") as work:
        source = prepare_fp32(model.path, recipe.prepare, Path(work) / "prepared.onnx")
        quantize_static(
            str(source), str(output), calibration.onnxruntime_reader(),
            quant_format=QuantFormat.QDQ if recipe.quant_format == "qdq" else QuantFormat.QOperator,
            activation_type=QuantType.QUInt8 if recipe.activations == "u8" else QuantType.QInt8,
            weight_type=QuantType.QInt8, per_channel=recipe.per_channel, reduce_range=recipe.reduce_range,
            nodes_to_exclude=list(recipe.keep_fp32),
            calibrate_method=getattr(CalibrationMethod, ORT_METHODS[recipe.method]),
            # ActivationSymmetric: S8 as TensorRT wants it, zero point 0 (extra=(("ActivationSymmetric", False),)
            # makes asymmetric S8). CalibStridedMinMax=1 feeds the calibrator one batch at a time (for every method,
            # despite its name): the histogram methods otherwise hold every activation of every image at once
            # (16 GB for 244 images with Percentile).
            extra_options={"ActivationSymmetric": recipe.activations == "s8", "CalibStridedMinMax": 1,
                           **dict(recipe.extra)},
        )


def prepare_fp32(source: Path, prepare: Prepare, output: Path) -> Path:
    """The FP32 graph a recipe quantizes: ``source`` itself, or rewritten by ``prepare`` into ``output``.

    ``ort-preprocess`` is ONNX Runtime's ``quant_pre_process`` (symbolic shape inference, its basic graph
    optimizations, ONNX shape inference); ``ort-optimized`` is the model ONNX Runtime itself runs after its
    basic optimizations (the extended ones write fused operators the quantizer does not know); ``onnxslim``
    is onnxslim's fusions.
    """
    if prepare == "none":
        return Path(source)
    if prepare == "ort-preprocess":
        from onnxruntime.quantization.shape_inference import quant_pre_process

        quant_pre_process(str(source), str(output))
    elif prepare == "ort-optimized":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(output)
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    else:
        import onnx

        onnxslim = lazy_import("onnxslim", "deploy", "The onnxslim preparation")
        onnx.save(onnxslim.slim(onnx.load(str(source))), str(output))
    return output


def modelopt_command(source: Path, output: Path, calibration_data: Path, method: str, input_name: str,
                     calibration_shape: tuple[int, ...], high_precision: str = "fp32") -> list[str]:
    """ModelOpt's ONNX PTQ command line: symmetric INT8 Q/DQ for TensorRT, calibrated on the CPU.

    ``high_precision`` is ModelOpt's ``--high_precision_dtype`` (its own default is fp16): the type of every
    tensor that is not quantized.
    """
    return [sys.executable, "-m", "modelopt.onnx.quantization", "--onnx_path", str(source), "--quantize_mode", "int8",
            "--calibration_method", method, "--calibration_data_path", str(calibration_data),
            "--calibration_shapes", f"{input_name}:{'x'.join(map(str, calibration_shape))}",
            "--calibration_eps", "cpu", "--high_precision_dtype", high_precision, "--output_path", str(output),
            "--log_level", "WARNING"]


def _quantize_modelopt(model: OnnxModel, recipe: Recipe, calibration: CalibrationSet, output: Path) -> None:
    # In a separate process: ModelOpt patches ONNX Runtime's quantization classes when it runs, and ONNX Runtime's
    # own quantize_static in the same process then fails ("Quantization parameters are not specified").
    lazy_import("modelopt", "deploy", "ModelOpt's ONNX PTQ")  # the package only: the PTQ runs in a subprocess
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".modelopt-") as work:
        source, result, data = Path(work) / "fp32.onnx", Path(work) / "int8.onnx", Path(work) / "calibration.npy"
        shutil.copyfile(model.path, source)  # ModelOpt rewrites the file it is given: never hand it the original
        np.save(data, calibration.images)
        shape = (calibration.batch_size, *calibration.images.shape[1:])
        command = modelopt_command(source, result, data, recipe.method, calibration.input_name, shape,
                                   recipe.high_precision)
        run = subprocess.run(command, capture_output=True, text=True, check=False)
        if run.returncode != 0 or not result.exists():
            raise QuantizationError(f"ModelOpt's ONNX PTQ failed (exit {run.returncode}):\n{run.stderr[-2000:]}")
        shutil.copyfile(result, output)


@dataclass(frozen=True)
class VariantResult:
    """One model measured: validation top-1, its drop and agreement against FP32, CPU latency, file size.

    ``tool`` made it (``"fp32"`` for the baseline); ``target`` is the runtime it is made for. ``dev_agreement``:
    agreement with FP32 on the calibration (training) images, the split the CPU model is chosen on (None when
    not measured).
    """

    name: str
    tool: str
    target: str
    path: Path
    val_top1: float
    top1_drop_vs_fp32: float
    agreement_with_fp32: float
    latency_ms_b1: float
    latency_ms_b8: float
    size_mb: float
    calibration_images: int
    recipe: Recipe | None = None  # None for the FP32 baseline
    dev_agreement: float | None = None

    def metrics(self) -> dict[str, Any]:
        """The figures the PTQ record keeps for this variant."""
        dev = {} if self.dev_agreement is None else {"dev_agreement_with_fp32": self.dev_agreement}
        return {"target": self.target, "val_top1": self.val_top1,
                "top1_drop_vs_fp32": round(self.top1_drop_vs_fp32, 6),
                "agreement_with_fp32": self.agreement_with_fp32, "latency_ms_b1": round(self.latency_ms_b1, 3),
                "latency_ms_b8": round(self.latency_ms_b8, 3), "size_mb": round(self.size_mb, 3),
                "calibration_images": self.calibration_images, **dev}


def predictions(runner: Any, images: np.ndarray, batch_size: int = 8) -> np.ndarray:
    """The predicted class of every image, run in batches."""
    return np.concatenate([runner.run(images[i:i + batch_size]).argmax(-1) for i in range(0, len(images), batch_size)])


def _measure(path: Path, precision: str, images: np.ndarray, config: CourseConfig, latency: bool
             ) -> tuple[np.ndarray, dict[int, float]]:
    """Predictions on ``images`` and p50 latency per batch (the course's one benchmark, the config's settings)."""
    from course_utils.core.timing import measure_latency
    from course_utils.deploy.runtimes import OrtRunner

    bench = config.benchmark
    with OrtRunner(path, threads=bench.threads, precision=precision) as runner:
        predicted = predictions(runner, images)
        p50 = {batch: measure_latency(runner, batch, images.shape[-1], bench.warmup, bench.iterations).p50_ms
               if latency else float("nan") for batch in LATENCY_BATCHES}
    return predicted, p50


def measure_fp32(model: OnnxModel, images: np.ndarray, labels: np.ndarray, config: CourseConfig
                 ) -> tuple[VariantResult, np.ndarray]:
    """The FP32 baseline on ONNX Runtime CPU: its result, and its predictions (the INT8 models' reference)."""
    predicted, p50 = _measure(model.path, "fp32", images, config, latency=True)
    top1 = float((predicted == labels).mean())
    return VariantResult("fp32", "fp32", "cpu", model.path, top1, 0.0, 1.0, p50[1], p50[8],
                         model.path.stat().st_size / 2**20, 0), predicted


def measure_int8(made: Int8Model, images: np.ndarray, labels: np.ndarray, config: CourseConfig,
                 reference: np.ndarray, latency: bool = True, dev: tuple[np.ndarray, np.ndarray] | None = None
                 ) -> VariantResult:
    """An INT8 model on ONNX Runtime CPU: top-1, drop and agreement against FP32's predictions, p50 latency, size.

    ``dev``: other images and FP32's predictions on them (the calibration images: ``dev_predictions``); the
    agreement there is what ``best_cpu_variant`` chooses on, so that the validation split is only reported.
    """
    predicted, p50 = _measure(made.path, "int8", images, config, latency)
    top1 = float((predicted == labels).mean())
    drop = float((reference == labels).mean()) - top1
    dev_agreement = None
    if dev is not None:
        dev_agreement = float((_measure(made.path, "int8", dev[0], config, False)[0] == dev[1]).mean())
    return VariantResult(made.recipe.name, made.recipe.tool, made.recipe.target, made.path, top1, drop,
                         float((predicted == reference).mean()), p50[1], p50[8], made.path.stat().st_size / 2**20,
                         made.calibration_images, made.recipe, dev_agreement)


def dev_predictions(model: OnnxModel, calibration: CalibrationSet, config: CourseConfig
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The calibration images and FP32's predictions on them: ``measure_int8``'s ``dev`` split."""
    return calibration.images, _measure(model.path, "fp32", calibration.images, config, False)[0]


MIN_DEV_AGREEMENT = 0.99  # a CPU model may ship when it predicts what FP32 predicts on >= 99% of the dev images


def best_cpu_variant(results: Sequence[VariantResult]) -> VariantResult:
    """The U8S8 model to deploy on ONNX Runtime CPU.

    With the dev agreement measured: the fastest at batch 8 among the models that agree with FP32 on at least
    ``MIN_DEV_AGREEMENT`` of the dev images (else the one that agrees most). Without it: highest top-1, then
    agreement with FP32, then speed.
    """
    cpu = [r for r in results if r.target == "cpu"]
    if not cpu:
        raise QuantizationError("No CPU INT8 model was measured: keep at least one method in quant.methods.")
    if all(r.dev_agreement is not None for r in cpu):
        close = [r for r in cpu if r.dev_agreement >= MIN_DEV_AGREEMENT]  # type: ignore[operator]
        if not close:
            return max(cpu, key=lambda r: (r.dev_agreement, -r.latency_ms_b8))
        return min(close, key=lambda r: r.latency_ms_b8)
    return max(cpu, key=lambda r: (r.val_top1, r.agreement_with_fp32, -r.latency_ms_b8))


def best_tensorrt_variant(results: Sequence[VariantResult]) -> VariantResult | None:
    """ModelOpt's Q/DQ ONNX for TensorRT with the highest top-1 (then agreement), or None when none was made."""
    trt = [r for r in results if r.tool == "modelopt"]
    return max(trt, key=lambda r: (r.val_top1, r.agreement_with_fp32)) if trt else None


# ------------------------------------------------------------------------ which layers gain from INT8


@dataclass(frozen=True)
class LayerTime:
    """One layer of the FP32 graph, timed by ONNX Runtime's profiler in FP32 and in INT8 (ms per batch).

    ``kind``: ``stem`` (the convolution on the 3-channel image), ``depthwise``, ``pointwise`` (1×1), ``conv``
    (other k×k) or ``fully connected``. ``int8_ms`` is the time of the INT8 node made from this layer (its
    fused ``QLinearConv``, or the same FP32 node when the layer was kept in FP32).
    """

    node: str
    kind: str
    fp32_ms: float
    int8_ms: float

    @property
    def gain(self) -> float:
        """How many times faster the layer runs in INT8 (below 1: slower)."""
        return self.fp32_ms / self.int8_ms if self.int8_ms > 0 else math.inf


def node_times(path: Path, batch: int, input_size: int, threads: int = 1, warmup: int = 3, runs: int = 10
               ) -> dict[str, tuple[str, float]]:
    """ONNX Runtime's own profile (``enable_profiling``) of ``path`` at ``batch``: for every node it executed,
    its op type and mean milliseconds per run, after ``warmup`` untimed runs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="ort-profile-") as folder:
        options.profile_file_prefix = str(Path(folder) / "profile")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        images = np.random.default_rng(0).standard_normal((batch, 3, input_size, input_size), dtype=np.float32)
        feed = {session.get_inputs()[0].name: images}
        for _ in range(warmup + runs):
            session.run(None, feed)
        trace = json.loads(Path(session.end_profiling()).read_text(encoding="utf-8"))
    samples: dict[str, tuple[str, list[float]]] = {}
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            name = event["name"].removesuffix("_kernel_time")
            samples.setdefault(name, (event["args"]["op_name"], []))[1].append(event["dur"] / 1000)
    return {name: (op, float(np.mean(times[warmup:] or times))) for name, (op, times) in samples.items()}


def layer_kinds(path: Path) -> dict[str, str]:
    """Every convolution and fully connected layer of an FP32 ONNX by node name: its kind (see ``LayerTime``)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {t.name: tuple(t.dims) for t in graph.initializer}
    inputs = {i.name for i in graph.input}
    kinds = {}
    for node in graph.node:
        if node.op_type in ("Gemm", "MatMul") and any(name in weights for name in node.input):
            kinds[node.name] = "fully connected"
        elif node.op_type == "Conv":
            shape = weights.get(node.input[1], ())
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            if node.input[0] in inputs:
                kinds[node.name] = "stem"
            elif group > 1 and len(shape) == 4 and shape[1] == 1:
                kinds[node.name] = "depthwise"
            elif shape[2:] == (1, 1):
                kinds[node.name] = "pointwise"
            else:
                kinds[node.name] = "conv"
    return kinds


FUSED_AFTER_CONV = {"Clip", "Relu", "Add", "Sum"}  # what ONNX Runtime folds into a convolution it runs (FusedConv, NCHWc)


def _layer_aliases(path: Path, layers: set[str]) -> dict[str, str]:
    """The names ONNX Runtime may give a layer's node once it has fused it: the layer's own name (INT8
    ``QLinearConv``, FP32 ``FusedConv``), or the output tensor of the last node fused into it (the NCHWc
    convolutions of the FP32 graph are named ``<that tensor>_nchwc``)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    aliases = {}
    for node in graph.node:
        if node.name not in layers:
            continue
        aliases[node.name] = node.name
        current = node
        for _ in range(3):  # a convolution, an Add of the residual, an activation
            aliases[current.output[0]] = node.name
            following = consumers.get(current.output[0], [])
            if len(following) != 1 or following[0].op_type not in FUSED_AFTER_CONV:
                break
            current = following[0]
        aliases[current.output[0]] = node.name
    return aliases


def _profiled_name(name: str, aliases: dict[str, str]) -> str | None:
    """The FP32 layer a profiled node comes from (``_nchwc`` and ``_token_<n>`` suffixes are ONNX Runtime's)."""
    stripped = re.sub(r"_token_\d+$", "", name.removesuffix("_nchwc"))
    return aliases.get(stripped)


def layer_times(fp32: Path, int8: Path, batch: int, input_size: int, threads: int = 1, runs: int = 10
                ) -> list[LayerTime]:
    """Each convolution and fully connected layer of ``fp32``, timed in FP32 and in the INT8 model ``int8``
    made from it (same batch, same threads, ``runs`` profiled runs each), in graph order."""
    kinds = layer_kinds(fp32)
    aliases = _layer_aliases(fp32, set(kinds))
    totals: dict[str, list[float]] = {layer: [0.0, 0.0] for layer in kinds}
    for column, path in enumerate((fp32, int8)):
        for name, (_, ms) in node_times(path, batch, input_size, threads, runs=runs).items():
            layer = _profiled_name(name, aliases)
            if layer is not None:
                totals[layer][column] += ms
    return [LayerTime(layer, kind, *totals[layer]) for layer, kind in kinds.items() if totals[layer][0] > 0]


def layers_to_keep_fp32(times: Sequence[LayerTime], min_gain: float = 1.0) -> tuple[str, ...]:
    """The layers whose INT8 version is not at least ``min_gain`` times faster: candidates for ``keep_fp32``."""
    return tuple(t.node for t in times if t.gain < min_gain)


def gains_by_kind(times: Sequence[LayerTime]) -> list[dict[str, Any]]:
    """The profile summed per layer kind: layers, FP32 and INT8 ms, the gain, and each kind's share of INT8 time."""
    total = sum(t.int8_ms for t in times) or 1.0
    rows = []
    for kind in dict.fromkeys(t.kind for t in times):
        group = [t for t in times if t.kind == kind]
        fp32_ms, int8_ms = sum(t.fp32_ms for t in group), sum(t.int8_ms for t in group)
        rows.append({"kind": kind, "layers": len(group), "fp32_ms": round(fp32_ms, 2), "int8_ms": round(int8_ms, 2),
                     "gain": round(fp32_ms / int8_ms, 2) if int8_ms else math.inf,
                     "share_of_int8_layer_time": round(int8_ms / total, 3)})
    return rows


def speedup_with(times: Sequence[LayerTime], gains: Mapping[str, float] | None = None) -> float:
    """The layers' total FP32 time over their INT8 time: as measured, or with the layers of each kind in
    ``gains`` (e.g. ``{"depthwise": 3.3}``) as many times faster than FP32 as given (Amdahl's law)."""
    gains = gains or {}
    int8_ms = sum(t.fp32_ms / gains[t.kind] if t.kind in gains else t.int8_ms for t in times)
    return sum(t.fp32_ms for t in times) / int8_ms if int8_ms else math.inf


def time_by_op(times: dict[str, tuple[str, float]]) -> dict[str, float]:
    """A ``node_times`` profile summed per op type (ms per run), largest first."""
    ops: dict[str, float] = {}
    for op, ms in times.values():
        ops[op] = ops.get(op, 0.0) + ms
    return dict(sorted(ops.items(), key=lambda item: -item[1]))


def profile_recipe(model: OnnxModel, base: VariantResult, threads: int = 1, min_gain: float = 1.0
                   ) -> tuple[list[LayerTime], Recipe | None]:
    """Profile the INT8 model ``base`` against FP32 at batch 8, layer by layer; the same recipe keeping in FP32
    every layer that INT8 does not make ``min_gain`` times faster (None when every layer gains)."""
    if base.recipe is None or base.recipe.tool != "onnxruntime":
        raise QuantizationError(f"{base.name} is not an ONNX Runtime INT8 model: profile a CPU recipe.")
    times = layer_times(model.path, base.path, LATENCY_BATCHES[-1], model.input_size, threads)
    slow = layers_to_keep_fp32(times, min_gain)
    return times, (replace(base.recipe, keep_fp32=slow, label="slow") if slow else None)


def tensorrt_fp16_qdq(model: OnnxModel, variants: Sequence[VariantResult], calibration: CalibrationSet,
                      folder: Path) -> Int8Model | None:
    """The best ModelOpt variant again, written with FP16 between its Q/DQ pairs: strongly typed TensorRT 11's
    INT8 source. Same scales, same calibration; not measured here (ONNX Runtime's CPU has few FP16 kernels)."""
    best = best_tensorrt_variant(variants)
    if best is None or best.recipe is None:
        return None
    return quantize(model, replace(best.recipe, high_precision="fp16"), calibration, folder)


def ablation_sizes(requested: Sequence[int | None], calibration: CalibrationSet) -> list[int]:
    """The distinct calibration sizes an ablation can really use (whole batches, at most the full set)."""
    sizes = {len(calibration.head(size)) for size in requested if size is None or size >= calibration.batch_size}
    return sorted(sizes)


def calibration_ablation(model: OnnxModel, recipe: Recipe, full: CalibrationSet, sizes: Sequence[int],
                         folder: Path, images: np.ndarray, labels: np.ndarray, reference: np.ndarray,
                         config: CourseConfig) -> list[dict[str, Any]]:
    """Quantize with growing, nested calibration sets; top-1 and agreement with FP32 for each size."""
    rows = []
    for size in sizes:
        made = quantize(model, recipe, full.head(size), folder)
        result = measure_int8(made, images, labels, config, reference, latency=False)
        rows.append({"calibration_images": made.calibration_images, "val_top1": result.val_top1,
                     "top1_drop_vs_fp32": round(result.top1_drop_vs_fp32, 6),
                     "agreement_with_fp32": result.agreement_with_fp32})
    return rows


def ptq_metrics(fp32: VariantResult, variants: Sequence[VariantResult], ablation: Sequence[dict[str, Any]],
                ablation_method: str, calibration: CalibrationSet) -> dict[str, Any]:
    """The PTQ record's figures: FP32, every variant, the ablation, which variants the record's files are."""
    best = best_cpu_variant(variants)
    qdq = best_tensorrt_variant(variants)
    metrics: dict[str, Any] = {
        "fp32": {k: v for k, v in fp32.metrics().items()
                 if k in ("val_top1", "latency_ms_b1", "latency_ms_b8", "size_mb")},
        "variants": {v.name: v.metrics() for v in variants},
        "calibration_images": len(calibration), "calibration_sha256": calibration.sha256[:16],
        "seed": calibration.seed, "calibration_batch": calibration.batch_size,
        "ablation": {"method": ablation_method,
                     **{f"{row['calibration_images']}_images":
                        {k: v for k, v in row.items() if k != "calibration_images"} for row in ablation}},
        "best_cpu_variant": best.name,
        "best_cpu_top1_drop_vs_fp32": round(best.top1_drop_vs_fp32, 6),
        "best_cpu_speedup_b8": round(fp32.latency_ms_b8 / best.latency_ms_b8, 3),
    }
    if qdq is not None:
        metrics["tensorrt_qdq_variant"] = qdq.name
    return metrics


def implicit_int8_plans(model: OnnxModel, calibration: CalibrationSet, config: CourseConfig, tensorrt: str,
                        gpu: Any, cuda: str | None = None) -> dict[Calibrator, Any]:
    """TensorRT <= 10.x implicit INT8: one engine plan per calibrator, each with its own calibration cache.

    ``gpu`` and ``cuda`` are the building machine's (default CUDA: this one's; ``jetpack_cuda`` for a Jetson).

    The cache name carries the model hash, calibrator, TensorRT version, calibration data hash and seed;
    the engine name carries the cache's, so an engine calibrated on other data is never reused either.
    TensorRT 11 has no implicit INT8: ``plan_engine`` refuses it and says to use the Q/DQ ONNX.
    """
    from course_utils.deploy.tensorrt_engines import build_route, engines_dir, plan_engine

    out = engines_dir(config)
    base = plan_engine(model, "int8", build_route(tensorrt), gpu, config.engine, out,
                       calibration_images=len(calibration), cuda=cuda)
    if calibration.batch_size != base.profiles[-1].opt:
        raise QuantizationError(f"Calibration batches hold {calibration.batch_size} images but the calibration "
                                f"profile's opt batch is {base.profiles[-1].opt}: TensorRT calibrates at opt. Rebuild "
                                "the set with batch_size=ptq.calibration_batch(config).")
    plans = {}
    for calibrator in CALIBRATORS:
        key = calibration_key(model, calibrator, tensorrt, calibration)
        engine = base.engine_path.with_name(f"{base.engine_path.stem}_{calibrator}-{key.digest}.engine")
        plans[calibrator] = replace(base, calibrator=calibrator, calibration_cache=calibration_cache_path(out, key),
                                    engine_path=engine)
    return plans


def calibration_key(model: OnnxModel, calibrator: Calibrator, tensorrt: str,
                    calibration: CalibrationSet) -> CalibrationCacheKey:
    """The key of ``calibrator``'s cache for this model, TensorRT and calibration set."""
    return CalibrationCacheKey(model.sha256, calibrator, tensorrt, calibration.sha256, calibration.seed)


def build_implicit_int8_engines(plans: dict[Calibrator, Any], calibration: CalibrationSet) -> dict[Calibrator, Any]:
    """Build each calibrator's engine (TensorRT <= 10.x and a GPU); ``build_engine`` deletes a stale cache first.

    A calibrator whose build fails with a course error is returned as that error (skipped, with why); the
    others are still built.
    """
    from course_utils.deploy.tensorrt_engines import build_engine

    builds: dict[Calibrator, Any] = {}
    for calibrator, plan in plans.items():
        try:
            builds[calibrator] = build_engine(plan, calibration)
        except CourseError as error:
            builds[calibrator] = error
    return builds


def calibration_batch(config: CourseConfig) -> int:
    """The calibration batch size: Polygraphy calibrates with the last batch profile, TensorRT at its opt batch."""
    from course_utils.deploy.tensorrt_engines import batch_profiles

    return batch_profiles(config.engine)[-1].opt


def course_fp32_onnx(config: CourseConfig) -> tuple[OnnxModel, Any]:
    """The ONNX stage's optimized FP32 model of the model that ships now, and the preprocessing it expects.

    Nothing is exported here: a missing or stale export raises an error that names notebook 04.
    """
    from course_utils.core.artifacts import OnnxRecord
    from course_utils.core.ledger import Ledger
    from course_utils.deploy.tensorrt_engines import onnx_model
    from course_utils.vision.zoo import entry

    model = onnx_model(config)
    record = Ledger(config.workspace).require(OnnxRecord)
    preprocessing = entry(record.backbone).preprocessing
    if preprocessing.input_size != model.input_size:
        raise QuantizationError(f"{model.path} takes {model.input_size} px images but {record.backbone} is "
                                f"preprocessed to {preprocessing.input_size} px: rerun notebook 04.")
    return model, preprocessing


@dataclass
class PtqResult:
    """The PTQ stage's outcome: FP32 and every INT8 variant measured, the ablation, the record."""

    fp32: VariantResult
    variants: list[VariantResult]
    ablation: list[dict[str, Any]]
    record: PtqRecord


def save_record(config: CourseConfig, model: OnnxModel, fp32: VariantResult, variants: Sequence[VariantResult],
                ablation: Sequence[dict[str, Any]], calibration: CalibrationSet,
                qdq_fp16: Int8Model | None = None) -> PtqRecord:
    """Record the stage: the fastest CPU INT8 model and the TensorRT Q/DQ models (FP32 and, from
    ``tensorrt_fp16_qdq``, FP16 between the pairs) as files made from ``model``."""
    from course_utils.core.artifacts import FileRef, PtqRecord
    from course_utils.core.ledger import Ledger

    best, qdq = best_cpu_variant(variants), best_tensorrt_variant(variants)
    return Ledger(config.workspace).save(PtqRecord(
        cpu_int8=FileRef.of(best.path, config.workspace),
        tensorrt_qdq=FileRef.of(qdq.path, config.workspace) if qdq is not None else None,
        tensorrt_qdq_fp16=FileRef.of(qdq_fp16.path, config.workspace) if qdq_fp16 is not None else None,
        made_from={"onnx": model.sha256}, settings={"quant": config.quant.model_dump()},
        tools=tool_versions("modelopt"),
        metrics=ptq_metrics(fp32, variants, ablation, config.quant.ablation_method, calibration)))


def run(config: CourseConfig) -> PtqResult:
    """The whole PTQ stage as ``python -m course_utils quantize`` and ``prepare-demo`` run it (notebook 06 teaches
    it cell by cell and ends with ``save_record``)."""
    from course_utils.deploy.calibration import build_calibration_set
    from course_utils.deploy.runtimes import validation_arrays
    from course_utils.vision.data import resolve_dataset

    dataset, (model, preprocessing) = resolve_dataset(config), course_fp32_onnx(config)
    transform = preprocessing.eval_transform()
    full = build_calibration_set(dataset.samples["train"], transform, None, calibration_batch(config), config.seed,
                                 model.input_name)
    calibration = full.head(config.quant.calibration_images)
    images, labels = validation_arrays(dataset.samples["val"], transform)
    fp32, reference = measure_fp32(model, images, labels, config)
    dev = dev_predictions(model, calibration, config)
    variants = [measure_int8(quantize(model, recipe, calibration, int8_dir(config)), images, labels, config, reference,
                             dev=dev) for recipe in course_recipes(config.quant)]
    _, kept = profile_recipe(model, variants[0], config.benchmark.threads)
    if kept is not None:
        variants.append(measure_int8(quantize(model, kept, calibration, int8_dir(config)), images, labels, config,
                                     reference, dev=dev))
    ablation = calibration_ablation(model, Recipe("onnxruntime", config.quant.ablation_method), full,
                                    ablation_sizes(config.quant.calibration_ablation, full), int8_dir(config),
                                    images, labels, reference, config)
    qdq_fp16 = tensorrt_fp16_qdq(model, variants, calibration, int8_dir(config))
    record = save_record(config, model, fp32, variants, ablation, calibration, qdq_fp16)
    return PtqResult(fp32, variants, ablation, record)

