"""The Jetson deploy kit: one folder (and a ``.tar.gz``) to copy to the device, and its results merged back.

A Jetson Xavier NX on JetPack 5.1 has Python 3.8 and TensorRT 8.5.2, where the course itself does not install.
The kit carries everything the device needs and nothing it cannot run: the optimized ONNX of the model that
ships (opset 17 at most, which TensorRT 8.5/8.6 parse), its labels, the preprocessing as data, calibration
images from the *training* split and the validation split as uint8 crops made by the course's own
``eval_transform`` (the device normalizes them exactly as torchvision does), any Q/DQ ONNX, a handful of raw
validation images, ``plan.json`` and ``trt_kit.py``: one script for the device's own Python 3.8+ with only
what JetPack ships (``course_utils/deploy/kit_device``). ``plan.json`` is computed from the engine stage's own
routes (``tensorrt_engines.course_plans``) for every TensorRT generation the kit supports, so the device
never decides a route itself. The kit also holds the two places TAO users deploy an engine: DeepStream
``nvinfer`` configs (primary and secondary classifier) and a Triton model repository (plan and ONNX).

``run(config)`` is the stage (notebook 05, ``jetson-kit``, ``prepare-demo``): it writes
``<workspace>/jetson-kit/<onnx sha[:12]>/`` atomically and reuses a kit whose key (the ONNX and Q/DQ hashes,
the script, the settings, the chosen images) and files are unchanged. ``import_results(config, path)``
(``import-results``) checks the device's ``results.json`` and saves it as the ledger's ``DeviceRunRecord``.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from course_utils.core.atomic import atomic_directory, atomic_path, write_json_atomic, write_text_atomic
from course_utils.core.config import CourseConfig
from course_utils.core.errors import CourseError, first_validation_problem

if TYPE_CHECKING:
    from course_utils.core.artifacts import DeviceRunRecord
    from course_utils.deploy.tensorrt_engines import EngineBuildError, EnginePlan, OnnxModel
    from course_utils.vision.zoo import Preprocessing

KIT_FORMAT = 1  # trt_kit.py's KIT_FORMAT: a kit and its script always match
KIT_SCRIPT = Path(__file__).with_name("kit_device") / "trt_kit.py"
# The generations whose build routes differ, each planned with a version a Jetson (or x86 wheel) user has.
GENERATIONS = {"8.5": "8.5.2", "8.6": "8.6.2", "10.x": "10.3.0", "11.x": "11.0.0"}
WEAK_PARSER_MAX_OPSET = 17  # TensorRT 8.5/8.6's ONNX parser documents opset <= 17
DEMO_IMAGES_PER_CLASS = 2
NETWORK_MODE = {"fp32": 0, "int8": 1, "fp16": 2}  # nvinfer's network-mode
TRITON_MAX_BATCH = 8
TritonPlatform = Literal["tensorrt_plan", "onnxruntime_onnx"]


class KitError(CourseError, ValueError):
    """A kit that cannot be made as asked, or device results that cannot be imported; the message says why."""


# --- The files of a kit ------------------------------------------------------------------------------------------


def kit_name(backbone: str) -> str:
    """A model name Triton and file systems accept: ``efficientnet-lite0`` -> ``efficientnet_lite0``."""
    return re.sub(r"[^A-Za-z0-9_]+", "_", backbone).strip("_") or "model"


def onnx_opset(path: Path) -> int:
    """The default-domain opset of an ONNX file (read without its weights)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(op.version for op in model.opset_import if op.domain in ("", "ai.onnx"))


def preprocessing_data(preprocessing: Preprocessing) -> dict[str, Any]:
    """The preprocessing as the device reads it: sizes, mean/std on the 0-255 scale, layout, resize rule."""
    return {"input_size": preprocessing.input_size, "resize_short": preprocessing.resize_short,
            "mean": list(preprocessing.mean), "std": list(preprocessing.std), "layout": "NCHW",
            "color": "RGB", "resize": "bilinear resize of the short edge to resize_short, then a centre crop of "
            "input_size; (x / 255 - mean / 255) / (std / 255) per channel", "dtype": "float32"}


def crop_transform(preprocessing: Preprocessing) -> Any:
    """The course's ``eval_transform`` up to the tensor conversion, as uint8 CHW: resize and crop only.

    The kit stores these crops (a quarter of float32's size) and the device applies ``ToTensor`` +
    ``Normalize`` with the same float32 operations, so its tensors are the course's, bit for bit.
    """
    from torchvision import transforms

    steps = list(preprocessing.eval_transform().transforms)
    if [type(s).__name__ for s in steps[-2:]] != ["ToTensor", "Normalize"]:
        raise KitError("The eval transform no longer ends with ToTensor + Normalize: update the deploy kit, "
                       "whose device script reproduces those two steps.")
    return transforms.Compose([*steps[:-2], transforms.PILToTensor()])


def deepstream_scale_offsets(preprocessing: Preprocessing) -> tuple[float, list[float], float]:
    """nvinfer's ``net-scale-factor`` and ``offsets`` for the course's normalization, and the worst error.

    nvinfer computes ``y = net-scale-factor * (x - offset_c)`` on 0-255 pixels, with one scale for all
    channels; the course divides by each channel's std. The scale is 1 / mean(std) (1 / (255 * mean(std))
    with std on the 0-1 scale); the error is largest at the pixel value farthest from the mean, in the
    channel whose std differs most: ``max_c max(m_c, 255 - m_c) * |1 / mean(std) - 1 / s_c|`` (0 when every
    channel has the same std, as EfficientNet-Lite's 128).
    """
    mean_std = sum(preprocessing.std) / 3
    worst = max(max(m, 255 - m) * abs(1 / mean_std - 1 / s) for m, s in zip(preprocessing.mean, preprocessing.std))
    return 1 / mean_std, list(preprocessing.mean), worst


def deepstream_config(name: str, preprocessing: Preprocessing, calibration_cache: str, secondary: bool,
                      precision: str = "fp16") -> str:
    """A DeepStream ``nvinfer`` config for the model as a primary (whole frame) or secondary (per object)
    classifier; paths are relative to the config file, as nvinfer resolves them."""
    scale, offsets, worst = deepstream_scale_offsets(preprocessing)
    size = preprocessing.input_size
    role = "secondary (per object)" if secondary else "primary (whole frame)"
    lines = [
        f"# DeepStream nvinfer: {name} as a {role} classifier, written by the course's deploy kit.",
        "# nvinfer scales the frame or object to the network size (no short-edge resize + centre crop): crop",
        "# upstream (or use nvdspreprocess) to reproduce the course's preprocessing exactly.",
        f"# One scale for all channels: 1 / mean(std) = {scale:.10g}; the largest difference from the course's",
        f"# per-channel std is {worst:.3g} in normalized units (0 when every channel has the same std).",
        "[property]",
        "gpu-id=0",
        f"net-scale-factor={scale:.10g}",
        "offsets=" + ";".join(f"{o:g}" for o in offsets),
        "model-color-format=0",  # RGB
        "onnx-file=model_softmax.onnx",  # the kit's model.onnx with a Softmax on its logits
        "# INT8 (network-mode=1) reads the calibration cache `python3 trt_kit.py build --precisions int8` writes",
        f"int8-calib-file=../{calibration_cache}",
        "labelfile-path=labels.txt",  # nvinfer classifiers: one line, labels separated by ';'
        f"infer-dims=3;{size};{size}",
        f"batch-size={TRITON_MAX_BATCH}",
        "# 0=FP32, 1=INT8, 2=FP16",
        f"network-mode={NETWORK_MODE[precision]}",
        "network-type=1",  # classifier
        "output-blob-names=probabilities",
        "classifier-threshold=0.5",
        f"gie-unique-id={2 if secondary else 1}",
    ]
    if secondary:
        lines += ["process-mode=2", "operate-on-gie-id=1", "classifier-async-mode=1",
                  "input-object-min-width=32", "input-object-min-height=32"]
    else:
        lines += ["process-mode=1"]
    return "\n".join(lines) + "\n"


def softmax_onnx(source: Path, output: Path, logits: str) -> Path:
    """A copy of the ONNX whose output is the softmax of ``logits`` (``probabilities``): what nvinfer's
    default classifier parser thresholds (it reads probabilities, not logits)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(source))
    graph = model.graph
    old = next(o for o in graph.output if o.name == logits)
    graph.node.append(helper.make_node("Softmax", [logits], ["probabilities"], axis=-1, name="kit_softmax"))
    new = onnx.ValueInfoProto()
    new.CopyFrom(old)
    new.name = "probabilities"
    graph.output.remove(old)
    graph.output.append(new)
    onnx.checker.check_model(model)
    with atomic_path(output) as tmp:
        onnx.save(model, str(tmp))
    return output


def triton_config(name: str, platform: TritonPlatform, model: OnnxModel,
                  classes: list[str], preprocessing: Preprocessing) -> str:
    """A Triton ``config.pbtxt``: dynamic batching up to 8, preferred batches 4 and 8; dims exclude the batch."""
    size = preprocessing.input_size
    group = "instance_group [ { count: 1 kind: KIND_GPU } ]\n" if platform == "tensorrt_plan" else ""
    return (f'name: "{name}"\nplatform: "{platform}"\nmax_batch_size: {TRITON_MAX_BATCH}\n'
            f'input [\n  {{\n    name: "{model.input_name}"\n    data_type: TYPE_FP32\n    format: FORMAT_NCHW\n'
            f"    dims: [ 3, {size}, {size} ]\n  }}\n]\n"
            f'output [\n  {{\n    name: "{model.output_name}"\n    data_type: TYPE_FP32\n    dims: [ {len(classes)} ]\n'
            '    label_filename: "labels.txt"\n  }\n]\n'
            "dynamic_batching {\n  preferred_batch_size: [ 4, 8 ]\n  max_queue_delay_microseconds: 100\n}\n" + group)


# --- The plan: the engine stage's routes, per TensorRT generation --------------------------------------------


def _precision_entry(plan: EnginePlan | EngineBuildError, files: dict[Path, str],
                     missing: dict[Path, str]) -> dict[str, Any]:
    from course_utils.deploy.tensorrt_engines import EngineBuildError

    if isinstance(plan, EngineBuildError):
        return {"available": False, "why": str(plan)}
    if plan.source not in files:
        return {"available": False, "why": missing.get(plan.source, f"the kit has no {plan.source.name}")}
    return {"available": True, "onnx": files[plan.source], "source_kind": plan.source_kind,
            "fp16_flag": plan.fp16_flag, "int8_flag": plan.int8_flag, "calibrate": plan.calibrate,
            "calibrator": plan.calibrator if plan.calibrate else None}


def generation_plans(config: CourseConfig, model: OnnxModel, generations: tuple[str, ...]
                     ) -> dict[str, dict[str, EnginePlan | EngineBuildError]]:
    """The engine stage's plan of every configured precision for each generation (on a Jetson Orin)."""
    from course_utils.deploy import tensorrt_engines as te

    # The GPU and CUDA only name engines in these plans; the kit names its own on the device.
    return {generation: te.course_plans(config, model, GENERATIONS[generation], te.JETSON_ORIN, cuda="device")
            for generation in generations}


def device_plan(config: CourseConfig, model: OnnxModel, plans: dict[str, dict[str, EnginePlan | EngineBuildError]],
                files: dict[Path, str], missing: dict[Path, str], extra: dict[str, Any]) -> dict[str, Any]:
    """``plan.json``: per generation and precision which kit file TensorRT parses, with which flags; the
    profile, workspace, calibrator, TF32 off. ``files`` maps a source path to its name in the kit, ``missing``
    to why the kit has no copy of it."""
    from course_utils.deploy.tensorrt_engines import EngineBuildError, batch_profiles, build_route

    generations = {}
    for generation, by_precision in plans.items():
        route = build_route(GENERATIONS[generation])
        planned = [p for p in by_precision.values() if not isinstance(p, EngineBuildError)]
        generations[generation] = {
            "tensorrt": route.tensorrt, "strongly_typed": route.strongly_typed, "explain": route.explain(),
            "optimization_level": planned[0].optimization_level if planned else None,
            "precisions": {precision: _precision_entry(plan, files, missing)
                           for precision, plan in by_precision.items()}}
    profiles = [{"min": p.min, "opt": p.opt, "max": p.max} for p in batch_profiles(config.engine)]
    return {"kit_format": KIT_FORMAT, "profiles": profiles, "workspace_mb": config.engine.workspace_mb,
            "calibrator": config.engine.calibrator, "tf32": False, "generations": generations,
            "benchmark": {"warmup": config.benchmark.warmup, "iterations": config.benchmark.iterations,
                          "threads": config.benchmark.threads, "batch_sizes": config.benchmark.batch_sizes},
            **extra}


def routes_table(plan: dict[str, Any]) -> list[dict[str, str]]:
    """One row per generation: what each precision builds from, or why it is left out."""
    from course_utils.deploy.tensorrt_engines import PRECISIONS, parse_version

    rows = []
    for generation in sorted(plan["generations"], key=lambda g: parse_version(g.replace(".x", ""))):
        route = plan["generations"][generation]
        row = {"TensorRT": f"{generation} (planned as {route['tensorrt']})",
               "network": "strongly typed" if route["strongly_typed"] else "weakly typed"}
        for precision in (p for p in PRECISIONS if p in route["precisions"]):
            entry = route["precisions"][precision]
            row[precision] = (f"{entry['onnx']}" + (" + calibrator" if entry["calibrate"] else "")
                              if entry["available"] else f"left out: {entry['why']}")
        rows.append(row)
    return rows


# --- Building the kit ----------------------------------------------------------------------------------------------


@dataclass
class KitResult:
    """A kit on disk: its folder and archive, whether it was reused, its plan and files."""

    folder: Path
    archive: Path
    reused: bool
    onnx_sha256: str
    plan: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)  # name in the kit -> sha256

    def routes_table(self) -> list[dict[str, str]]:
        """What each TensorRT generation builds from this kit."""
        return routes_table(self.plan)


def kits_dir(config: CourseConfig) -> Path:
    """Where kits are written: ``<workspace>/jetson-kit``."""
    return config.workspace / "jetson-kit"


def _sha256(path: Path) -> str:
    from course_utils.core.artifacts import file_sha256

    return file_sha256(path)


def _samples_digest(samples: list[tuple[Path, int]]) -> str:
    listed = [(str(path), label, path.stat().st_size) for path, label in samples]
    return hashlib.sha256(json.dumps(listed).encode()).hexdigest()


def _manifest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): _sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "kit.json"}


def _intact(folder: Path, key: dict[str, Any]) -> dict[str, str] | None:
    """The kit's manifest when ``folder`` holds a kit made for ``key`` with every file unchanged, else None."""
    try:
        meta = json.loads((folder / "kit.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files: dict[str, str] = meta.get("files", {})
    if meta.get("key") != json.loads(json.dumps(key, default=str)):
        return None
    if any(not (folder / name).is_file() or _sha256(folder / name) != sha for name, sha in files.items()):
        return None
    return files


def _archive(folder: Path, archive: Path) -> Path:
    """``<folder>.tar.gz`` of the kit (fast compression: the tensors barely compress)."""
    with atomic_path(archive) as tmp, tarfile.open(tmp, "w:gz", compresslevel=1) as tar:
        tar.add(folder, arcname=folder.name)
    return archive


@dataclass
class _Request:
    """What a kit is made from and the key a reusable kit on disk must carry."""

    model: OnnxModel
    backbone: str
    classes: list[str]
    preprocessing: Preprocessing
    plans: dict[str, dict[str, EnginePlan | EngineBuildError]]
    dataset: Any
    opset: int
    folder: Path
    key: dict[str, Any]

    @property
    def archive(self) -> Path:
        return self.folder.with_name(self.folder.name + ".tar.gz")


def _request(config: CourseConfig, out_dir: Path | None, generations: tuple[str, ...]) -> _Request:
    from course_utils.core.ledger import Ledger, deployed_model
    from course_utils.deploy import tensorrt_engines as te
    from course_utils.vision.data import resolve_dataset
    from course_utils.vision.zoo import entry

    unknown = sorted(set(generations) - set(GENERATIONS))
    if unknown or not generations:
        raise KitError(f"Unknown TensorRT generation(s) {unknown or '(none given)'}: choose from "
                       f"{', '.join(GENERATIONS)}.")
    model = te.onnx_model(config)
    deployed = deployed_model(Ledger(config.workspace), config)
    opset = onnx_opset(model.path)
    weak = [g for g in generations if g in ("8.5", "8.6")]
    if opset > WEAK_PARSER_MAX_OPSET and weak:
        raise KitError(f"The ONNX of the model that ships is opset {opset}, but TensorRT {' and '.join(weak)} "
                       f"(JetPack 5/6.0) parse opset {WEAK_PARSER_MAX_OPSET} at most: export with "
                       "--set export.opset=17 (notebook 04, `python -m course_utils export --rebuild`), or make "
                       "a kit for TensorRT 10 and later only (generations=('10.x', '11.x')).")
    preprocessing = entry(deployed.backbone).preprocessing
    plans = generation_plans(config, model, generations)
    sources = {plan.source: plan.source_kind for by in plans.values() for plan in by.values()
               if not isinstance(plan, te.EngineBuildError) and plan.source != model.path}
    dataset = resolve_dataset(config)
    key = {"kit_format": KIT_FORMAT, "onnx_sha256": model.sha256, "script_sha256": _sha256(KIT_SCRIPT),
           # an AutoCast file is named by the model and ModelOpt version that make it; Q/DQ files by their hash
           "sources": sorted(p.name if kind == "autocast-fp16-onnx" else _sha256(p) for p, kind in sources.items()),
           "settings": {"engine": config.engine.model_dump(), "benchmark": config.benchmark.model_dump(),
                        "calibration_images": config.quant.calibration_images, "seed": config.seed,
                        "generations": list(generations)},
           "classes": deployed.classes, "preprocessing": preprocessing_data(preprocessing),
           "train": _samples_digest(dataset.samples["train"]), "val": _samples_digest(dataset.samples["val"])}
    return _Request(model, deployed.backbone, deployed.classes, preprocessing, plans, dataset, opset,
                    (out_dir or kits_dir(config)) / model.sha256[:12], key)


def existing_kit(config: CourseConfig, out_dir: Path | None = None,
                 generations: tuple[str, ...] = tuple(GENERATIONS)) -> KitResult | None:
    """The valid kit on disk for the model that ships and these settings, or None (nothing is written)."""
    request = _request(config, out_dir, generations)
    if (files := _intact(request.folder, request.key)) is None or not request.archive.exists():
        return None
    plan = json.loads((request.folder / "plan.json").read_text(encoding="utf-8"))
    return KitResult(request.folder, request.archive, True, request.model.sha256, plan, files)


def run(config: CourseConfig, out_dir: Path | None = None,
        generations: tuple[str, ...] = tuple(GENERATIONS)) -> KitResult:
    """The kit stage: write the deploy kit of the model that ships (or reuse a valid one) and its ``.tar.gz``.

    Needs the ONNX stage's export of the model that ships (notebook 04); adds the quantization stage's Q/DQ
    ONNX files when notebook 06 made them from this ONNX. ``generations`` limits the TensorRT generations the
    kit plans for (an ONNX above opset 17 needs ``("10.x", "11.x")``).
    """
    from course_utils.deploy.tensorrt_engines import batch_profiles

    request = _request(config, out_dir, generations)
    folder, archive = request.folder, request.archive
    if (files := _intact(folder, request.key)) is not None:
        if not archive.exists():
            _archive(folder, archive)
        plan = json.loads((folder / "plan.json").read_text(encoding="utf-8"))
        return KitResult(folder, archive, True, request.model.sha256, plan, files)
    with atomic_directory(folder) as tmp:
        plan = _write_kit(tmp, config, request, batch_profiles(config.engine)[-1].opt)
        files = _manifest(tmp)
        write_json_atomic(tmp / "kit.json", {"key": request.key, "files": files})
    _archive(folder, archive)
    return KitResult(folder, archive, False, request.model.sha256, plan, files)


def _write_kit(folder: Path, config: CourseConfig, request: _Request, batch: int) -> dict[str, Any]:
    """Write every file of a kit into ``folder``; return its plan. ``batch``: the calibration profile's opt."""
    from course_utils.core.environment import JETPACK_BY_L4T
    from course_utils.deploy import tensorrt_engines as te
    from course_utils.deploy.calibration import build_calibration_set
    from course_utils.deploy.runtimes import OrtRunner, top1, validation_arrays
    from course_utils.vision.data import load_rgb

    model, classes, preprocessing, dataset = request.model, request.classes, request.preprocessing, request.dataset
    plans, name = request.plans, kit_name(request.backbone)
    shutil.copyfile(model.path, folder / "model.onnx")
    files = {model.path: "model.onnx"}
    missing: dict[Path, str] = {}
    for by_precision in plans.values():  # the Q/DQ and AutoCast ONNX files the routes parse
        for planned in by_precision.values():
            if isinstance(planned, te.EngineBuildError) or planned.source in files:
                continue
            source = planned.source
            if planned.source_kind == "autocast-fp16-onnx" and not source.exists():
                try:
                    te.autocast_fp16(model.path, source)  # the same file the engine stage builds from
                except CourseError as error:  # ModelOpt not installed: that route's FP16 is left out, saying why
                    missing[source] = f"no AutoCast FP16 ONNX could be made here ({error})"
                    continue
            kind = ("autocast_fp16" if planned.source_kind == "autocast-fp16-onnx"
                    else f"qdq_{te.qdq_high_precision(source)}-between")
            files[source] = f"onnx/{model.sha256[:12]}_{kind}.onnx"
            (folder / "onnx").mkdir(exist_ok=True)
            shutil.copyfile(source, folder / files[source])
    (folder / "labels.txt").write_text("\n".join(classes) + "\n", encoding="utf-8")
    write_json_atomic(folder / "preprocessing.json", preprocessing_data(preprocessing))
    crops = crop_transform(preprocessing)
    calibration = build_calibration_set(dataset.samples["train"], crops, config.quant.calibration_images, batch,
                                        config.seed, model.input_name)
    np.save(folder / "calibration.npy", calibration.images.astype(np.uint8))
    val_samples = dataset.samples["val"]
    val_crops = validation_arrays(val_samples, crops)[0].astype(np.uint8)
    np.save(folder / "val.npy", val_crops)
    write_json_atomic(folder / "val_labels.json", [label for _, label in val_samples])
    images, labels = validation_arrays(val_samples, preprocessing.eval_transform())
    with OrtRunner(model.path, threads=config.benchmark.threads) as runner:
        reference = top1(runner, images, labels, max(config.benchmark.batch_sizes))
    shown: dict[int, int] = {}
    for path, label in val_samples:  # a few raw validation images for `trt_kit.py classify`
        if shown.get(label, 0) < DEMO_IMAGES_PER_CLASS:
            shown[label] = shown.get(label, 0) + 1
            target = folder / "images" / classes[label] / f"{path.stem}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            load_rgb(path).save(target)  # PNG: the same pixels on any Pillow, whatever the original format
    calibration_cache = f"engines/{model.sha256[:12]}_{config.engine.calibrator}.calib"
    extra = {"model": {"onnx": "model.onnx", "sha256": model.sha256, "input_name": model.input_name,
                       "output_name": model.output_name, "input_size": model.input_size, "opset": request.opset,
                       "backbone": request.backbone, "classes": len(classes)},
             "labels": "labels.txt", "preprocessing": "preprocessing.json",
             "calibration": {"file": "calibration.npy", "images": len(calibration), "batch": batch, "split": "train",
                             "seed": config.seed, "dtype": "uint8 crops", "cache": calibration_cache},
             "validation": {"file": "val.npy", "labels": "val_labels.json", "images": len(val_samples)},
             "reference": {"onnxruntime_fp32_val_top1": reference},
             "triton_plan": f"triton/{name}_plan/1/model.plan",
             "jetpack_by_l4t": {l4t: list(pair) for l4t, pair in JETPACK_BY_L4T.items()}}
    plan = device_plan(config, model, plans, files, missing, extra)
    write_json_atomic(folder / "plan.json", plan)
    shutil.copyfile(KIT_SCRIPT, folder / "trt_kit.py")
    _write_deepstream(folder / "deepstream", name, folder / "model.onnx", model, classes, preprocessing,
                      calibration_cache)
    _write_triton(folder / "triton", name, folder / "model.onnx", model, classes, preprocessing)
    write_text_atomic(folder / "README.md", device_readme(plan, name))
    # Atomic writes make private files and folders; a kit is copied to other machines and used by other users.
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() or path.name == "trt_kit.py" else 0o644)
    return plan


def _write_deepstream(folder: Path, name: str, onnx_path: Path, model: OnnxModel, classes: list[str],
                      preprocessing: Preprocessing, calibration_cache: str) -> None:
    folder.mkdir()
    softmax_onnx(onnx_path, folder / "model_softmax.onnx", model.output_name)
    (folder / "labels.txt").write_text(";".join(classes) + "\n", encoding="utf-8")
    for secondary, filename in ((False, "config_infer_primary.txt"), (True, "config_infer_secondary.txt")):
        text = deepstream_config(name, preprocessing, calibration_cache, secondary)
        (folder / filename).write_text(text, encoding="utf-8")


def _write_triton(folder: Path, name: str, onnx_path: Path, model: OnnxModel, classes: list[str],
                  preprocessing: Preprocessing) -> None:
    platforms: tuple[tuple[str, TritonPlatform], ...] = (("plan", "tensorrt_plan"), ("onnx", "onnxruntime_onnx"))
    for suffix, platform in platforms:
        repo = folder / f"{name}_{suffix}"
        (repo / "1").mkdir(parents=True)
        (repo / "config.pbtxt").write_text(triton_config(repo.name, platform, model, classes, preprocessing),
                                           encoding="utf-8")
        (repo / "labels.txt").write_text("\n".join(classes) + "\n", encoding="utf-8")
    shutil.copyfile(onnx_path, folder / f"{name}_onnx" / "1" / "model.onnx")


def device_readme(plan: dict[str, Any], name: str) -> str:
    """The kit's README.md: the device steps per JetPack release."""
    from course_utils.core.report import markdown_table

    folder = plan["model"]["sha256"][:12]
    return f"""# Deploy kit: {plan['model']['backbone']} ({name})

Made by the Transfer-Learning Workbook (`python -m course_utils jetson-kit`). ONNX sha256
`{plan['model']['sha256']}`, opset {plan['model']['opset']}, input `{plan['model']['input_name']}`
{plan['model']['input_size']} px, {plan['model']['classes']} classes. The course measured ONNX Runtime FP32 top-1
{plan['reference']['onnxruntime_fp32_val_top1']:.4f} on the same validation images (`val.npy`).

## On the device

1. Copy this folder (or the `.tar.gz` beside it) to the Jetson: `scp {folder}.tar.gz jetson:` then
   `tar xzf {folder}.tar.gz && cd {folder}`.
2. Fix the clocks so figures are comparable: `sudo nvpmodel -q` shows the power mode and `sudo nvpmodel -m
   <mode>` sets one (each module numbers its modes differently: see `/etc/nvpmodel.conf`; the results record
   the mode), `sudo jetson_clocks` pins the clocks. Run `tegrastats` in a second terminal while benchmarking
   (temperature, GPU load, memory).
3. Run `python3 trt_kit.py all`: builds FP32/FP16/INT8 engines (profile, timing cache and calibration cache in
   `engines/`), benchmarks them like trtexec, checks top-1 on `val.npy`, classifies `images/` and writes
   `results.json`. `python3 trt_kit.py classify DIR` labels your own photos (needs Pillow:
   `sudo apt install python3-pil`).
4. Copy `results.json` back and run `python -m course_utils import-results results.json`: the course report
   shows these figures beside the course machine's, marked with the device.

Per JetPack release (the script picks the route of the installed TensorRT from `plan.json`):

- **JetPack 5.1.x** (Python 3.8, TensorRT 8.5.2, CUDA 11.4): weakly typed; INT8 calibrates implicitly on
  `calibration.npy` (ModelOpt's Q/DQ ONNX is opset 19, above what 8.5 parses). No builder optimization level.
- **JetPack 6.1 / 6.2** (Python 3.10, TensorRT 10.3, CUDA 12.6): weakly typed; INT8 from the Q/DQ ONNX when the
  kit has one, else implicit calibration (deprecated since 10.1).
- **JetPack 7** (Python 3.12, TensorRT 10.13+, CUDA 13): as 6.x; the FP16/INT8 flags are deprecated since 10.12.
  TensorRT 11 (x86 wheels today) is strongly typed: FP16 from the AutoCast ONNX, INT8 from the Q/DQ ONNX with
  FP16 between the Q/DQ pairs.

{markdown_table(routes_table(plan))}

## DeepStream and Triton

- `deepstream/config_infer_primary.txt`, `config_infer_secondary.txt`: nvinfer classifier configs (FP16; set
  `network-mode=1` for INT8 after `python3 trt_kit.py build --precisions int8` wrote the calibration cache).
- `triton/{name}_onnx/`: ONNX Runtime model, ready. `triton/{name}_plan/`: TensorRT plan model; `trt_kit.py build`
  copies the FP16 engine to `1/model.plan` (a plan runs only with the TensorRT that built it).
  `tritonserver --model-repository=triton`.

Engines, timing caches and calibration caches are valid for one TensorRT, GPU and CUDA: the script names and
seals them so, and rebuilds (saying why) anything made elsewhere.
"""


# --- Device results back into the ledger ----------------------------------------------------------------------------

ROW_FIGURE = re.compile(r"^(latency_ms_p(50|90|99)_b\d+|throughput_b\d+|build_s)$")


class DeviceRow(BaseModel):
    """One runtime's figures from the device, in the benchmark record's shape."""

    model_config = ConfigDict(extra="allow")

    device: str
    threads: int | None = None
    val_top1: float | None = Field(default=None, ge=0, le=1)

    @model_validator(mode="after")
    def _figures(self) -> DeviceRow:
        for key, value in (self.model_extra or {}).items():
            if not ROW_FIGURE.match(key):
                raise ValueError(f"unknown figure {key!r}")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{key} must be a non-negative number, got {value!r}")
        return self


class DeviceInfo(BaseModel):
    """The device as the kit describes it."""

    model_config = ConfigDict(extra="allow")

    description: str


class DeviceResults(BaseModel):
    """The ``results.json`` that ``trt_kit.py all`` writes."""

    model_config = ConfigDict(extra="forbid")

    kit_format: Literal[1]
    kit_onnx_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    backbone: str
    runtime: Literal["tensorrt", "onnxruntime"]
    stand_in: bool
    tensorrt: str | None
    device: DeviceInfo
    tools: dict[str, str | None] = Field(default_factory=dict)
    recorded_at: str = ""
    metrics: dict[str, DeviceRow] = Field(min_length=1)
    classified: list[dict[str, Any]] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)


def read_results(path: Path) -> DeviceResults:
    """Parse and check a device's ``results.json``; anything else is one clear ``KitError``."""
    path = Path(path)
    if not path.is_file():
        raise KitError(f"{path} does not exist: pass the results.json that `trt_kit.py all` wrote on the device.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise KitError(f"{path} is not JSON ({error}): pass the results.json that `trt_kit.py all` wrote.") from None
    try:
        return DeviceResults.model_validate(data)
    except ValidationError as error:
        problem = first_validation_problem(error, top="(top level)")
        raise KitError(f"{path} is not a deploy-kit results file: {problem}.") from None


def import_results(config: CourseConfig, path: Path) -> DeviceRunRecord:
    """Save a device's ``results.json`` as the ledger's ``DeviceRunRecord``, if it measured the model that ships.

    Results of a kit made from another ONNX than the current export of the model that ships are refused: the
    report never shows one model's device figures beside another's.
    """
    from course_utils.core.artifacts import DeviceRunRecord
    from course_utils.core.ledger import Ledger
    from course_utils.deploy.tensorrt_engines import onnx_model

    results = read_results(path)
    model = onnx_model(config)
    if results.kit_onnx_sha256 != model.sha256:
        raise KitError(f"{Path(path).name} comes from a kit of another model (ONNX {results.kit_onnx_sha256[:12]}…) "
                       f"than the one that ships now ({model.sha256[:12]}…): make a new kit (`python -m course_utils "
                       "jetson-kit`), run it on the device and import its results.json.")
    device = results.device.description + (" · ONNX Runtime stand-in, not TensorRT" if results.stand_in else "")
    record = DeviceRunRecord(
        device=device, tensorrt=results.tensorrt, made_from={"onnx": model.sha256},
        settings={"runtime": results.runtime, "stand_in": results.stand_in, "kit_format": results.kit_format,
                  "measured_at": results.recorded_at},
        tools=results.tools, metrics={key: row.model_dump(exclude_none=True) for key, row in results.metrics.items()})
    return Ledger(config.workspace).save(record)
