"""TensorRT engines from the course's optimized ONNX: FP32, FP16 and INT8, dynamic batch, timing cache.

Users hold TensorRT 8.5.2 (JetPack 5.1), 10.3 (JetPack 6.1/6.2), 10.13+ (JetPack 7, x86 wheels) and
11.x (x86 wheels). Up to 10.x a network is *weakly typed*: FP16 and INT8 are builder flags and INT8
can be calibrated implicitly. 11.x removed both: networks are strongly typed, FP16 comes from an ONNX
that ModelOpt AutoCast converted and INT8 from an explicit Q/DQ ONNX. ``build_route`` picks the route
for a version and says why.

Polygraphy's lazy loaders do the building (``NetworkFromOnnxPath`` -> ``CreateConfig`` ->
``EngineFromNetwork`` -> ``SaveEngine``). The raw TensorRT API appears only where Polygraphy has
nothing: the memory-pool and calibrator types, and reading a built engine's profiles back. That code
is type-checked against ``tensorrt-stubs`` (``make typecheck``). Everything that needs no GPU
(profiles, file names, cache keys, routes, command lines) is plain Python that works without TensorRT.

``run(config, precisions)`` is the stage (``build-engine``, ``prepare-demo``): it plans the configured
precisions for the ONNX stage's export of the model that ships, builds the engines where TensorRT and a GPU
are, and saves the ``EnginesRecord`` (the engines built here and their build times; none without TensorRT
or a GPU, where only the returned plans show a Jetson user's commands). Each precision is built by the
notebook that teaches it: notebook 05 asks for ``FLOAT_PRECISIONS``, notebook 06 for ``INT8_PRECISIONS``
once its calibrated Q/DQ ONNX exists; the record keeps the engines of the other call.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from course_utils.core.atomic import atomic_path, write_json_atomic
from course_utils.core.config import CourseConfig, EngineConfig
from course_utils.core.downloads import sha256_file
from course_utils.core.environment import cuda_version, package_version, tensorrt_version
from course_utils.core.errors import CourseError
from course_utils.core.lazy import lazy_import
from course_utils.core.sealed_cache import CacheState, cache_state, discard_unless_valid, seal, sidecar

if TYPE_CHECKING:
    import tensorrt

    from course_utils.core.artifacts import EnginesRecord
    from course_utils.deploy.calibration import CalibrationCacheKey, CalibrationSet
    from course_utils.vision.data import ImageFolderDataset

LOG = logging.getLogger(__name__)
Precision = Literal["fp32", "fp16", "int8"]
CalibratorKind = Literal["entropy", "minmax"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "fp16", "int8")
FLOAT_PRECISIONS: tuple[Precision, ...] = ("fp32", "fp16")  # notebook 05 builds these
INT8_PRECISIONS: tuple[Precision, ...] = ("int8",)  # notebook 06, after it calibrated the Q/DQ ONNX
OLDEST_TENSORRT = (8, 5)  # JetPack 5.1; Polygraphy supports nothing older
# What a Jetson user has: JetPack release -> the TensorRT and CUDA it ships (NVIDIA's JetPack release notes).
JETPACK_TENSORRT = {"JetPack 5.1.x": "8.5.2", "JetPack 6.1 / 6.2": "10.3.0", "JetPack 7.0": "10.13.0"}
JETPACK_CUDA = {"JetPack 5.1.x": "11.4", "JetPack 6.1 / 6.2": "12.6", "JetPack 7.0": "13.0"}
QDQ_MIN_TENSORRT = 10  # ModelOpt writes INT8 Q/DQ at opset >= 19; TensorRT 8.5/8.6's ONNX parser documents <= 17


class EngineBuildError(CourseError, RuntimeError):
    """An engine that cannot be planned or built as asked; the message says what to do."""


@dataclass(frozen=True)
class BatchProfile:
    """One optimization profile: the smallest, most frequent and largest batch the engine accepts."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise EngineBuildError(
                f"A batch profile needs 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}.")

    @property
    def tag(self) -> str:
        """The profile in a file name: ``b1-4-8``."""
        return f"b{self.min}-{self.opt}-{self.max}"

    def shapes(self, input_size: int, channels: int = 3) -> dict[str, tuple[int, int, int, int]]:
        """The NCHW input shapes TensorRT optimizes for: ``{"min": ..., "opt": ..., "max": ...}``."""
        return {name: (batch, channels, input_size, input_size)
                for name, batch in (("min", self.min), ("opt", self.opt), ("max", self.max))}


def batch_profiles(engine: EngineConfig) -> tuple[BatchProfile, ...]:
    """The configured profiles: ``batch_min/opt/max`` first, then ``extra_profiles``."""
    first = BatchProfile(engine.batch_min, engine.batch_opt, engine.batch_max)
    return (first, *(BatchProfile(*profile) for profile in engine.extra_profiles))


@dataclass(frozen=True)
class Gpu:
    """The GPU an engine or a timing cache belongs to (both are valid on that GPU model only)."""

    name: str
    compute_capability: str

    @property
    def slug(self) -> str:
        """The GPU in a file name: ``nvidia-jetson-orin-nano-sm87``."""
        name = re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")
        return f"{name}-sm{self.compute_capability.replace('.', '')}"


JETSON_ORIN = Gpu("NVIDIA Jetson Orin Nano", "8.7")  # the course's reference edge device, for printed plans


def detect_gpu() -> Gpu | None:
    """The first CUDA GPU as PyTorch sees it, or None without one."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return Gpu(torch.cuda.get_device_name(0), f"{major}.{minor}")


def parse_version(version: str) -> tuple[int, ...]:
    """``"10.3.0.30"`` -> ``(10, 3, 0, 30)``; text after the numbers (``"11.0.0rc1"``) is ignored."""
    match = re.match(r"^\d+(\.\d+)*", version.strip())
    if not match:
        raise EngineBuildError(f"{version!r} is not a TensorRT version such as 10.3.0.")
    return tuple(int(part) for part in match.group(0).split("."))


@dataclass(frozen=True)
class BuildRoute:
    """How one TensorRT version turns the course's ONNX into FP32, FP16 and INT8 engines."""

    tensorrt: str
    strongly_typed: bool  # 11.x: always; precision comes from the ONNX, not from builder flags
    precision_flags: bool  # BuilderFlag.FP16 / INT8 exist (up to 10.x)
    implicit_int8: bool  # IInt8 calibrators exist (up to 10.x)
    optimization_level: bool  # IBuilderConfig.builder_optimization_level exists (8.6 and later)
    qdq_parser: bool = True  # the ONNX parser reads ModelOpt's Q/DQ ONNX (opset >= 19): TensorRT 10 and later
    deprecated: tuple[str, ...] = ()  # features this version still has but will lose in 11.x

    @property
    def generation(self) -> str:
        """``"8.5"``, ``"8.6"``, ``"10.x"`` or ``"11.x"``: the routes differ between these."""
        version = parse_version(self.tensorrt)
        return f"{version[0]}.{version[1]}" if version[0] < 10 else f"{version[0]}.x"

    @property
    def qdq_high_precision(self) -> Literal["fp16", "fp32"]:
        """The type of the layers between Q/DQ pairs that the Q/DQ ONNX for this version must carry.

        Strongly typed, a layer runs in its tensors' type, so an FP32 one would run every layer that is not
        quantized in FP32; weakly typed, the FP16 flag lets TensorRT pick FP16 for them anyway.
        """
        return "fp16" if self.strongly_typed else "fp32"

    def source(self, precision: Precision, have_qdq: bool = False) -> str:
        """The ONNX TensorRT parses for ``precision``: ``fp32-onnx``, ``autocast-fp16-onnx`` or ``qdq-onnx``.

        INT8 comes from the Q/DQ ONNX where the parser reads it (10.x with one, 11.x always), else from
        implicit calibration of the FP32 ONNX (8.5/8.6, or 10.x without a Q/DQ ONNX).
        """
        if precision == "fp16" and self.strongly_typed:
            return "autocast-fp16-onnx"
        if precision == "int8" and ((have_qdq and self.qdq_parser) or not self.implicit_int8):
            return "qdq-onnx"
        return "fp32-onnx"

    def explain(self) -> str:
        """The route in words, for the notebook and ``build-engine``."""
        if self.strongly_typed:
            text = (f"TensorRT {self.tensorrt}: networks are strongly typed, so the ONNX decides every "
                    "tensor's precision and there are no precision flags or calibrators. FP32 builds the "
                    "optimized ONNX; FP16 builds a copy that NVIDIA ModelOpt AutoCast converted (FP16 inside, "
                    "FP32 inputs and outputs); INT8 builds the explicit Q/DQ ONNX that the quantization stage "
                    "(notebook 06) calibrated and validated, in the copy written with FP16 between the Q/DQ "
                    "pairs: an FP32 one would run every layer that is not quantized in FP32.")
        else:
            text = (f"TensorRT {self.tensorrt}: networks are weakly typed. The FP32, FP16 and INT8 engines build "
                    "the same FP32 ONNX; the builder flags FP16 and INT8 let TensorRT pick faster kernels. ")
            text += ("INT8 takes its scales from the quantization stage's Q/DQ ONNX when there is one, else it "
                     "calibrates implicitly on training images (IInt8 calibrator; the cache is kept). "
                     if self.qdq_parser else
                     "INT8 calibrates implicitly on training images (IInt8 calibrator; the cache is kept): "
                     "ModelOpt writes its Q/DQ ONNX at opset 19 or later, and this version's ONNX parser reads "
                     "opset 17 at most. ")
            text += "INT8 engines also enable FP16 so layers without INT8 kernels do not fall back to FP32."
            if not self.optimization_level:
                text += " It has no builder optimization level (added in 8.6): TensorRT's default is used."
        if self.deprecated:
            text += (f" Deprecated in this version and removed in 11.x: {' and '.join(self.deprecated)}; the "
                     "strongly typed route (AutoCast FP16, Q/DQ INT8) is the future-proof one.")
        return text


def build_route(version: str) -> BuildRoute:
    """The build route for a TensorRT version (8.5.2, 8.6, 10.3, 10.13, 11.0, ...)."""
    parsed = parse_version(version)
    if parsed[:2] < OLDEST_TENSORRT:
        raise EngineBuildError(f"TensorRT {version} is older than the course supports (8.5, JetPack 5.1): "
                               "Polygraphy needs 8.5 or later. Upgrade JetPack or the TensorRT wheel.")
    if parsed[0] >= 11:
        return BuildRoute(version, strongly_typed=True, precision_flags=False, implicit_int8=False,
                          optimization_level=True)
    deprecated = [name for since, name in (((10, 1), "implicit INT8 calibration (since 10.1)"),
                                           ((10, 12), "the FP16/INT8 builder flags (since 10.12)"))
                  if parsed[:2] >= since]
    return BuildRoute(version, strongly_typed=False, precision_flags=True, implicit_int8=True,
                      optimization_level=parsed[:2] >= (8, 6), qdq_parser=parsed[0] >= QDQ_MIN_TENSORRT,
                      deprecated=tuple(deprecated))


SOURCE_WORDS = {"fp32-onnx": "builder flag on the FP32 ONNX", "autocast-fp16-onnx": "ModelOpt AutoCast ONNX",
                "qdq-onnx": "explicit Q/DQ ONNX (notebook 06)"}


def routes_table(releases: dict[str, str] | None = None) -> list[dict[str, str]]:
    """One row per release (default: the JetPack releases and a TensorRT 11 wheel): how each builds."""
    rows = []
    for release, version in (releases or {**JETPACK_TENSORRT, "x86 wheel, TensorRT 11": "11.0.0"}).items():
        route = build_route(version)
        int8 = ("Q/DQ ONNX, FP16 between (notebook 06)" if not route.implicit_int8 else
                "implicit calibrator, or Q/DQ ONNX" if route.qdq_parser else "implicit calibrator (opset <= 17)")
        rows.append({"release": release, "TensorRT": version,
                     "network": "strongly typed" if route.strongly_typed else "weakly typed",
                     "FP16 from": SOURCE_WORDS[route.source("fp16")], "INT8 from": int8,
                     "optimization level": "yes" if route.optimization_level else "no (8.6+)",
                     "deprecated here": ", ".join(d.split(" (")[0] for d in route.deprecated) or "-"})
    return rows


@dataclass(frozen=True)
class OnnxModel:
    """An ONNX classifier with dynamic batch: where it is, what it hashes to, its tensor names and size."""

    path: Path
    sha256: str
    input_name: str = "images"
    output_name: str = "logits"
    input_size: int = 224

    @classmethod
    def from_path(cls, path: Path, input_name: str = "images", output_name: str = "logits",
                  input_size: int = 224) -> OnnxModel:
        """Describe an ONNX file, hashing its bytes."""
        return cls(Path(path), sha256_file(Path(path)), input_name, output_name, input_size)


def onnx_model(config: CourseConfig) -> OnnxModel:
    """The ONNX stage's optimized model of the model that ships now (``deployed_model``).

    Raises ``MissingArtifactError`` when notebook 04 has not run, ``StaleArtifactError`` when its export was
    made from another model than the one deployed now: an engine is never built from a stale ONNX.
    """
    from course_utils.core.artifacts import OnnxRecord
    from course_utils.core.ledger import Ledger, deployed_model

    ledger = Ledger(config.workspace)
    record = ledger.require(OnnxRecord, made_from={"model": deployed_model(ledger, config).sha256})
    return OnnxModel(record.optimized.resolve(config.workspace), record.optimized.sha256, record.input_name,
                     record.output_name, record.input_size)


def _file_part(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z.]+", "-", text)


def engine_filename(model_sha256: str, precision: Precision, profiles: Sequence[BatchProfile], gpu: Gpu,
                    tensorrt: str, cuda: str = "none") -> str:
    """``<model hash>_<precision>_<profiles>_<gpu>_trt<version>_cu<cuda>.engine``: it runs only where all match."""
    return (f"{model_sha256[:12]}_{precision}_{'_'.join(p.tag for p in profiles)}_{gpu.slug}"
            f"_trt{_file_part(tensorrt)}_cu{_file_part(cuda)}.engine")


@dataclass(frozen=True)
class CacheKey:
    """What a timing cache is valid for: its tactic timings hold on one GPU model with one TensorRT, built
    against one CUDA (``tensorrt-cu12`` and ``-cu13`` share version numbers), with TF32 on or off."""

    gpu: str
    compute_capability: str
    tensorrt: str
    cuda: str = "none"
    tf32: bool = False

    @classmethod
    def of(cls, gpu: Gpu, tensorrt: str, cuda: str = "none", tf32: bool = False) -> CacheKey:
        return cls(gpu.name, gpu.compute_capability, tensorrt, cuda, tf32)

    @property
    def filename(self) -> str:
        return (f"{Gpu(self.gpu, self.compute_capability).slug}_trt{_file_part(self.tensorrt)}"
                f"_cu{_file_part(self.cuda)}{'_tf32' if self.tf32 else ''}.timing-cache")


def timing_cache_state(path: Path, key: CacheKey) -> CacheState:
    """``valid`` only for a cache sealed by this GPU and TensorRT version."""
    return cache_state(path, key)


def prepare_timing_cache(path: Path, key: CacheKey) -> CacheState:
    """Check the cache at ``path``; one that is not ``valid`` is deleted so the build starts a fresh one."""
    state = discard_unless_valid(path, key)
    if state not in ("valid", "missing"):
        LOG.warning("timing cache %s was %s for %s with TensorRT %s: rebuilding it", path.name, state,
                    key.gpu, key.tensorrt)
    return state


def seal_timing_cache(path: Path, key: CacheKey) -> None:
    """Record beside a freshly saved cache which GPU and TensorRT made it, and its hash."""
    seal(path, key)


@dataclass(frozen=True)
class EnginePlan:
    """Everything one engine build needs, decided without TensorRT (so it can be shown and tested anywhere)."""

    precision: Precision
    route: BuildRoute
    model: OnnxModel
    source: Path  # the ONNX TensorRT parses
    source_kind: str  # fp32-onnx | autocast-fp16-onnx | qdq-onnx
    profiles: tuple[BatchProfile, ...]
    gpu: Gpu
    engine_path: Path
    timing_cache: Path
    fp16_flag: bool
    int8_flag: bool
    calibrate: bool
    calibrator: CalibratorKind
    calibration_images: int
    calibration_cache: Path | None
    optimization_level: int | None
    workspace_mb: int
    cuda: str  # the CUDA TensorRT runs on (``cuda_version``): engines and caches are valid only there
    tf32: bool = False  # Polygraphy's default, and the course's: FP32 engines compute in FP32

    @property
    def cache_key(self) -> CacheKey:
        return CacheKey.of(self.gpu, self.route.tensorrt, self.cuda, self.tf32)

    def settings(self) -> dict[str, Any]:
        """What the engine depends on besides its file name; a change means a rebuild."""
        return {"source_kind": self.source_kind, "fp16_flag": self.fp16_flag, "int8_flag": self.int8_flag,
                "calibrate": self.calibrate, "calibrator": self.calibrator if self.calibrate else None,
                "calibration_images": self.calibration_images if self.calibrate else None,
                "optimization_level": self.optimization_level, "workspace_mb": self.workspace_mb,
                "profiles": [p.tag for p in self.profiles], "tf32": self.tf32}


def qdq_high_precision(path: Path) -> Literal["fp16", "fp32"]:
    """The float type between the Q/DQ pairs of an INT8 ONNX: ``fp16`` when any initializer or Cast is FP16."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    fp16 = onnx.TensorProto.FLOAT16
    casts = (attr.i for node in graph.node if node.op_type == "Cast" for attr in node.attribute if attr.name == "to")
    return "fp16" if any(t.data_type == fp16 for t in graph.initializer) or fp16 in casts else "fp32"


def plan_engine(model: OnnxModel, precision: Precision, route: BuildRoute, gpu: Gpu, engine: EngineConfig,
                out_dir: Path, qdq_onnx: Path | None = None, calibration_images: int = 0,
                cuda: str | None = None) -> EnginePlan:
    """Decide how to build one engine; refuse, with the fix, what this TensorRT cannot build.

    ``qdq_onnx``: the quantization stage's Q/DQ ONNX for this route (``qdq_onnx_path``); ``cuda``: the CUDA
    of the machine that builds (default: this one's, ``cuda_version``).
    """
    if precision not in PRECISIONS:
        raise EngineBuildError(f"Unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}.")
    kind = route.source(precision, have_qdq=qdq_onnx is not None)
    if kind == "qdq-onnx" and qdq_onnx is None:
        raise EngineBuildError(
            f"INT8 on TensorRT {route.tensorrt} needs an explicit Q/DQ ONNX: strongly typed networks have no "
            f"implicit calibration. Run notebook 06 (`python -m course_utils quantize`) first, or pass qdq_onnx=...")
    if kind == "qdq-onnx" and qdq_onnx is not None and route.strongly_typed \
            and qdq_high_precision(qdq_onnx) != route.qdq_high_precision:
        raise EngineBuildError(
            f"{qdq_onnx.name} keeps FP32 between its Q/DQ pairs: strongly typed, TensorRT {route.tensorrt} would "
            "run every layer that is not quantized in FP32. Rerun notebook 06 (`python -m course_utils quantize`), "
            "which also writes the Q/DQ ONNX with FP16 high precision.")
    calibrate = precision == "int8" and kind == "fp32-onnx"
    profiles = batch_profiles(engine)
    if calibrate and calibration_images < profiles[-1].opt:
        raise EngineBuildError(
            "INT8 without a Q/DQ ONNX needs a calibrator, and TensorRT calibrates whole batches of the "
            f"profile's opt size ({profiles[-1].opt}): set quant.calibration_images >= {profiles[-1].opt} "
            "(NVIDIA suggests about 500), or pass qdq_onnx=... from notebook 06.")
    autocast = out_dir / f"{model.sha256[:12]}_autocast-fp16_modelopt{package_version('modelopt')}.onnx"
    source = {"fp32-onnx": model.path, "qdq-onnx": qdq_onnx, "autocast-fp16-onnx": autocast}[kind]
    assert source is not None
    weak = not route.strongly_typed
    cuda = cuda or cuda_version() or "none"
    return EnginePlan(
        precision=precision, route=route, model=model, source=Path(source), source_kind=kind, profiles=profiles,
        gpu=gpu, engine_path=out_dir / engine_filename(model.sha256, precision, profiles, gpu, route.tensorrt, cuda),
        timing_cache=out_dir / CacheKey.of(gpu, route.tensorrt, cuda).filename,
        fp16_flag=weak and precision in ("fp16", "int8"), int8_flag=weak and precision == "int8",
        calibrate=calibrate, calibrator=engine.calibrator, calibration_images=calibration_images,
        calibration_cache=(out_dir / f"{model.sha256[:12]}_{engine.calibrator}-{calibration_images}img"
                           f"_trt{route.tensorrt}.calib") if calibrate else None,
        optimization_level=engine.optimization_level if route.optimization_level else None,
        workspace_mb=engine.workspace_mb, cuda=cuda,
    )


def _shape(shape: tuple[int, ...], sep: str) -> str:
    return sep.join(str(d) for d in shape)


def polygraphy_command(plan: EnginePlan) -> str:
    """The ``polygraphy convert`` line that builds the same engine from a shell."""
    name = plan.model.input_name
    parts = ["polygraphy", "convert", str(plan.source), "--convert-to", "trt", "-o", str(plan.engine_path)]
    for profile in plan.profiles:
        for which, shape in profile.shapes(plan.model.input_size).items():
            parts += [f"--trt-{which}-shapes", f"{name}:[{_shape(shape, ',')}]"]
    parts += ["--fp16"] * plan.fp16_flag + ["--int8"] * plan.int8_flag
    if plan.calibration_cache is not None:
        parts += ["--calibration-cache", str(plan.calibration_cache)]
        if plan.calibrator == "minmax":  # Polygraphy's Calibrator defaults to IInt8EntropyCalibrator2
            parts += ["--calibration-base-class", "IInt8MinMaxCalibrator"]
    parts += ["--tf32"] * plan.tf32  # off unless asked, as in the Python path
    if plan.optimization_level is not None:
        parts += ["--builder-optimization-level", str(plan.optimization_level)]
    parts += ["--pool-limit", f"workspace:{plan.workspace_mb}M",
              "--load-timing-cache", str(plan.timing_cache), "--save-timing-cache", str(plan.timing_cache)]
    return shlex.join(parts)


def trtexec_command(plan: EnginePlan) -> str:
    """The ``trtexec`` line for the same engine (first profile only: trtexec builds one per command).

    trtexec enables TF32 by default and Polygraphy does not: ``--noTF32`` keeps the two engines alike.
    """
    name, profile = plan.model.input_name, plan.profiles[0]
    parts = ["trtexec", f"--onnx={plan.source}", f"--saveEngine={plan.engine_path}"]
    parts += [f"--{which}Shapes={name}:{_shape(shape, 'x')}"
              for which, shape in profile.shapes(plan.model.input_size).items()]
    parts += ["--fp16"] * plan.fp16_flag + ["--int8"] * plan.int8_flag + ["--noTF32"] * (not plan.tf32)
    if plan.calibration_cache is not None:
        parts.append(f"--calib={plan.calibration_cache}")
    if plan.optimization_level is not None:
        parts.append(f"--builderOptimizationLevel={plan.optimization_level}")
    parts += [f"--memPoolSize=workspace:{plan.workspace_mb}", f"--timingCacheFile={plan.timing_cache}"]
    return shlex.join(parts)


def autocast_command(model: OnnxModel, output: Path) -> str:
    """The ModelOpt AutoCast line that makes the FP16 ONNX of the strongly typed route."""
    return shlex.join(["python", "-m", "modelopt.onnx.autocast", "--onnx_path", str(model.path),
                       "--output_path", str(output), "--low_precision_type", "fp16", "--keep_io_types"])


def shell_commands(plan: EnginePlan) -> list[str]:
    """Every command a user runs in a shell to build this engine, in order."""
    commands = [autocast_command(plan.model, plan.source)] if plan.source_kind == "autocast-fp16-onnx" else []
    return commands + [polygraphy_command(plan), trtexec_command(plan)]


def autocast_fp16(source: Path, output: Path) -> Path:
    """Convert an FP32 ONNX to mixed FP16 with ModelOpt AutoCast (FP32 inputs and outputs); runs on the CPU."""
    import onnx

    autocast = lazy_import("modelopt.onnx.autocast", "deploy", "FP16 on strongly typed TensorRT")
    # ModelOpt 0.31 (the newest for JetPack 6.0's torch 2.3) calls it `convert`; 0.33 and later, as below.
    convert = getattr(autocast, "convert_to_mixed_precision", None) or autocast.convert
    converted = convert(str(source), low_precision_type="fp16", keep_io_types=True)
    with atomic_path(output) as tmp:
        onnx.save(converted, str(tmp))
    return output


def ort_tensorrt_options(input_name: str, input_size: int, profile: BatchProfile, precision: str,
                         workspace_mb: int, cache_dir: Path | None = None, gpu: Gpu | None = None) -> dict[str, Any]:
    """ONNX Runtime's TensorRT execution provider options that build what ``plan_engine`` plans.

    The profile's min/opt/max shapes (without them the provider builds for the first shape it sees and
    rebuilds on every new batch size), FP16/INT8, and, with ``cache_dir``, engine and timing caches in a
    folder named by GPU, TensorRT and CUDA: the provider's own cache names hold none of the three.
    """
    shapes = {which: f"{input_name}:{_shape(shape, 'x')}" for which, shape in profile.shapes(input_size).items()}
    options: dict[str, Any] = {
        "trt_fp16_enable": precision in ("fp16", "int8"), "trt_int8_enable": precision == "int8",
        "trt_profile_min_shapes": shapes["min"], "trt_profile_opt_shapes": shapes["opt"],
        "trt_profile_max_shapes": shapes["max"], "trt_max_workspace_size": workspace_mb << 20}
    if cache_dir is not None:
        gpu = gpu or detect_gpu()
        folder = Path(cache_dir) / (f"{gpu.slug if gpu else 'no-gpu'}_trt{_file_part(tensorrt_version() or 'unknown')}"
                                    f"_cu{_file_part(cuda_version() or 'none')}")
        options |= {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(folder),
                    "trt_timing_cache_enable": True, "trt_timing_cache_path": str(folder)}
    return options


def _memory_pool_limits(workspace_mb: int) -> dict[tensorrt.MemoryPoolType, int]:
    import tensorrt as trt

    return {trt.MemoryPoolType.WORKSPACE: workspace_mb << 20}


def calibration_set(plan: EnginePlan, samples: Sequence[tuple[Path, int]], transform: Any, seed: int
                    ) -> CalibrationSet:
    """The plan's calibration images (training split, ``transform`` = the model's eval transform).

    Polygraphy calibrates with the last profile and TensorRT at its *opt* batch, so batches have that size.
    """
    from course_utils.deploy.calibration import build_calibration_set

    return build_calibration_set(samples, transform, plan.calibration_images, plan.profiles[-1].opt, seed,
                                 plan.model.input_name)


def _calibration_key(plan: EnginePlan, calibration: CalibrationSet) -> CalibrationCacheKey:
    from course_utils.deploy.calibration import CalibrationCacheKey

    return CalibrationCacheKey(plan.model.sha256, plan.calibrator, plan.route.tensorrt, calibration.sha256,
                               calibration.seed)


def _calibrator_class(kind: CalibratorKind) -> type[tensorrt.IInt8Calibrator]:
    import tensorrt as trt

    return trt.IInt8MinMaxCalibrator if kind == "minmax" else trt.IInt8EntropyCalibrator2


def polygraphy_calibrator(plan: EnginePlan, calibration: CalibrationSet) -> Any:
    """Polygraphy's ``Calibrator`` over the set's opt-size batches, on TensorRT's entropy or min-max class.

    It reads the plan's calibration cache when present and writes it otherwise; ``build_engine``
    deletes a cache that was not made from this model, calibrator, TensorRT and data first.
    """
    Calibrator = lazy_import("polygraphy.backend.trt", "deploy", "Implicit INT8 calibration").Calibrator

    return Calibrator(calibration.batches(), cache=str(plan.calibration_cache),
                      BaseClass=_calibrator_class(plan.calibrator))


def engine_loader(plan: EnginePlan, output: Path, calibrator: Any = None,
                  load_timing_cache: bool = True) -> Any:
    """The lazy Polygraphy pipeline that builds ``plan`` into ``output`` when called (nothing runs before).

    ``calibrator``: implicit INT8 only (``polygraphy_calibrator``). The timing cache is always
    saved (merged into the file); ``load_timing_cache=False`` starts cold.
    """
    lazy_import("polygraphy.backend.trt", "deploy", "Building TensorRT engines")
    from polygraphy.backend.trt import (
        CreateConfig,
        EngineFromNetwork,
        NetworkFromOnnxPath,
        Profile,
        SaveEngine,
    )

    if plan.calibrate and calibrator is None:
        raise EngineBuildError("This INT8 plan calibrates implicitly but no calibrator was given: build it "
                               "with build_engine(plan, calibration_set(plan, ...)).")
    profiles = []
    for profile in plan.profiles:
        shapes = profile.shapes(plan.model.input_size)
        profiles.append(Profile().add(plan.model.input_name, min=shapes["min"], opt=shapes["opt"],
                                      max=shapes["max"]))
    load_cache = load_timing_cache and plan.timing_cache.exists()
    config = CreateConfig(
        fp16=plan.fp16_flag, int8=plan.int8_flag, tf32=plan.tf32, calibrator=calibrator, profiles=profiles,
        memory_pool_limits=_memory_pool_limits(plan.workspace_mb),
        builder_optimization_level=plan.optimization_level,
        load_timing_cache=str(plan.timing_cache) if load_cache else None,
    )
    network = NetworkFromOnnxPath(str(plan.source))
    engine = EngineFromNetwork(network, config=config, save_timing_cache=str(plan.timing_cache))
    return SaveEngine(engine, path=str(output))


def engine_profile_shapes(engine_path: Path, input_name: str) -> list[list[tuple[int, ...]]]:
    """Read a built engine's (min, opt, max) input shapes per profile back from the engine itself.

    Polygraphy prints these (``polygraphy inspect model``) but returns none, hence the raw API.
    """
    import tensorrt as trt

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise EngineBuildError(f"{engine_path} does not deserialize with TensorRT {trt.__version__}: "
                               "engines run only with the TensorRT (and GPU) that built them. Rebuild it.")
    return [[tuple(dims[i] for i in range(len(dims)))
             for dims in engine.get_tensor_profile_shape(input_name, index)]
            for index in range(engine.num_optimization_profiles)]


@dataclass
class EngineBuild:
    """One engine on disk: its plan, how long the build (or the reuse check) took, and the cache story."""

    plan: EnginePlan
    seconds: float
    reused: bool
    timing_cache: str  # its state before the build (see timing_cache_state), "not loaded", or "unused" on reuse
    extra: dict[str, float] = field(default_factory=dict)


def _engine_metadata(plan: EnginePlan) -> dict[str, Any]:
    return {"model_sha256": plan.model.sha256, "precision": plan.precision, "gpu": asdict(plan.gpu),
            "tensorrt": plan.route.tensorrt, "cuda": plan.cuda, "settings": plan.settings(),
            "source_sha256": sha256_file(plan.source)}


def record_engine(plan: EnginePlan, build_seconds: float, calibration_sha256: str | None = None) -> Path:
    """Write the engine's sidecar: what it was built from and with (calibration data too), and its own hash."""
    metadata = {**_engine_metadata(plan), "calibration_sha256": calibration_sha256,
                "build_seconds": round(build_seconds, 3), "engine_sha256": sha256_file(plan.engine_path)}
    return write_json_atomic(sidecar(plan.engine_path), metadata)


def reusable_engine(plan: EnginePlan, calibration_sha256: str | None = None) -> bool:
    """True when the engine file exists and its sidecar matches the plan, the file's hash and, when given,
    the calibration data's hash."""
    try:
        meta = json.loads(sidecar(plan.engine_path).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return (plan.engine_path.exists() and plan.source.exists()
            and {k: meta.get(k) for k in _engine_metadata(plan)} == _engine_metadata(plan)
            and calibration_sha256 in (None, meta.get("calibration_sha256"))
            and meta.get("engine_sha256") == sha256_file(plan.engine_path))


def _require_tensorrt(plan: EnginePlan) -> None:
    installed = tensorrt_version()
    if installed is None:
        raise EngineBuildError("TensorRT is not installed here. On a Jetson it comes with JetPack; on x86 "
                               "`pip install tensorrt`. shell_commands(plan) gives the commands that build "
                               "the same engine elsewhere.")
    if installed != plan.route.tensorrt:
        raise EngineBuildError(f"The plan is for TensorRT {plan.route.tensorrt} but {installed} is installed: "
                               f"plan again with build_route({installed!r}).")


def build_engine(plan: EnginePlan, calibration: CalibrationSet | None = None, force: bool = False,
                 load_timing_cache: bool = True) -> EngineBuild:
    """Build ``plan``, or reuse its engine when the sidecar matches (unless ``force``).

    Timing and calibration caches that are not valid for this GPU, TensorRT, model and data are
    deleted first; the build saves them and seals each with a sidecar. ``calibration``: implicit
    INT8 plans only (``calibration_set``).
    """
    from course_utils.deploy.calibration import (
        prepare_calibration_cache,
        seal_calibration_cache,
    )

    _require_tensorrt(plan)
    if plan.calibrate and calibration is None:
        raise EngineBuildError("This INT8 plan calibrates implicitly: pass "
                               "calibration=calibration_set(plan, ...).")
    calibration_sha = calibration.sha256 if plan.calibrate and calibration is not None else None
    started = time.perf_counter()
    if not force and reusable_engine(plan, calibration_sha):
        return EngineBuild(plan, time.perf_counter() - started, reused=True, timing_cache="unused")
    if plan.source_kind == "autocast-fp16-onnx" and not plan.source.exists():
        autocast_fp16(plan.model.path, plan.source)
    state = prepare_timing_cache(plan.timing_cache, plan.cache_key)
    calibrator = None
    if plan.calibrate and calibration is not None and plan.calibration_cache is not None:
        prepare_calibration_cache(plan.calibration_cache, _calibration_key(plan, calibration))
        calibrator = polygraphy_calibrator(plan, calibration)
    with atomic_path(plan.engine_path) as tmp:
        loader = engine_loader(plan, tmp, calibrator, load_timing_cache)
        started = time.perf_counter()
        loader()
        seconds = time.perf_counter() - started
    seal_timing_cache(plan.timing_cache, plan.cache_key)
    if calibrator is not None and plan.calibration_cache is not None and calibration is not None:
        seal_calibration_cache(plan.calibration_cache, _calibration_key(plan, calibration))
    record_engine(plan, seconds, calibration_sha)
    return EngineBuild(plan, seconds, reused=False, timing_cache=state if load_timing_cache else "not loaded")


def measure_build_times(plan: EnginePlan, calibration: CalibrationSet | None = None) -> EngineBuild:
    """Build three ways and report each: without a timing cache, first with one, and a warm rebuild.

    ``no_cache_s``: no cache file loaded, every tactic is timed (the timings are saved);
    ``first_with_cache_s``: a fresh build that loads those timings and skips tactic timing;
    ``warm_rebuild_s``: the same request again, answered by the engine on disk once its sidecar matches.
    """
    cold = build_engine(plan, calibration, force=True, load_timing_cache=False)
    cached = build_engine(plan, calibration, force=True)
    warm = build_engine(plan, calibration)
    times = {"no_cache_s": cold.seconds, "first_with_cache_s": cached.seconds, "warm_rebuild_s": warm.seconds}
    return replace(cached, extra=times)


def engines_dir(config: CourseConfig) -> Path:
    """Where the engines, timing caches and converted ONNX files of this stage live."""
    return config.workspace / "engines"


def qdq_onnx_path(config: CourseConfig, model: OnnxModel, route: BuildRoute) -> Path | None:
    """The quantization stage's explicit Q/DQ ONNX for ``route``, when it was made from ``model``.

    Strongly typed routes get the copy with FP16 between the Q/DQ pairs, weakly typed ones the FP32 copy
    that notebook 06 measured; None where this TensorRT's parser cannot read ModelOpt's opset.
    """
    from course_utils.core.artifacts import PtqRecord
    from course_utils.core.ledger import Ledger

    record = Ledger(config.workspace).current(PtqRecord, made_from={"onnx": model.sha256})
    if record is None or not route.qdq_parser:
        return None
    ref = record.tensorrt_qdq_fp16 if route.qdq_high_precision == "fp16" else record.tensorrt_qdq
    return ref.resolve(config.workspace) if ref is not None else None


def wanted_precisions(config: CourseConfig, precisions: Sequence[Precision] | None = None) -> list[Precision]:
    """The configured precisions (``engine.precisions``), in course order, limited to ``precisions`` when given."""
    return [p for p in PRECISIONS if p in config.engine.precisions and (precisions is None or p in precisions)]


def course_plans(config: CourseConfig, model: OnnxModel, tensorrt: str, gpu: Gpu, cuda: str | None = None,
                 precisions: Sequence[Precision] | None = None) -> dict[str, EnginePlan | EngineBuildError]:
    """A plan per configured precision (of ``precisions``, default all) for one TensorRT version, GPU and CUDA
    (default: this machine's), or the reason it cannot be built."""
    route = build_route(tensorrt)
    plans: dict[str, EnginePlan | EngineBuildError] = {}
    for precision in wanted_precisions(config, precisions):
        try:
            plans[precision] = plan_engine(model, precision, route, gpu, config.engine, engines_dir(config),
                                           qdq_onnx_path(config, model, route), config.quant.calibration_images,
                                           cuda)
        except EngineBuildError as error:
            plans[precision] = error
    return plans


def build_course_engines(config: CourseConfig, dataset: ImageFolderDataset, model: OnnxModel,
                         transform: Any, precisions: Sequence[Precision] | None = None
                         ) -> dict[str, EngineBuild | EngineBuildError]:
    """Build the configured precisions (of ``precisions``, default all) with this machine's GPU and TensorRT.

    The first FP32 or FP16 engine is timed three ways (``measure_build_times``); an INT8 engine is built once,
    since timing it cold would calibrate again. A precision that cannot be calibrated or built is recorded
    as skipped, with why, and the others go on.
    """
    installed, gpu = tensorrt_version(), detect_gpu()
    if installed is None or gpu is None:
        raise EngineBuildError("Building engines needs TensorRT and a CUDA GPU; this machine has "
                               f"TensorRT {installed or 'none'} and GPU {gpu.name if gpu else 'none'}.")
    builds: dict[str, EngineBuild | EngineBuildError] = {}
    for precision, plan in course_plans(config, model, installed, gpu, precisions=precisions).items():
        if isinstance(plan, EngineBuildError):
            builds[precision] = plan
            continue
        first = precision != "int8" and not any(isinstance(made, EngineBuild) for made in builds.values())
        try:
            calibration = (calibration_set(plan, dataset.samples["train"], transform, config.seed)
                           if plan.calibrate else None)
            builds[precision] = measure_build_times(plan, calibration) if first else build_engine(plan, calibration)
        except CourseError as error:  # e.g. CalibrationError: too few images for one opt batch
            builds[precision] = EngineBuildError(f"{precision} skipped: {error}")
    return builds


def jetpack_cuda(tensorrt: str) -> str | None:
    """The CUDA of the JetPack release that ships ``tensorrt`` (plans for a Jetson), else None (this machine's)."""
    release = next((name for name, version in JETPACK_TENSORRT.items() if version == tensorrt), None)
    return JETPACK_CUDA[release] if release else None


def engines_here(config: CourseConfig, model: OnnxModel) -> dict[str, Path]:
    """The engines the engine stage recorded for ``model`` that run here (precision -> file).

    Only a record made from this very ONNX, on this machine's TensorRT version and GPU, counts: an engine
    runs only where it was built, and one of another export is never paired with this model.
    """
    from course_utils.core.artifacts import EnginesRecord
    from course_utils.core.ledger import Ledger

    installed = tensorrt_version()
    if installed is None:  # no TensorRT: no engine can run (and no GPU query is needed)
        return {}
    record = Ledger(config.workspace).current(EnginesRecord, made_from={"onnx": model.sha256})
    gpu = detect_gpu()
    if record is None or gpu is None or record.tensorrt != installed or record.gpu != gpu.name \
            or record.tools.get("cuda") != cuda_version():
        return {}
    return {precision: ref.resolve(config.workspace) for precision, ref in record.engines.items()}


def build_metrics(builds: dict[str, EngineBuild | EngineBuildError]) -> dict[str, Any]:
    """The ledger's build figures: seconds per engine, the three timing-cache builds, and what was skipped."""
    done = {p: b for p, b in builds.items() if isinstance(b, EngineBuild)}
    timed = next((b.extra for b in done.values() if b.extra), {})
    return {"build_seconds": {f"tensorrt_{p}": round(b.seconds, 3) for p, b in done.items()},
            "timing_cache_builds": {k: round(v, 3) for k, v in timed.items()},
            "skipped_engines": {p: str(b) for p, b in builds.items() if isinstance(b, EngineBuildError)}}


@dataclass
class EnginesResult:
    """The engine stage's outcome: the plan per precision for ``target``, what was built here, the record."""

    model: OnnxModel
    target: str
    gpu: Gpu
    plans: dict[str, EnginePlan | EngineBuildError]
    builds: dict[str, EngineBuild | EngineBuildError]
    record: EnginesRecord
    not_built_because: str | None  # None when this machine built (or tried to build) the engines

    @property
    def built(self) -> dict[str, EngineBuild]:
        """The engines that were built or reused, by precision (failed precisions left out)."""
        return {precision: made for precision, made in self.builds.items() if isinstance(made, EngineBuild)}


def merge_metrics(earlier: dict[str, Any], now: dict[str, Any], rebuilt: Sequence[str]) -> dict[str, Any]:
    """The record's build figures after building ``rebuilt``: theirs from ``now``, the other precisions' kept.

    The three timing-cache builds stay those of the call that timed them (an INT8-only call times none).
    """
    def kept(section: str, prefix: str = "") -> dict[str, Any]:
        return {k: v for k, v in earlier.get(section, {}).items() if k.removeprefix(prefix) not in rebuilt}

    return {"build_seconds": {**kept("build_seconds", "tensorrt_"), **now["build_seconds"]},
            "timing_cache_builds": now["timing_cache_builds"] or earlier.get("timing_cache_builds", {}),
            "skipped_engines": {**kept("skipped_engines"), **now["skipped_engines"]}}


def run(config: CourseConfig, plan_for: str | None = None,
        precisions: Sequence[Precision] | None = None) -> EnginesResult:
    """The engine stage: plan the configured precisions (of ``precisions``, default all) and, with TensorRT
    and a GPU here, build them.

    Without TensorRT the plan is for ``JetPack 6.1 / 6.2`` on a Jetson Orin (the commands a Jetson user runs);
    ``plan_for`` plans for another TensorRT version and records nothing. Needs the ONNX stage's record made
    from the model that ships now (else it says to rerun notebook 04). Notebook 05 builds
    ``FLOAT_PRECISIONS``, notebook 06 ``INT8_PRECISIONS``; ``build-engine`` and ``prepare-demo`` build all.
    The saved record keeps the engines a call did not rebuild when they were made from the same ONNX with
    the same TensorRT, GPU and CUDA.
    """
    from course_utils.core.artifacts import EnginesRecord, FileRef
    from course_utils.core.ledger import Ledger, deployed_model
    from course_utils.vision.data import resolve_dataset
    from course_utils.vision.zoo import entry

    ledger = Ledger(config.workspace)
    model = onnx_model(config)
    installed, gpu_here = tensorrt_version(), detect_gpu()
    target = plan_for or installed or JETPACK_TENSORRT["JetPack 6.1 / 6.2"]
    build_here = plan_for is None and installed is not None and gpu_here is not None
    gpu = gpu_here if build_here and gpu_here is not None else JETSON_ORIN
    cuda = None if build_here else jetpack_cuda(target)
    plans = course_plans(config, model, target, gpu, cuda, precisions)
    builds: dict[str, EngineBuild | EngineBuildError] = {}
    not_built_because = None if build_here else (
        f"asked for the plan of TensorRT {plan_for}" if plan_for else
        f"this machine has TensorRT {installed or 'none'} and CUDA GPU {gpu_here.name if gpu_here else 'none'}")
    if build_here:
        transform = entry(deployed_model(ledger, config).backbone).preprocessing.eval_transform()
        builds = build_course_engines(config, resolve_dataset(config), model, transform, precisions)
    built = {p: FileRef.of(b.plan.engine_path, config.workspace) for p, b in builds.items()
             if isinstance(b, EngineBuild)}
    tools = {"tensorrt": installed, "cuda": cuda_version() if build_here else None,
             "polygraphy": package_version("polygraphy")}
    metrics = build_metrics(builds)
    earlier = ledger.current(EnginesRecord, made_from={"onnx": model.sha256})
    if earlier is not None and (earlier.tensorrt, earlier.gpu, earlier.tools.get("cuda")) == (
            installed, gpu.name if build_here else None, tools["cuda"]):
        built = {**{p: ref for p, ref in earlier.engines.items() if p not in plans}, **built}
        metrics = merge_metrics(earlier.metrics, metrics, list(plans))
    record = EnginesRecord(
        engines={p: built[p] for p in PRECISIONS if p in built},
        tensorrt=installed, gpu=gpu.name if build_here else None, made_from={"onnx": model.sha256},
        settings={"engine": config.engine.model_dump(), "planned_for_tensorrt": target}, tools=tools,
        metrics=metrics)
    if plan_for is None:
        ledger.save(record)
    return EnginesResult(model, target, gpu, plans, builds, record, not_built_because)


def plans_text(plans: dict[str, EnginePlan | EngineBuildError]) -> str:
    """Each precision's shell commands, or why it cannot be built, as text to print."""
    lines = []
    for precision, plan in plans.items():
        lines.append(f"# {precision.upper()}")
        if isinstance(plan, EngineBuildError):
            lines.append(f"# skipped: {plan}")
            continue
        if plan.calibrate:
            lines.append("# INT8 scales: the calibration cache that `python -m course_utils build-engine` writes "
                         "(without it Polygraphy would calibrate on random data)")
        lines += shell_commands(plan)
    return "\n".join(lines)
