"""Typed records the stages hand each other: what a stage made, from what, with which settings, measured how.

Every stage ends by saving one record in the workspace's ledger (``course_utils.core.ledger``); the next
stage asks the ledger for the record it needs instead of guessing a path. A record names its files as
``FileRef`` (path inside the workspace + sha256), the upstream artifacts it was made from by their sha256
(``made_from``), the settings and tool versions that matter, and its measured figures (``metrics``).

Two rules follow, and the ledger enforces them:

* a consumer gets an upstream record only if it exists (else ``MissingArtifactError`` names the notebook or
  command that makes it) and, when it says which upstream it needs, only if it was made from that
  upstream (else ``StaleArtifactError`` names what to rerun): artifacts of two different networks are never
  mixed;
* ``ledger.deployed_model`` is the one answer to "which model ships": the pruned model only when the pruning
  stage was made from the current fine-tuned model and met its target, else the fine-tuned model, with the
  reason.

This module imports no PyTorch (the app reads records before it loads any model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from course_utils.core.config import PruneConfig
from course_utils.core.downloads import sha256_file
from course_utils.core.errors import CourseError

# Hashes of files already read, by (path, size, modification time): every consumer checks the files it is
# given, and the app, a notebook or one stage may check the same checkpoint several times.
_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """The sha256 of ``path``, read once per version of the file (keyed by size and modification time)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = sha256_file(path)
    return _HASHES[key]


class MissingArtifactError(CourseError, FileNotFoundError):
    """A stage needs an artifact that no stage has made yet; the message names the notebook or command."""


class StaleArtifactError(CourseError):
    """An artifact was made from another upstream (an older model, another ONNX); the message says what to rerun."""


class FileRef(BaseModel):
    """A file a stage made: its path (relative to the workspace when inside it) and its sha256."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    sha256: str
    size_bytes: int = 0

    @classmethod
    def of(cls, path: str | Path, workspace: str | Path) -> FileRef:
        """Describe ``path`` (hashing it); stored relative to ``workspace`` when it lies inside."""
        path, workspace = Path(path).resolve(), Path(workspace).resolve()
        stored = path.relative_to(workspace) if path.is_relative_to(workspace) else path
        return cls(path=stored.as_posix(), sha256=file_sha256(path), size_bytes=path.stat().st_size)

    def resolve(self, workspace: str | Path) -> Path:
        """The absolute path of the file in ``workspace``."""
        return Path(workspace) / self.path

    @property
    def name(self) -> str:
        """The file's name, for tables (no machine paths in the main view)."""
        return Path(self.path).name

    def problem(self, workspace: str | Path) -> str | None:
        """Why the file cannot be used as recorded (gone, or changed since), or None when it can."""
        path = self.resolve(workspace)
        if not path.exists():
            return f"{self.path} is gone"
        if path.stat().st_size != self.size_bytes or file_sha256(path) != self.sha256:
            return f"{self.path} changed since it was recorded"
        return None


class StageRecord(BaseModel):
    """What one stage made and measured. Subclasses name their stage, their files and who makes them.

    ``made_from`` maps an upstream's role (``"model"``, ``"onnx"`` …) to the sha256 of the file it was made
    from; ``settings`` holds the spec settings that determine the result; ``metrics`` the measured figures
    (accuracies as fractions in [0, 1], times in seconds unless a key ends in ``_ms``).
    """

    model_config = ConfigDict(extra="forbid")

    stage: ClassVar[str] = ""
    made_by: ClassVar[str] = ""  # the notebook and the command that make this record
    registry: ClassVar[dict[str, type[StageRecord]]] = {}

    recorded_at: str = ""
    made_from: dict[str, str] = Field(default_factory=dict)
    settings: dict[str, Any] = Field(default_factory=dict)
    tools: dict[str, str | None] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("stage"):
            StageRecord.registry[cls.stage] = cls

    def files(self) -> dict[str, FileRef]:
        """Every file this record names, by field (dict fields as ``field.key``)."""
        found: dict[str, FileRef] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, FileRef):
                found[name] = value
            elif isinstance(value, dict):
                found.update({f"{name}.{k}": v for k, v in value.items() if isinstance(v, FileRef)})
        return found

    def summary(self) -> dict[str, Any]:
        """The record as rows for a table: metrics first, then file names and origins (no paths, no hashes)."""
        rows: dict[str, Any] = dict(self.metrics)
        rows.update({f"file: {role}": ref.name for role, ref in self.files().items()})
        for name in type(self).model_fields:
            if name not in StageRecord.model_fields and not isinstance(getattr(self, name), (FileRef, dict)):
                rows.setdefault(name, getattr(self, name))
        return rows


# --- Stages that measure, and make no file later stages use -------------------------------------------------


class EnvironmentRecord(StageRecord):
    stage: ClassVar[str] = "environment"
    made_by: ClassVar[str] = "notebook 00"


class ZooRecord(StageRecord):
    stage: ClassVar[str] = "zoo"
    made_by: ClassVar[str] = "notebook 01"


class StoryRecord(StageRecord):
    stage: ClassVar[str] = "story"
    made_by: ClassVar[str] = "notebook 08"


class ImagegenRecord(StageRecord):
    stage: ClassVar[str] = "imagegen"
    made_by: ClassVar[str] = "notebook 09"


class AppRecord(StageRecord):
    stage: ClassVar[str] = "app"
    made_by: ClassVar[str] = "notebook 10"


class SpeechRecord(StageRecord):
    stage: ClassVar[str] = "speech"
    made_by: ClassVar[str] = "notebook 11"


class CourseRunRecord(StageRecord):
    """The main job itself: which notebooks ran, how long each took."""

    stage: ClassVar[str] = "course"
    made_by: ClassVar[str] = "`make course` (`python -m course_utils run-all`)"


# --- The model and its deployments ----------------------------------------------------------------------------


class FinetuneRecord(StageRecord):
    """The fine-tuned classifier (``checkpoint``) and how well it does on the validation split."""

    stage: ClassVar[str] = "finetune"
    made_by: ClassVar[str] = "notebook 02 (`python -m course_utils train`)"

    checkpoint: FileRef
    backbone: str
    dataset: str
    classes: list[str]
    weights: str = ""


class PruneRecord(StageRecord):
    """The kept pruned model, made from the fine-tuned checkpoint ``made_from["finetuned"]``, and its verdict."""

    stage: ClassVar[str] = "prune"
    made_by: ClassVar[str] = "notebook 03 (`python -m course_utils prune`)"

    model: FileRef
    meets_target: bool  # ``pruning_pays`` under the targets of ``target``
    target: str  # the target in words, e.g. "≥ 40% fewer MACs within 1 point of top-1"
    macs_reduction: float = 0.0
    top1_drop: float = 1.0  # unpruned top-1 minus the kept model's, after retraining



def pruning_pays(macs_reduction: float, top1_drop: float, targets: PruneConfig) -> bool:
    """TAO's "prune, retrain, recover" as a rule: at least ``target_macs_reduction`` fewer MACs, within
    ``max_top1_drop`` of the unpruned top-1. The one place the course decides whether a pruned model ships."""
    return macs_reduction >= targets.target_macs_reduction and top1_drop <= targets.max_top1_drop


def target_words(targets: PruneConfig) -> str:
    """The pruning target in words, as the record, the notebook and the report say it."""
    return (f"≥ {targets.target_macs_reduction:.0%} fewer MACs within {targets.max_top1_drop * 100:g} "
            "point(s) of the unpruned top-1")


class DeployedModel(BaseModel):
    """The model every deployment stage starts from: which one ships, its file, and why."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["finetuned", "pruned"]
    model: FileRef
    backbone: str
    classes: list[str]
    reason: str

    @property
    def sha256(self) -> str:
        """The hash every artifact made from this model records as ``made_from["model"]``."""
        return self.model.sha256


class OnnxRecord(StageRecord):
    """The deployed model exported with a dynamic batch (``raw``) and optimized (``optimized``)."""

    stage: ClassVar[str] = "onnx"
    made_by: ClassVar[str] = "notebook 04 (`python -m course_utils export`)"

    raw: FileRef
    optimized: FileRef
    source: Literal["finetuned", "pruned", "given"]
    reason: str = ""  # why this model ships (``DeployedModel.reason`` when it was exported)
    backbone: str
    input_name: str
    output_name: str
    input_size: int


class EnginesRecord(StageRecord):
    """TensorRT engines built here from ``made_from["onnx"]`` (precision -> engine), with their build times.

    ``engines`` is empty where this machine has no TensorRT or GPU; no plan is stored.
    """

    stage: ClassVar[str] = "engines"
    made_by: ClassVar[str] = "notebooks 05 (FP32, FP16) and 06 (INT8) (`python -m course_utils build-engine`)"

    engines: dict[str, FileRef] = Field(default_factory=dict)
    tensorrt: str | None = None
    gpu: str | None = None


class BenchmarkRecord(StageRecord):
    """The final benchmark: latency, throughput and top-1 of every runtime and precision of the deployed model
    on this machine (``course_utils.deploy.final_benchmark``); ``made_from`` names every file it measured."""

    stage: ClassVar[str] = "benchmark"
    made_by: ClassVar[str] = "notebook 07's final benchmark (`python -m course_utils benchmark`)"


class DeviceRunRecord(StageRecord):
    """Figures measured on another machine (a Jetson running the deploy kit), merged by ``import-results``.

    ``metrics`` has the benchmark record's shape (runtime key -> ``latency_ms_p50_b1`` …, ``val_top1``), so
    the report shows these rows beside this machine's, marked with ``device``. ``made_from["onnx"]`` is the
    optimized ONNX the kit carried.
    """

    stage: ClassVar[str] = "device_run"
    made_by: ClassVar[str] = ("the Jetson deploy kit (`python -m course_utils jetson-kit`, run on the device, "
                              "then `python -m course_utils import-results FILE`)")

    device: str  # in words, e.g. "Jetson Xavier NX (JetPack 5.1, TensorRT 8.5.2, power mode 20W)"
    tensorrt: str | None = None


class PtqRecord(StageRecord):
    """INT8 models made from ``made_from["onnx"]``: the fastest on ONNX Runtime CPU, and the Q/DQ ones for TensorRT."""

    stage: ClassVar[str] = "ptq"
    made_by: ClassVar[str] = "notebook 06 (`python -m course_utils quantize`)"

    cpu_int8: FileRef | None = None
    tensorrt_qdq: FileRef | None = None  # FP32 between the Q/DQ pairs: measured here, built by TensorRT 10.x
    tensorrt_qdq_fp16: FileRef | None = None  # the same scales, FP16 between: what strongly typed TensorRT 11 builds

    def best_cpu(self) -> dict[str, Any]:
        """The figures of the variant saved as ``cpu_int8`` (its ``name`` included)."""
        name = self.metrics["best_cpu_variant"]
        return {"name": name, **self.metrics["variants"][name]}


class QatRecord(StageRecord):
    """The quantization-aware-trained model of ``made_from["model"]``, exported as Q/DQ ONNX."""

    stage: ClassVar[str] = "qat"
    made_by: ClassVar[str] = "notebook 07 (`python -m course_utils qat`)"

    onnx: FileRef


def rerun_hint(kind: type[StageRecord]) -> str:
    """``run notebook 02 (`python -m course_utils train`)``: how to make a record of ``kind``."""
    return f"run {kind.made_by}"
