"""ONNX graph optimization as composable, checked steps.

A step is a function ``onnx.ModelProto -> onnx.ModelProto`` with a name: Polygraphy's constant
folding (``polygraphy surgeon sanitize --fold-constants``), onnxslim, onnxsim, and the course's own
ONNX-GraphSurgeon passes. ``run_steps`` applies steps one at a time, from file to file, and after each
records the node count, the op histogram, the file size and numerical parity with PyTorch, measured by
Polygraphy's ``Comparator`` (ONNX Runtime against a CPU PyTorch runner). A step that adds nodes or
breaks parity is rolled back, so a pipeline never ends worse than it started.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import io
import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from course_utils.core.atomic import atomic_path
from course_utils.core.errors import CourseError
from course_utils.core.lazy import lazy_import

ModelProto = Any  # onnx.ModelProto; onnx is imported where it is used
PARITY_BATCHES = (1, 3, 8)
PARITY_TOLERANCE = 1e-4  # largest |onnx - torch| allowed, relative to the largest |torch| logit
EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes of weights: below protobuf's 2 GB limit, with room for the graph
logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class GraphStats:
    """What a graph is made of: node count, op-type histogram (most frequent first), bytes on disk."""

    nodes: int
    ops: dict[str, int]
    size_bytes: int | None = None


def graph_stats(model: ModelProto | Path) -> GraphStats:
    """Node count and op histogram of a model or ONNX file (with the file's size, external data included)."""
    import onnx

    size = None
    if isinstance(model, (str, Path)):
        path = Path(model)
        size = sum(p.stat().st_size for p in [path, *external_data_files(path)])
        model = onnx.load(path, load_external_data=False)
    ops = collections.Counter(node.op_type for node in model.graph.node)
    return GraphStats(len(model.graph.node), dict(ops.most_common()), size)


def external_data_files(path: Path) -> list[Path]:
    """The external-data files an ONNX file refers to (none for a self-contained file)."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    model = onnx.load(path, load_external_data=False)
    names = {ExternalDataInfo(t).location for t in model.graph.initializer if uses_external_data(t)}
    return [path.parent / name for name in sorted(names)]


def histogram_delta(before: GraphStats, after: GraphStats) -> dict[str, int]:
    """How many nodes of each op type a step added (positive) or removed (negative)."""
    ops = set(before.ops) | set(after.ops)
    delta = {op: after.ops.get(op, 0) - before.ops.get(op, 0) for op in ops}
    return dict(sorted(((op, d) for op, d in delta.items() if d), key=lambda item: (item[1], item[0])))


# ------------------------------------------------------------------------------------------- steps


@dataclass(frozen=True)
class GraphStep:
    """One optimization step: a name, the function that rewrites a model, and the tool it comes from."""

    name: str
    apply: Callable[[ModelProto], ModelProto]
    tool: str
    description: str


def polygraphy_sanitize(model: ModelProto) -> ModelProto:
    """``polygraphy surgeon sanitize --fold-constants`` through Polygraphy's Python API.

    Shape inference, then constant folding repeated until the node count stops falling: every
    subgraph whose inputs are all known before inference (weights, static shapes) is computed once
    and replaced by its result.
    """
    lazy_import("polygraphy.backend.onnx", "deploy", "Polygraphy constant folding")
    from polygraphy.backend.onnx import FoldConstants, InferShapes

    with quiet_tools():
        return FoldConstants(InferShapes(model))()


def onnxslim_step(model: ModelProto) -> ModelProto:
    """onnxslim: constant folding, dead-code removal and pattern fusions (e.g. Pad into Conv, GELU)."""
    onnxslim = lazy_import("onnxslim", "deploy", "The onnxslim step")

    with quiet_tools():
        return onnxslim.slim(model)


def onnxsim_step(model: ModelProto) -> ModelProto:
    """onnx-simplifier: constant folding and onnxoptimizer's fusions, checked by onnxsim itself."""
    onnxsim = lazy_import("onnxsim", "deploy", "The onnxsim step")

    with quiet_tools(), _native_output_silenced():
        simplified, ok = onnxsim.simplify(model)
    if not ok:
        raise RuntimeError("onnxsim's own check of the simplified model failed; skip the onnxsim step.")
    return simplified


def course_passes(model: ModelProto) -> ModelProto:
    """The course's ONNX-GraphSurgeon passes, for what the three tools leave undone (measured in
    ``benchmarks/onnx_optimize.py``; passes that never removed a node there were dropped).

    1. Reshape targets computed at run time from ``Shape`` (for the dynamic batch) become constants with
       ``-1`` for the one unknown entry, and the ``Shape → Gather → Unsqueeze → Concat`` chains feeding
       them disappear. The dynamo exporter writes one per reshape of a transformer.
    2. Reshape → Transpose → Reshape that merges the leading axes, permutes the others and splits the
       leading axes back is one Transpose. The dynamo exporter writes this around every attention
       ``k.transpose(-2, -1)``, because it lowers batched matmuls to 3-D ``bmm``.
    """
    import onnx
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(model))
    _constant_reshape_targets(graph)
    _fold_reshape_transpose_reshape(graph)
    graph.cleanup().toposort()
    return gs.export_onnx(graph)


STEPS: dict[str, GraphStep] = {step.name: step for step in [
    GraphStep("sanitize", polygraphy_sanitize, "polygraphy",
              "polygraphy surgeon sanitize --fold-constants (the course's reference)"),
    GraphStep("onnxslim", onnxslim_step, "onnxslim", "onnxslim.slim"),
    GraphStep("onnxsim", onnxsim_step, "onnxsim", "onnxsim.simplify"),
    GraphStep("course-passes", course_passes, "onnx_graphsurgeon",
              "the course's GraphSurgeon passes: constant Reshape targets, Reshape-Transpose-Reshape → Transpose"),
]}
SINGLE_TOOLS = ("sanitize", "onnxsim", "onnxslim")
COURSE_PIPELINE = ("sanitize", "onnxslim", "course-passes", "onnxsim")


def tool_versions() -> dict[str, str]:
    """Versions of every package that shapes the exported and optimized graphs (part of the cache key)."""
    from importlib.metadata import PackageNotFoundError, version

    names = ("torch", "onnx", "onnxscript", "onnxruntime", "polygraphy", "onnx-graphsurgeon", "onnxslim", "onnxsim")
    versions = {}
    for name in names:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "absent"
    return versions


# ------------------------------------------------------------------------------ GraphSurgeon passes


def _values(tensor: Any, depth: int = 0) -> list[int | None] | None:
    """The entries of a 1-D int tensor where known before inference (``None`` where only run time knows).

    Returns ``None`` when not even the length is known. ``Shape`` reads the inferred static dimensions;
    Gather, Slice, Concat, (Un)Squeeze and Cast are followed; anything else contributes unknowns.
    """
    import onnx_graphsurgeon as gs

    if isinstance(tensor, gs.Constant):
        values = np.asarray(tensor.values)
        return [int(v) for v in values.reshape(-1)] if values.ndim <= 1 else None
    if depth > 32 or len(tensor.inputs) != 1:
        return None
    node = tensor.inputs[0]
    if node.op == "Constant":
        values = np.asarray(node.attrs["value"].values)
        return [int(v) for v in values.reshape(-1)] if values.ndim <= 1 else None
    if node.op == "Shape":
        dims = node.inputs[0].shape
        if dims is None:
            return None
        start, end = node.attrs.get("start", 0), node.attrs.get("end", len(dims))
        # A zero dimension is a runtime value too: Reshape reads a 0 in its target as "copy".
        return [int(d) if isinstance(d, (int, np.integer)) and d > 0 else None for d in dims][start:end]
    if node.op in {"Unsqueeze", "Squeeze", "Cast", "Identity"}:
        return _values(node.inputs[0], depth + 1)
    if node.op == "Concat" and node.attrs.get("axis", 0) in (0, -1):
        parts = [_values(t, depth + 1) for t in node.inputs]
        return None if any(p is None for p in parts) else [v for p in parts for v in p]  # type: ignore[union-attr]
    if node.op == "Gather" and node.attrs.get("axis", 0) == 0 and isinstance(node.inputs[1], gs.Constant):
        data = _values(node.inputs[0], depth + 1)
        if data is not None:
            return [data[int(i)] for i in np.asarray(node.inputs[1].values).reshape(-1)]
    if node.op == "Slice" and all(isinstance(t, gs.Constant) for t in node.inputs[1:]):
        data = _values(node.inputs[0], depth + 1)
        if data is not None:
            starts, ends, *rest = (int(np.asarray(t.values).reshape(-1)[0]) for t in node.inputs[1:])
            step = rest[1] if len(rest) > 1 else 1
            return data[slice(starts, ends, step)]
    shape = tensor.shape
    if shape is not None and len(shape) <= 1 and all(isinstance(d, (int, np.integer)) for d in shape):
        return [None] * (int(shape[0]) if shape else 1)
    return None


def _constant_reshape_targets(graph: Any) -> None:
    """Reshape targets with at most one entry unknown before inference become constants (``-1`` there).

    Exact: Reshape keeps the element count, so with every other entry fixed the one ``-1`` can only
    be the value the run-time computation would have produced.
    """
    import onnx_graphsurgeon as gs

    for node in graph.nodes:
        if node.op != "Reshape" or isinstance(node.inputs[1], gs.Constant):
            continue
        values = _values(node.inputs[1])
        if values is None or sum(v is None or v == -1 for v in values) > 1:
            continue
        target = np.array([-1 if v is None else v for v in values], dtype=np.int64)
        node.inputs[1] = gs.Constant(f"{node.name}_shape", target)


def _constant_ints(tensor: Any) -> list[int] | None:
    import onnx_graphsurgeon as gs

    return [int(v) for v in np.asarray(tensor.values).reshape(-1)] if isinstance(tensor, gs.Constant) else None


def _fold_reshape_transpose_reshape(graph: Any) -> None:
    """Reshape(x → [-1, tail]) → Transpose(perm keeps axis 0) → Reshape([-1, lead, permuted tail]) → Transpose(x).

    ``x`` has shape ``[b, lead…, tail…]`` (only ``b`` may be unknown). The first Reshape merges ``b`` and
    ``lead`` into one axis, the Transpose leaves that axis in place, and the last Reshape splits it back
    into ``b`` and ``lead``: the three together only permute ``tail``, which one Transpose does.
    """
    for last in graph.nodes:
        if last.op != "Reshape" or len(last.inputs[0].inputs) != 1:
            continue
        transpose = last.inputs[0].inputs[0]
        if transpose.op != "Transpose" or len(transpose.inputs[0].inputs) != 1 or "perm" not in transpose.attrs:
            continue
        first = transpose.inputs[0].inputs[0]
        if first.op != "Reshape":
            continue
        shape, merged, split = first.inputs[0].shape, _constant_ints(first.inputs[1]), _constant_ints(last.inputs[1])
        perm = list(transpose.attrs["perm"])
        if shape is None or merged is None or split is None or perm[0] != 0 or 0 in merged or 0 in split:
            continue
        dims = list(shape)
        lead = len(dims) - len(merged)  # axes 1..lead of x are merged into axis 0 together with b
        if lead < 1 or not all(isinstance(d, (int, np.integer)) for d in dims[1:]):
            continue
        tail = [int(d) for d in dims[lead + 1:]]
        if merged[0] != -1 or merged[1:] != tail or split[0] != -1:
            continue
        if split[1:] != [int(d) for d in dims[1:lead + 1]] + [merged[i] for i in perm[1:]]:
            continue
        last.op = "Transpose"
        source = first.inputs[0]
        last.inputs.clear()
        last.inputs.append(source)
        last.attrs = {"perm": list(range(lead + 1)) + [lead + i for i in perm[1:]]}


# ---------------------------------------------------------------------------------------- parity


@functools.cache
def _cpu_runner_class() -> type:
    BaseRunner = lazy_import("polygraphy.backend.base", "deploy", "The parity check").BaseRunner
    TensorMetadata = lazy_import("polygraphy.common", "deploy", "The parity check").TensorMetadata

    class TorchCpuRunner(BaseRunner):
        """A Polygraphy runner for a PyTorch module on the CPU.

        Polygraphy's own ``PytRunner`` moves inputs to CUDA and iterates over the output tensor
        (splitting a batch of logits into rows), so it cannot check a CPU model; this one can.
        """

        def __init__(self, model: Any, input_name: str, output_name: str, input_shape: Sequence[Any]) -> None:
            super().__init__(name="torch-cpu", prefix="torch-cpu-runner")
            self._model = model
            self._input_name = input_name
            self._output_name = output_name
            self._input_shape = list(input_shape)

        def activate_impl(self) -> None:
            self._model.eval()

        def get_input_metadata_impl(self) -> Any:
            return TensorMetadata().add(self._input_name, np.float32, self._input_shape)

        def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            import torch

            images = torch.from_numpy(np.ascontiguousarray(feed_dict[self._input_name], dtype=np.float32))
            started = time.perf_counter()
            with torch.inference_mode():
                logits = self._model(images)
            self.inference_time = time.perf_counter() - started
            return collections.OrderedDict([(self._output_name, logits.float().numpy())])

        def deactivate_impl(self) -> None:
            pass

    return TorchCpuRunner


def torch_cpu_runner(model: Any, input_name: str, output_name: str, input_size: int) -> Any:
    """A Polygraphy runner (``BaseRunner``) that runs a PyTorch classifier on the CPU."""
    return _cpu_runner_class()(model, input_name, output_name, ["batch", 3, input_size, input_size])


def onnxruntime_session(path: Path, threads: int = 1) -> Any:
    """An ONNX Runtime CPU session for ``path`` with ``threads`` intra-op threads and quiet logging."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class Parity:
    """ONNX Runtime against PyTorch on the same inputs, over every checked batch size."""

    passed: bool
    max_abs_diff: float
    max_rel_diff: float  # max |onnx - torch| / max |torch|
    batches: tuple[int, ...]
    tolerance: float = PARITY_TOLERANCE
    error: str = ""  # set when ONNX Runtime could not run the graph at one of the batch sizes

    def __str__(self) -> str:
        batches = ", ".join(map(str, self.batches))
        if self.error:
            return f"parity ❌ at batch {batches}: ONNX Runtime could not run the graph ({self.error})"
        return (f"parity {'✅' if self.passed else '❌'} at batch {batches}: max |onnx - torch| {self.max_abs_diff:.2g}, "
                f"{self.max_rel_diff:.2g} of the largest logit (tolerance {self.tolerance:.0e})")


class UnverifiableModelError(CourseError, ValueError):
    """A model whose export cannot be checked (its outputs are all zero, so any comparison would pass)."""


class ParityError(CourseError, AssertionError):
    """An ONNX graph whose outputs do not match the PyTorch model's."""


class ParityChecker:
    """Compares ONNX files with a PyTorch model through Polygraphy's ``Comparator``.

    PyTorch runs once, on fixed random inputs at each batch size in ``batches``; each ``check(path)``
    runs ONNX Runtime on the same inputs and compares. A different batch size from the one the model was
    traced with is what catches exports that silently baked the batch in.
    """

    def __init__(self, model: Any, input_size: int, input_name: str = "images", output_name: str = "logits",
                 batches: Sequence[int] = PARITY_BATCHES, tolerance: float = PARITY_TOLERANCE,
                 threads: int = 1, seed: int = 0) -> None:
        Comparator = lazy_import("polygraphy.comparator", "deploy", "The parity check").Comparator

        rng = np.random.default_rng(seed)
        self.batches = tuple(batches)
        self.tolerance = tolerance
        self.threads = threads
        self.input_name = input_name
        self.feeds = [collections.OrderedDict([(input_name, rng.standard_normal((b, 3, input_size, input_size),
                                                                              dtype=np.float32))])
                      for b in self.batches]
        with quiet_tools():
            self.reference = Comparator.run([torch_cpu_runner(model, input_name, output_name, input_size)],
                                            data_loader=self.feeds)
        self.scale = max(float(np.abs(it[output_name]).max()) for _, its in self.reference for it in its)
        if self.scale == 0.0:
            raise UnverifiableModelError("The model's outputs are all zero, so any comparison would pass: give its zero-initialised "
                             "layers random weights first (mmpretrain zero-initialises ViT heads).")

    def check(self, path: Path) -> Parity:
        """Run ``path`` in ONNX Runtime on the reference inputs and compare with PyTorch."""
        OnnxrtRunner = lazy_import("polygraphy.backend.onnxrt", "deploy", "The parity check").OnnxrtRunner
        from polygraphy.comparator import Comparator, CompareFunc, RunResults

        runner = OnnxrtRunner(lambda: onnxruntime_session(path, self.threads), name=f"onnxruntime:{Path(path).name}")
        atol = self.tolerance * max(self.scale, 1e-12)
        with quiet_tools():
            try:
                onnx_results = Comparator.run([runner], data_loader=self.feeds)
            except Exception as error:  # noqa: BLE001 - a graph that cannot run at some batch size fails parity
                message = str(error).strip().splitlines()[-1].removeprefix("Note:").strip()[:300]
                return Parity(False, math.inf, math.inf, self.batches, self.tolerance, message)
            results = RunResults([*self.reference, *onnx_results])
            accuracy = Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=atol, rtol=0.0))
        max_abs = max(float(output.max_absdiff) for result in accuracy for iterations in result.values()
                      for outputs in iterations for output in outputs.values())
        return Parity(bool(accuracy), max_abs, max_abs / max(self.scale, 1e-12), self.batches, self.tolerance)


# ------------------------------------------------------------------------------------- pipelines


@dataclass
class StepRecord:
    """What one step did: graph statistics after it, parity, seconds, and whether it was kept."""

    step: str
    stats: GraphStats
    parity: Parity | None
    seconds: float
    kept: bool
    path: Path | None
    note: str = ""


@dataclass
class Optimization:
    """The result of optimizing a raw export: the chosen file and every step's record."""

    raw: StepRecord
    singles: list[StepRecord]
    pipeline: list[StepRecord]
    chosen: StepRecord
    chosen_label: str  # "course pipeline", or "<tool> alone" when a single tool did better


def save_onnx(model: ModelProto, path: Path, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> Path:
    """Save a model atomically; weights go to ``<name>.data`` beside it when they pass the threshold.

    A protobuf file cannot exceed 2 GB, so larger models must keep their weights as external data
    (TensorRT, ONNX Runtime and Polygraphy all read it; move the two files together). Saving that way
    points ``model``'s tensors at the file, so do not save the same object elsewhere afterwards.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = sum(_tensor_bytes(t) for t in model.graph.initializer)
    data_name = f"{path.name}.data"
    (path.parent / data_name).unlink(missing_ok=True)
    if weights <= external_data_threshold:
        with atomic_path(path) as tmp:
            onnx.save_model(model, str(tmp))
        return path
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}.") as folder:
        onnx.save_model(model, str(Path(folder) / path.name), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
        os.replace(Path(folder) / data_name, path.parent / data_name)
        os.replace(Path(folder) / path.name, path)
    return path


def _tensor_bytes(tensor: Any) -> int:
    import onnx

    if tensor.raw_data:
        return len(tensor.raw_data)
    return int(np.prod(tensor.dims, dtype=np.int64)) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


def remove_onnx(path: Path) -> None:
    """Delete an ONNX file and the external data it refers to."""
    path = Path(path)
    if path.exists():
        for extra in external_data_files(path):
            extra.unlink(missing_ok=True)
        path.unlink()


@contextlib.contextmanager
def quiet_tools() -> Iterator[None]:
    """Silence the tools' chatter (Polygraphy's logger, ONNX Runtime's warnings, printed tables); their
    exceptions still propagate with their messages."""
    import onnxruntime as ort
    G_LOGGER = lazy_import("polygraphy.logger", "deploy", "The ONNX graph tools").G_LOGGER

    ort.set_default_logger_severity(3)
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL), warnings.catch_warnings(), \
            contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def _native_output_silenced() -> Iterator[None]:
    """onnxsim's C++ core prints a warning per node it cannot pre-compute (every dynamic-batch node) straight
    to file descriptor 2, past Python's ``sys.stderr``; point descriptors 1 and 2 at /dev/null meanwhile."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def run_steps(source: Path, steps: Sequence[str], work_dir: Path, checker: ParityChecker) -> list[StepRecord]:
    """Apply ``steps`` (names in ``STEPS``) one at a time, each reading the previous file and writing its own.

    After each step: graph statistics and parity. A step that fails, adds nodes or breaks parity is
    rolled back (recorded with ``kept=False`` and the reason) and the next step starts from the last
    good file. One model is in memory at a time, which is what a Jetson's shared memory needs.
    """
    import onnx

    unknown = [name for name in steps if name not in STEPS]
    if unknown:
        raise KeyError(f"Unknown optimization steps {unknown}; choose from {list(STEPS)}.")
    current, current_stats = Path(source), graph_stats(source)
    records = []
    for index, name in enumerate(steps, start=1):
        started = time.perf_counter()
        try:
            model = STEPS[name].apply(onnx.load(current))
        except Exception as error:  # noqa: BLE001 - a tool that cannot handle a graph is skipped, not fatal
            logger.warning("step %s failed on %s: %s", name, current.name, error)
            records.append(StepRecord(name, current_stats, None, time.perf_counter() - started, False, None,
                                      f"failed: {type(error).__name__}: {str(error)[:200]}"))
            continue
        output = save_onnx(model, Path(work_dir) / f"{Path(source).stem}.{index:02d}-{name}.onnx")
        del model
        seconds = time.perf_counter() - started
        stats, parity = graph_stats(output), checker.check(output)
        kept = parity.passed and stats.nodes <= current_stats.nodes
        note = "" if kept else "broke parity" if not parity.passed else f"added {stats.nodes - current_stats.nodes} nodes"
        records.append(StepRecord(name, stats, parity, seconds, kept, output if kept else None, note))
        if kept:
            current, current_stats = output, stats
        else:
            remove_onnx(output)
    return records


def optimize_graph(raw: Path, checker: ParityChecker, work_dir: Path, pipeline: Sequence[str] = COURSE_PIPELINE,
                   singles: Sequence[str] = SINGLE_TOOLS) -> Optimization:
    """Each single tool alone, then the course's pipeline; choose the smallest graph that keeps parity.

    The single tools are the yardstick: the chosen graph never has more nodes than the best of them.
    Files of the steps not chosen are deleted.
    """
    parity = checker.check(raw)
    if not parity.passed:
        raise ParityError(
            f"The raw export {raw} does not match PyTorch at batch sizes {parity.batches} (max relative difference "
            f"{parity.max_rel_diff:.3g}{'; ' + parity.error if parity.error else ''}). Optimizing it would hide a "
            "broken export. When only batch sizes other than the traced one fail, the model computes its batch "
            "size in Python (int(), .item()), which the exporter records as a constant: see "
            "course_utils.vision.compat.patch_swin_window_reverse for the kind of fix it needs.")
    raw_record = StepRecord("raw", graph_stats(raw), parity, 0.0, True, Path(raw))
    single_records = [run_steps(raw, [name], work_dir, checker)[0] for name in singles]
    pipeline_records = run_steps(raw, pipeline, work_dir, checker)
    pipeline_end = next((r for r in reversed(pipeline_records) if r.kept), raw_record)
    candidates = [pipeline_end] + [r for r in single_records if r.kept]
    chosen = min(candidates, key=lambda r: r.stats.nodes)
    for record in single_records + pipeline_records:
        if record.path is not None and record is not chosen:
            remove_onnx(record.path)
    label = f"{chosen.step} alone" if chosen in single_records and chosen is not pipeline_end else "course pipeline"
    return Optimization(raw_record, single_records, pipeline_records, chosen, label)
