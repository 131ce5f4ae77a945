"""Stage 04: export the deployed model to ONNX with a dynamic batch, verify it, optimize it, cache it.

``run(config)`` is the stage in one call: it exports ``core.ledger.deployed_model``'s model (the pruned
model only when it met its target, else the fine-tuned model) with ``course_onnx``, which checks the export
against PyTorch in ONNX Runtime at batch 1, 3 and 8, optimizes the graph with the steps of
``course_utils.deploy.graph_optimize``, and keeps the result under ``<workspace>/onnx/``, keyed by the model's
weights, the exporter, the opset, the pipeline and the tools' versions: a rerun reuses what is valid
and rebuilds what is stale. ``run`` then times the optimized graph on ONNX Runtime CPU and saves the
stage's ``OnnxRecord``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from course_utils.core.atomic import write_json_atomic
from course_utils.core.config import CourseConfig
from course_utils.core.errors import CourseError
from course_utils.deploy.graph_optimize import (
    COURSE_PIPELINE,
    SINGLE_TOOLS,
    GraphStats,
    Parity,
    ParityChecker,
    StepRecord,
    graph_stats,
    optimize_graph,
    remove_onnx,
    save_onnx,
    tool_versions,
)

if TYPE_CHECKING:
    from course_utils.core.artifacts import DeployedModel, OnnxRecord

Exporter = Literal["torchscript", "dynamo"]
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
BATCH_DIM = "batch"
TRACE_BATCH = 2  # exporters turn a traced batch of 1 into a constant; 2 keeps the batch dimension symbolic
DYNAMO_MIN_OPSET = 18  # the dynamo exporter's lowest native opset; below it, it falls back to 18 on its own
LATENCY_BATCHES = (1, 4, 8)
ARTIFACT_FORMAT = 1  # bump when the layout of the artifacts folder changes
logger = logging.getLogger(__name__)


class ExportError(CourseError, RuntimeError):
    """An export that cannot serve the course (for example a batch dimension baked in as a constant)."""


def effective_opset(exporter: Exporter, opset: int) -> int:
    """The opset an exporter really writes: the dynamo exporter writes at least opset 18."""
    return max(opset, DYNAMO_MIN_OPSET) if exporter == "dynamo" else opset


def exporter_options(exporter: Exporter) -> dict[str, bool]:
    """What ``torch.onnx.export`` needs to run ``exporter``: ``{"dynamo": ...}`` on torch >= 2.5, which added it.

    Before 2.5 (JetPack 6.0's torch 2.3 and 2.4), ``torch.onnx.export`` is the TorchScript exporter alone and
    the dynamo one is another, experimental API (``torch.onnx.dynamo_export``): the course refuses it there.
    """
    import inspect

    import torch

    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        return {"dynamo": exporter == "dynamo"}
    if exporter == "dynamo":
        raise ExportError(f"The dynamo exporter needs torch 2.5 or later, and this is torch {torch.__version__}: "
                          "set export.exporter=torchscript.")
    return {}


def _uses_mmpretrain(model: Any) -> bool:
    return any(type(module).__module__.startswith("mmpretrain") for module in model.modules())


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Tracer warnings and the dynamo exporter's progress lines say nothing a learner can act on here."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch_onnx_logger = logging.getLogger("torch.onnx")
        level = torch_onnx_logger.level
        torch_onnx_logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            torch_onnx_logger.setLevel(level)


def export_onnx(model: Any, path: Path, input_size: int, exporter: Exporter = "torchscript", opset: int = 17,
                trace_batch: int = TRACE_BATCH) -> Path:
    """Export ``model`` (images ``[batch, 3, input_size, input_size]`` → logits) with a dynamic batch.

    ``exporter="torchscript"`` traces the Python code once (mature, every opset from 7, but it records
    Python numbers as constants); ``"dynamo"`` captures the graph with ``torch.export`` (the maintained
    path, symbolic shapes, smaller graphs, opset 18 and up). The input is named ``images`` and the output
    ``logits``; mmpretrain's Swin is patched first (see ``compat.patch_swin_window_reverse``). Weights go
    to external data when the model passes 2 GB.
    """
    import torch

    if trace_batch < 2:
        raise ValueError(f"trace_batch={trace_batch}: trace with a batch of at least 2. Exporters specialise a "
                         "batch of 1 (the dynamo exporter silently), and the ONNX graph then accepts batch 1 only.")
    if exporter not in ("torchscript", "dynamo"):
        raise ValueError(f"Unknown exporter {exporter!r}: choose 'torchscript' or 'dynamo' (export.exporter).")
    options = exporter_options(exporter)
    if _uses_mmpretrain(model):
        from course_utils.vision.compat import patch_swin_window_reverse

        patch_swin_window_reverse()
    model = model.eval()
    example = torch.randn(trace_batch, 3, input_size, input_size)
    with _quiet_export(), torch.no_grad():
        if exporter == "dynamo":
            program = torch.onnx.export(
                model, (example,), **options, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                opset_version=effective_opset(exporter, opset), dynamic_shapes=({0: torch.export.Dim(BATCH_DIM)},),
                optimize=True, verbose=False)
            assert program is not None  # torch.onnx.export returns the program when not given a file
            onnx_model = program.model_proto
        else:
            onnx_model = _torchscript_export(model, example, opset)
    save_onnx(onnx_model, path)
    check_dynamic_batch(path)
    return Path(path)


def _torchscript_export(model: Any, example: Any, opset: int) -> Any:
    """Trace with the TorchScript-based exporter into a temporary folder (it writes external data itself
    past 2 GB) and load the result."""
    import tempfile

    import onnx
    import torch

    with tempfile.TemporaryDirectory(prefix="course-export-") as folder:
        target = Path(folder) / "model.onnx"
        torch.onnx.export(model, (example,), str(target), **exporter_options("torchscript"),
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset,
                          dynamic_axes={INPUT_NAME: {0: BATCH_DIM}, OUTPUT_NAME: {0: BATCH_DIM}})
        return onnx.load(str(target))


def batch_dimension(path: Path) -> str | int:
    """The first dimension of the graph's input: a name (dynamic) or a number (baked in at export)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    return dim.dim_param or dim.dim_value


def check_dynamic_batch(path: Path) -> None:
    """Raise ``ExportError`` unless the graph's input and output both have a symbolic batch dimension."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for value in (model.graph.input[0], model.graph.output[0]):
        dim = value.type.tensor_type.shape.dim[0]
        if not dim.dim_param:
            raise ExportError(f"{path}: {value.name!r} has a static batch of {dim.dim_value}. Trace with a batch of "
                              "2 or more and declare the batch dynamic (dynamic_axes or dynamic_shapes).")


def model_sha256(model: Any) -> str:
    """A hash of a model's weights and buffers (names, dtypes, shapes, values): what an export depends on."""
    import torch

    digest = hashlib.sha256(type(model).__name__.encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def randomize_zero_weights(model: Any, std: float = 0.02, seed: int = 0) -> Any:
    """Give every all-zero weight matrix random values; returns ``model``.

    mmpretrain zero-initialises ViT-style heads, so a random-weight model outputs exactly zero and any
    comparison with it passes without proving anything. Benchmarks and tests of random-weight models
    call this first.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1 and not parameter.abs().max():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return model


# ------------------------------------------------------------------------------------------ stage


def onnx_dir(config: CourseConfig) -> Path:
    """Where the stage keeps its artifacts: ``<workspace>/onnx``."""
    return config.workspace / "onnx"


def artifact_key(model_digest: str, exporter: Exporter, opset: int, input_size: int,
                 pipeline: Sequence[str] = COURSE_PIPELINE) -> str:
    """A short hash of everything that determines the stage's files; a change in any of them rebuilds."""
    settings = {"model": model_digest, "exporter": exporter, "opset": opset, "input_size": input_size,
                "pipeline": list(pipeline), "singles": list(SINGLE_TOOLS), "tools": tool_versions(),
                "format": ARTIFACT_FORMAT, "input": INPUT_NAME, "output": OUTPUT_NAME}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class OnnxArtifacts:
    """The stage's files and figures: the raw and optimized ONNX and how every step changed the graph.

    ``steps`` has one row per step run (``run`` is ``"single"`` for a tool alone on the raw export,
    ``"pipeline"`` for the course's chain); ``chosen`` names the row whose file became ``optimized_path``.
    """

    key: str
    backbone: str
    source: str
    model_sha256: str
    exporter: str
    opset: int
    input_name: str
    output_name: str
    input_size: int
    raw_path: Path
    optimized_path: Path
    nodes_raw: int
    nodes_optimized: int
    ops_raw: dict[str, int]
    ops_optimized: dict[str, int]
    size_raw_bytes: int
    size_optimized_bytes: int
    parity: Parity
    chosen: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    export_seconds: float = 0.0
    reused: bool = False

    def to_json(self) -> dict[str, Any]:
        """The manifest written beside the files (paths as strings)."""
        data = asdict(self)
        data.update(raw_path=str(self.raw_path), optimized_path=str(self.optimized_path))
        data.pop("reused")
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> OnnxArtifacts:
        """Rebuild from a manifest written by ``to_json``."""
        data = dict(data)
        data["parity"] = Parity(**{**data["parity"], "batches": tuple(data["parity"]["batches"])})
        data.update(raw_path=Path(data["raw_path"]), optimized_path=Path(data["optimized_path"]))
        return cls(**data, reused=True)

    def stats(self, which: Literal["raw", "optimized"]) -> GraphStats:
        """Node count, op histogram and size of the raw or the optimized graph."""
        if which == "raw":
            return GraphStats(self.nodes_raw, self.ops_raw, self.size_raw_bytes)
        return GraphStats(self.nodes_optimized, self.ops_optimized, self.size_optimized_bytes)


def _step_row(run: str, record: StepRecord) -> dict[str, Any]:
    parity = record.parity
    return {"run": run, "step": record.step, "nodes": record.stats.nodes, "size_bytes": record.stats.size_bytes,
            "ops": record.stats.ops, "seconds": round(record.seconds, 3), "kept": record.kept, "note": record.note,
            "parity_passed": parity.passed if parity else None,
            "parity_max_abs_diff": parity.max_abs_diff if parity else None,
            "parity_max_rel_diff": parity.max_rel_diff if parity else None}


def _read_manifest(path: Path, key: str) -> OnnxArtifacts | None:
    if not path.exists():
        return None
    try:
        artifacts = OnnxArtifacts.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, TypeError, KeyError):
        return None
    files_present = artifacts.raw_path.exists() and artifacts.optimized_path.exists()
    return artifacts if artifacts.key == key and files_present else None


def course_onnx(config: CourseConfig, model: Any, rebuild: bool = False, source: str = "given") -> OnnxArtifacts:
    """A model exported, verified and optimized, reused when still valid (``run`` calls it on the deployed model).

    ``source`` (``"pruned"``, ``"finetuned"``) says where the model came from. Artifacts live in
    ``<workspace>/onnx/<backbone>-<key>/`` (``raw.onnx``, ``optimized.onnx``, ``manifest.json``); the key
    covers the weights, exporter, opset, input size, pipeline and tool versions, so a change to any of
    them builds a fresh folder while an unchanged rerun returns at once.
    """
    import onnx

    model = model.eval()
    input_size = int(model.preprocessing.input_size)
    exporter: Exporter = config.export.exporter
    opset = effective_opset(exporter, config.export.opset)
    digest = model_sha256(model)
    key = artifact_key(digest, exporter, opset, input_size)
    folder = onnx_dir(config) / f"{model.backbone.replace('/', '_')}-{key}"
    manifest = folder / "manifest.json"
    if not rebuild and (cached := _read_manifest(manifest, key)) is not None:
        return cached
    if exporter == "dynamo" and config.export.opset < DYNAMO_MIN_OPSET:
        logger.warning("The dynamo exporter writes opset %d or later; exporting at opset %d instead of %d.",
                       DYNAMO_MIN_OPSET, opset, config.export.opset)
    shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    raw = export_onnx(model, folder / "raw.onnx", input_size, exporter, opset)
    export_seconds = time.perf_counter() - started
    checker = ParityChecker(model, input_size, INPUT_NAME, OUTPUT_NAME, threads=config.benchmark.threads)
    result = optimize_graph(raw, checker, folder / "steps")
    optimized = folder / "optimized.onnx"
    save_onnx(onnx.load(str(result.chosen.path)), optimized)
    if result.chosen.path != raw:
        remove_onnx(result.chosen.path)  # type: ignore[arg-type]
    shutil.rmtree(folder / "steps", ignore_errors=True)
    raw_stats, optimized_stats = graph_stats(raw), graph_stats(optimized)
    artifacts = OnnxArtifacts(
        key=key, backbone=model.backbone, source=source, model_sha256=digest, exporter=exporter,
        opset=_graph_opset(optimized), input_name=INPUT_NAME, output_name=OUTPUT_NAME, input_size=input_size,
        raw_path=raw, optimized_path=optimized, nodes_raw=raw_stats.nodes, nodes_optimized=optimized_stats.nodes,
        ops_raw=raw_stats.ops, ops_optimized=optimized_stats.ops, size_raw_bytes=raw_stats.size_bytes or 0,
        size_optimized_bytes=optimized_stats.size_bytes or 0, parity=checker.check(optimized),
        chosen=result.chosen_label,
        steps=[_step_row("raw", result.raw)] + [_step_row("single", r) for r in result.singles]
        + [_step_row("pipeline", r) for r in result.pipeline],
        export_seconds=round(export_seconds, 2))
    write_json_atomic(manifest, artifacts.to_json())
    return artifacts


def _graph_opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def stage_metrics(artifacts: OnnxArtifacts, latency_ms: dict[int, float]) -> dict[str, Any]:
    """The figures the ONNX stage's record keeps (its files, names and input size are fields of the record)."""
    return {
        "exporter": artifacts.exporter, "opset": artifacts.opset, "nodes_raw": artifacts.nodes_raw,
        "nodes_optimized": artifacts.nodes_optimized, "size_raw_mb": round(artifacts.size_raw_bytes / 1e6, 2),
        "size_optimized_mb": round(artifacts.size_optimized_bytes / 1e6, 2),
        "optimization": artifacts.chosen, "parity_max_abs_diff": artifacts.parity.max_abs_diff,
        "parity_max_rel_diff": artifacts.parity.max_rel_diff, "parity_batches": list(artifacts.parity.batches),
        **{f"latency_ms_b{batch}": round(ms, 3) for batch, ms in latency_ms.items()},
    }


@dataclass
class OnnxStageResult:
    """The ONNX stage's outcome: the files and step table (``artifacts``), latency per batch, the record."""

    artifacts: OnnxArtifacts
    latency_ms: dict[int, float]
    record: OnnxRecord
    deployed: DeployedModel


def onnx_latency_ms(path: Path, input_size: int, config: CourseConfig,
                    batches: Sequence[int] = LATENCY_BATCHES) -> dict[int, float]:
    """Median milliseconds per call of an ONNX model on ONNX Runtime CPU, per batch (the course's one timer)."""
    from course_utils.core.timing import measure_latency
    from course_utils.deploy.runtimes import OrtRunner

    with OrtRunner(path, threads=config.benchmark.threads) as runner:
        return {batch: measure_latency(runner, batch, input_size, config.benchmark.warmup,
                                       config.benchmark.iterations).p50_ms for batch in batches}


def run(config: CourseConfig, rebuild: bool = False) -> OnnxStageResult:
    """The ONNX stage: export the deployed model (``deployed_model``), verify, optimize, time it, record it.

    Notebook 04, ``python -m course_utils export`` and ``prepare-demo`` call this. It needs the fine-tuning
    stage's record (else it says which notebook to run) and never trains anything itself.
    """
    from course_utils.core.artifacts import FileRef, OnnxRecord
    from course_utils.core.ledger import Ledger
    from course_utils.vision.deployment import load_deployed

    model, deployed = load_deployed(config)
    artifacts = course_onnx(config, model, rebuild=rebuild, source=deployed.kind)
    latency = onnx_latency_ms(artifacts.optimized_path, artifacts.input_size, config)
    record = Ledger(config.workspace).save(OnnxRecord(
        raw=FileRef.of(artifacts.raw_path, config.workspace),
        optimized=FileRef.of(artifacts.optimized_path, config.workspace), source=deployed.kind,
        reason=deployed.reason,
        backbone=artifacts.backbone, input_name=artifacts.input_name, output_name=artifacts.output_name,
        input_size=artifacts.input_size, made_from={"model": deployed.sha256},
        settings={"export": config.export.model_dump()}, tools={name: v for name, v in tool_versions().items()},
        metrics=stage_metrics(artifacts, latency)))
    return OnnxStageResult(artifacts, latency, record, deployed)


# --------------------------------------------------------------------------------- notebook helpers


def steps_markdown(artifacts: OnnxArtifacts) -> str:
    """The step table as Markdown: nodes, change, size, parity and time of every step."""
    lines = ["| run | step | nodes | Δ nodes | size MB | max rel. diff | parity | kept | s |",
             "|---|---|---:|---:|---:|---:|---|---|---:|"]
    previous = artifacts.nodes_raw
    for row in artifacts.steps:
        if row["run"] != "pipeline":
            previous = artifacts.nodes_raw
        delta = row["nodes"] - previous
        rel = "–" if row["parity_max_rel_diff"] is None else f"{row['parity_max_rel_diff']:.1e}"
        passed = "–" if row["parity_passed"] is None else "✅" if row["parity_passed"] else "❌"
        size = "–" if row["size_bytes"] is None else f"{row['size_bytes'] / 1e6:.2f}"
        note = f" ({row['note']})" if row["note"] else ""
        lines.append(f"| {row['run']} | {row['step']} | {row['nodes']} | {delta:+d} | {size} | {rel} | {passed} | "
                     f"{'yes' if row['kept'] else 'no' + note} | {row['seconds']:.2f} |")
        if row["run"] == "pipeline" and row["kept"]:
            previous = row["nodes"]
    return "\n".join(lines)


def op_histogram_figure(before: GraphStats, after: GraphStats, top: int = 15) -> Any:
    """Side-by-side bars of the most frequent op types before and after optimization."""
    from matplotlib.figure import Figure

    ops = sorted(set(before.ops) | set(after.ops), key=lambda op: -max(before.ops.get(op, 0), after.ops.get(op, 0)))
    ops = ops[:top][::-1]
    figure = Figure(figsize=(7, 0.32 * len(ops) + 1.2))
    axis = figure.add_subplot()
    positions = range(len(ops))
    axis.barh([p + 0.2 for p in positions], [before.ops.get(op, 0) for op in ops], height=0.4,
              label=f"raw ({before.nodes} nodes)")
    axis.barh([p - 0.2 for p in positions], [after.ops.get(op, 0) for op in ops], height=0.4,
              label=f"optimized ({after.nodes} nodes)")
    axis.set_yticks(list(positions), ops)
    axis.set_xlabel("nodes of this op type")
    axis.legend(loc="lower right")
    figure.tight_layout()
    return figure
