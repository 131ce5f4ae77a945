#!/usr/bin/env python3
"""The course's Jetson deploy kit, run on the device itself: build TensorRT engines, benchmark, check accuracy.

Runs on the Jetson's own Python (3.8 on JetPack 5.1, 3.10 on JetPack 6, 3.12 on JetPack 7) with only what
JetPack ships: TensorRT's Python bindings and numpy. Pillow is used when present (to classify raw images);
ONNX Runtime stands in, loudly, where TensorRT is absent (CI, a laptop). It never imports the course.

    python3 trt_kit.py all                 # build FP32/FP16/INT8, benchmark, check accuracy, write results.json
    python3 trt_kit.py build --precisions fp16 int8
    python3 trt_kit.py bench               # like trtexec: warm-up, timed runs, p50/p99, throughput
    python3 trt_kit.py accuracy            # top-1 on the kit's validation images (val.npy)
    python3 trt_kit.py classify images/    # top-1 label of every image in a folder (needs Pillow)

Everything the build depends on comes from the kit as data: ``plan.json`` (made by the course from its own
build routes: which ONNX each TensorRT generation parses for each precision, the flags, the profile, the
calibrator), ``preprocessing.json`` and ``labels.txt``. Engines, timing caches and calibration caches are
named and sealed by the model, TensorRT version, GPU and CUDA version: one made elsewhere is rebuilt (with a
line saying why), never reused silently. Bad input ends with one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import glob
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

KIT_FORMAT = 1
EXIT_BAD_INPUT = 2
PRECISIONS = ("fp32", "fp16", "int8")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")
STAND_IN_LINE = "TensorRT not found: ONNX Runtime stands in; these are not TensorRT figures"
# The calibration cache's first line names the calibrator TensorRT wrote it with (TRT-8502-EntropyCalibration2).
CALIBRATOR_HEADER = {"entropy": "EntropyCalibration2", "minmax": "MinMaxCalibration"}


class KitError(Exception):
    """Input the kit cannot use (a missing folder, another model's engine, a foreign cache): one line, exit 2."""


def say(message: str) -> None:
    """A progress line on stderr (stdout carries the tables and JSON)."""
    print(message, file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(str(path), "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def slug(text: str) -> str:
    """``NVIDIA Jetson Orin Nano`` -> ``nvidia-jetson-orin-nano``: safe in a file name."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


def version_tuple(version: str) -> tuple[int, ...]:
    """``"8.5.2.2"`` -> ``(8, 5, 2, 2)``; text after the numbers is ignored."""
    match = re.match(r"^\d+(\.\d+)*", version.strip())
    if not match:
        raise KitError(f"{version!r} is not a version number such as 8.5.2")
    return tuple(int(part) for part in match.group(0).split("."))


def generation_of(version: str) -> str:
    """The TensorRT generation whose build route applies: ``8.5``, ``8.6``, ``10.x``, ``11.x``.

    The same rule as the course's ``BuildRoute.generation`` (this script cannot import the course).
    """
    parts = version_tuple(version)
    return f"{parts[0]}.{parts[1]}" if parts[0] < 10 else f"{parts[0]}.x"


# --- The kit's files ---------------------------------------------------------------------------------------


class Kit:
    """A deploy-kit folder: its plan, model, labels, preprocessing and images, checked on opening."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder).resolve()
        plan_path = self.folder / "plan.json"
        if not plan_path.is_file():
            raise KitError(f"{self.folder} is not a deploy kit: it has no plan.json (pass --kit FOLDER)")
        try:
            self.plan = json.loads(plan_path.read_text(encoding="utf-8"))
        except ValueError as error:
            raise KitError(f"{plan_path} is not valid JSON ({error}): copy the kit again") from None
        if self.plan.get("kit_format") != KIT_FORMAT:
            raise KitError("plan.json is kit format {}, this script reads {}: use the trt_kit.py of the same kit"
                           .format(self.plan.get("kit_format"), KIT_FORMAT))
        model = self.plan["model"]
        self.onnx = self.folder / model["onnx"]
        self.onnx_sha256 = model["sha256"]
        self.input_name, self.output_name = model["input_name"], model["output_name"]
        self.input_size = int(model["input_size"])
        self.labels = self.text(self.plan["labels"]).splitlines()
        self.preprocessing = json.loads(self.text(self.plan["preprocessing"]))
        self.engines = self.folder / "engines"

    def text(self, name: str) -> str:
        """A text file of the kit; a missing one is bad input."""
        path = self.folder / name
        if not path.is_file():
            raise KitError(f"{path} is missing: copy the whole kit folder")
        return path.read_text(encoding="utf-8")

    def check_model(self) -> None:
        """Stop when model.onnx is not the file the plan was made for (a kit assembled from two models)."""
        if not self.onnx.is_file():
            raise KitError(f"{self.onnx} is missing: copy the whole kit folder")
        if sha256_file(self.onnx) != self.onnx_sha256:
            raise KitError(f"{self.onnx.name} is not the model this kit's plan was made for (its sha256 differs): copy the "
                           "kit again, or build a new one with `python -m course_utils jetson-kit`"
                           )

    def profiles(self) -> list[dict[str, int]]:
        """The optimization profiles ``[{"min": 1, "opt": 4, "max": 8}, ...]``; profile 0 serves inference."""
        return list(self.plan["profiles"])

    def shape(self, batch: int) -> tuple[int, int, int, int]:
        """The NCHW input shape for ``batch`` images."""
        return (batch, 3, self.input_size, self.input_size)

    def tensor_file(self, key: str) -> np.ndarray:
        """A uint8 NCHW image tensor of the kit (``calibration`` or ``validation``)."""
        path = self.folder / self.plan[key]["file"]
        if not path.is_file():
            raise KitError(f"{path} is missing: copy the whole kit folder")
        return np.load(str(path))

    def validation(self) -> tuple[np.ndarray, np.ndarray]:
        """The validation images (float32, normalized) and their labels."""
        images = normalize(self.tensor_file("validation"), self.preprocessing)
        labels = json.loads(self.text(self.plan["validation"]["labels"]))
        return images, np.asarray(labels, dtype=np.int64)


# --- Preprocessing, as the course does it (preprocessing.json) -----------------------------------------------


def normalize(images: np.ndarray, preprocessing: dict[str, Any]) -> np.ndarray:
    """uint8 NCHW RGB crops -> float32 ``(x / 255 - mean / 255) / (std / 255)``.

    The same float32 operations in the same order as torchvision's ``ToTensor`` + ``Normalize`` (which the
    course's ``eval_transform`` ends with), so the tensors match the course's bit for bit.
    """
    scaled = images.astype(np.float32) / np.float32(255)
    mean = np.asarray([m / 255 for m in preprocessing["mean"]], dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray([s / 255 for s in preprocessing["std"]], dtype=np.float32).reshape(1, 3, 1, 1)
    return (scaled - mean) / std


def load_image(path: Path, preprocessing: dict[str, Any]) -> np.ndarray:
    """An image file as the uint8 CHW crop the model sees: RGB, short edge resized (bilinear), centre crop.

    The sizes and rounding follow torchvision's ``Resize(short)`` + ``CenterCrop(size)`` on a PIL image, as in
    the course's ``eval_transform``; transparency is composited on white, as the course's ``load_rgb`` does.
    """
    try:
        from PIL import Image
    except ImportError:
        raise KitError("Pillow is not installed (sudo apt install python3-pil, or pip3 install pillow): "
                       "classifying image files needs it; `accuracy` runs on the kit's val.npy without it") from None
    with Image.open(str(path)) as opened:
        if opened.mode in ("RGBA", "LA", "PA") or (opened.mode == "P" and "transparency" in opened.info):
            rgba = opened.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        else:
            image = opened.convert("RGB")
    short, size = int(preprocessing["resize_short"]), int(preprocessing["input_size"])
    width, height = image.size
    if width <= height:
        new_w, new_h = short, int(short * height / width)
    else:
        new_w, new_h = int(short * width / height), short
    bilinear = getattr(Image, "Resampling", Image).BILINEAR
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), bilinear)
    top, left = round((new_h - size) / 2.0), round((new_w - size) / 2.0)
    image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


def image_files(folder: Path) -> list[Path]:
    """Every image file under ``folder``, sorted; a missing or empty folder is bad input."""
    if not folder.is_dir():
        raise KitError(f"image folder {folder} does not exist")
    found = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise KitError("no images ({}) in {}".format(", ".join(IMAGE_SUFFIXES), folder))
    return found


# --- The device -----------------------------------------------------------------------------------------------


def read_text(path: str) -> str | None:
    """A small system file's text, or None when it is absent or unreadable."""
    try:
        with open(path, "rb") as handle:
            return handle.read().decode("utf-8", "replace").replace("\x00", "").strip()
    except OSError:
        return None


def power_mode() -> str | None:
    """The Jetson power mode as ``nvpmodel -q`` names it (``MODE_20W_6CORE``), or None off a Jetson."""
    try:
        output = subprocess.run(["nvpmodel", "-q"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                timeout=10, check=False).stdout.decode("utf-8", "replace")
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"NV Power Mode:\s*(\S+)", output)
    return match.group(1) if match else None


def device_info(jetpack_by_l4t: dict[str, Sequence[str]], tensorrt: str | None,
                cuda: CudaRuntime | None = None) -> dict[str, Any]:
    """Which machine this is: the Jetson module, JetPack/L4T, power mode, GPU and CUDA where known."""
    model = read_text("/proc/device-tree/model")
    release = read_text("/etc/nv_tegra_release")
    l4t = None
    if release:  # "# R35 (release), REVISION: 3.1, ...": the course's doctor parses it the same way
        match = re.search(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", release)
        l4t = f"{match.group(1)}.{match.group(2)}" if match else None
    jetpack = None
    if l4t:
        known = jetpack_by_l4t.get(".".join(l4t.split(".")[:2]))
        jetpack = known[0] if known else None
    info = {"jetson_model": model, "l4t": l4t, "jetpack": jetpack, "power_mode": power_mode(),
            "machine": platform.machine(), "processor": platform.processor() or None,
            "gpu": None, "compute_capability": None, "cuda": None, "tensorrt": tensorrt}
    if cuda is not None:
        info.update(gpu=cuda.device_name(), compute_capability=cuda.compute_capability(), cuda=cuda.runtime_version())
    where = model or "{} ({})".format(platform.node() or "this machine", platform.machine())
    details = [f"JetPack {jetpack}"] if jetpack else []
    details += [f"L4T R{l4t}"] if l4t else []
    details.append(f"TensorRT {tensorrt}" if tensorrt else "no TensorRT")
    details += ["power mode {}".format(info["power_mode"])] if info["power_mode"] else []
    info["description"] = "{} ({})".format(where, ", ".join(details))
    return info


# --- CUDA through ctypes ---------------------------------------------------------------------------------------


def find_cudart() -> str:
    """The path of libcudart: CUDA's own folders first (JetPack puts it in /usr/local/cuda)."""
    folders = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    folders += ["/usr/local/cuda/lib64", "/usr/local/cuda/targets/aarch64-linux/lib",
                "/usr/local/cuda/targets/x86_64-linux/lib", "/usr/lib/aarch64-linux-gnu", "/usr/lib/x86_64-linux-gnu"]
    for folder in folders:
        found = sorted(glob.glob(os.path.join(folder, "libcudart.so*")))
        if found:
            return found[0]
    named = ctypes.util.find_library("cudart")
    if named is None:
        raise KitError("the CUDA runtime (libcudart.so) is not found: on a Jetson it comes with JetPack "
                       "(/usr/local/cuda/lib64); add its folder to LD_LIBRARY_PATH")
    return named


class CudaRuntime:
    """Device memory, copies and streams through ctypes on libcudart, as Polygraphy does internally.

    JetPack ships neither pycuda nor cuda-python by default, but always the CUDA runtime library, so this
    handful of calls is all the kit needs to feed TensorRT.
    """

    HOST_TO_DEVICE, DEVICE_TO_HOST = 1, 2  # cudaMemcpyKind

    def __init__(self, library: str | None = None) -> None:
        self.lib = ctypes.CDLL(library or find_cudart())

    def _check(self, status: int, call: str) -> None:
        if status != 0:
            raise RuntimeError(f"CUDA error {status} in {call}")

    def malloc(self, nbytes: int) -> int:
        pointer = ctypes.c_void_p()
        self._check(self.lib.cudaMalloc(ctypes.byref(pointer), ctypes.c_size_t(nbytes)), "cudaMalloc")
        return int(pointer.value or 0)

    def free(self, pointer: int) -> None:
        self._check(self.lib.cudaFree(ctypes.c_void_p(pointer)), "cudaFree")

    def stream_create(self) -> int:
        stream = ctypes.c_void_p()
        self._check(self.lib.cudaStreamCreate(ctypes.byref(stream)), "cudaStreamCreate")
        return int(stream.value or 0)

    def stream_synchronize(self, stream: int) -> None:
        self._check(self.lib.cudaStreamSynchronize(ctypes.c_void_p(stream)), "cudaStreamSynchronize")

    def stream_destroy(self, stream: int) -> None:
        self._check(self.lib.cudaStreamDestroy(ctypes.c_void_p(stream)), "cudaStreamDestroy")

    def copy_to_device(self, pointer: int, array: np.ndarray, stream: int | None = None) -> None:
        """Copy a C-contiguous host array to device memory (on ``stream`` when given)."""
        host = ctypes.c_void_p(array.ctypes.data)
        if stream is None:
            status = self.lib.cudaMemcpy(ctypes.c_void_p(pointer), host, ctypes.c_size_t(array.nbytes),
                                         self.HOST_TO_DEVICE)
        else:
            status = self.lib.cudaMemcpyAsync(ctypes.c_void_p(pointer), host, ctypes.c_size_t(array.nbytes),
                                              self.HOST_TO_DEVICE, ctypes.c_void_p(stream))
        self._check(status, "cudaMemcpy host to device")

    def copy_to_host(self, array: np.ndarray, pointer: int, stream: int | None = None) -> None:
        """Copy device memory into a C-contiguous host array (on ``stream`` when given)."""
        host = ctypes.c_void_p(array.ctypes.data)
        if stream is None:
            status = self.lib.cudaMemcpy(host, ctypes.c_void_p(pointer), ctypes.c_size_t(array.nbytes),
                                         self.DEVICE_TO_HOST)
        else:
            status = self.lib.cudaMemcpyAsync(host, ctypes.c_void_p(pointer), ctypes.c_size_t(array.nbytes),
                                              self.DEVICE_TO_HOST, ctypes.c_void_p(stream))
        self._check(status, "cudaMemcpy device to host")

    def runtime_version(self) -> str:
        """``"11.4"``: the CUDA runtime's version."""
        version = ctypes.c_int()
        self._check(self.lib.cudaRuntimeGetVersion(ctypes.byref(version)), "cudaRuntimeGetVersion")
        return f"{version.value // 1000}.{version.value % 1000 // 10}"

    def device_name(self) -> str:
        """GPU 0's name. ``cudaDeviceProp`` starts with ``char name[256]`` in every CUDA version; its size
        changes between versions, so it is read into a buffer larger than any of them."""
        properties = ctypes.create_string_buffer(16384)
        call = getattr(self.lib, "cudaGetDeviceProperties_v2", None) or self.lib.cudaGetDeviceProperties
        self._check(call(properties, 0), "cudaGetDeviceProperties")
        return properties.raw[:256].split(b"\0", 1)[0].decode("utf-8", "replace")

    def compute_capability(self) -> str:
        """``"8.7"``: GPU 0's compute capability (cudaDevAttrComputeCapabilityMajor = 75, Minor = 76)."""
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.cudaDeviceGetAttribute(ctypes.byref(major), 75, 0), "cudaDeviceGetAttribute")
        self._check(self.lib.cudaDeviceGetAttribute(ctypes.byref(minor), 76, 0), "cudaDeviceGetAttribute")
        return f"{major.value}.{minor.value}"


# --- What an engine or a cache belongs to ---------------------------------------------------------------------


class Target:
    """The TensorRT, GPU and CUDA that engines, timing caches and calibration caches are valid for."""

    def __init__(self, tensorrt: str, gpu: str, compute_capability: str, cuda: str) -> None:
        self.tensorrt, self.gpu, self.compute_capability, self.cuda = tensorrt, gpu, compute_capability, cuda

    def as_dict(self) -> dict[str, Any]:
        return {"tensorrt": self.tensorrt, "gpu": self.gpu, "compute_capability": self.compute_capability,
                "cuda": self.cuda, "tf32": False}

    @property
    def tag(self) -> str:
        """``nvidia-jetson-orin-nano-sm87_trt10.3.0_cuda12.6``: a file name part."""
        return "{}-sm{}_trt{}_cuda{}".format(slug(self.gpu), self.compute_capability.replace(".", ""),
                                             self.tensorrt, self.cuda)


def calibration_header(tensorrt: str, calibrator: str) -> str:
    """The first line TensorRT writes in a calibration cache: ``TRT-8502-EntropyCalibration2``.

    TensorRT numbers its versions major*1000+minor*100+patch up to 8.x and major*10000+minor*100+patch from
    10.0 (``TRT-100300-...`` for 10.3.0).
    """
    major, minor, patch = (version_tuple(tensorrt) + (0, 0))[:3]
    number = major * (1000 if major < 10 else 10000) + minor * 100 + patch
    return f"TRT-{number}-{CALIBRATOR_HEADER[calibrator]}"


def calibration_cache_problem(path: Path, tensorrt: str, calibrator: str) -> str | None:
    """Why a calibration cache cannot be used with this TensorRT and calibrator, or None when it can."""
    first = path.read_bytes().split(b"\n", 1)[0].decode("utf-8", "replace").strip()
    wanted = calibration_header(tensorrt, calibrator)
    if first == wanted:
        return None
    return (f"{path.name} starts with {first[:60]!r}, not {wanted!r}: it was written by another TensorRT or calibrator than TensorRT {tensorrt} "
            f"with the {calibrator} calibrator")


def sealed_problem(path: Path, key: dict[str, Any]) -> str | None:
    """Why a file sealed by ``seal`` does not belong to ``key`` (or changed since), or None when it does."""
    try:
        meta = json.loads(Path(str(path) + ".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"{path.name} has no readable seal ({path.name}.json): made elsewhere"
    if meta.get("key") != key:
        differing = sorted(k for k in set(key) | set(meta.get("key", {})) if meta.get("key", {}).get(k) != key.get(k))
        return "{} was made for another {}".format(path.name, ", ".join(differing))
    if meta.get("sha256") != sha256_file(path):
        return f"{path.name} changed since it was made"
    return None


def seal(path: Path, key: dict[str, Any], **extra: Any) -> None:
    """Record beside ``path`` what it was made for, and its hash."""
    meta = dict(extra, key=key, sha256=sha256_file(path))
    Path(str(path) + ".json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def discard_foreign(path: Path, key: dict[str, Any], what: str) -> None:
    """Delete a cache that is not sealed for ``key``, saying why, so the build makes a fresh one."""
    if path.exists():
        problem = sealed_problem(path, key)
        if problem is not None:
            say(f"{what}: {problem}; making a new one")
            for stale in (path, Path(str(path) + ".json")):
                if stale.exists():
                    stale.unlink()


# --- Building engines -------------------------------------------------------------------------------------------


def import_tensorrt() -> Any:
    """TensorRT's Python bindings, or None where they are not installed."""
    try:
        import tensorrt
    except ImportError:
        return None
    return tensorrt


def route_for(kit: Kit, tensorrt: str) -> dict[str, Any]:
    """The plan's route for the installed TensorRT generation (``8.5``, ``8.6``, ``10.x``, ``11.x``)."""
    routes = kit.plan["generations"]
    generation = generation_of(tensorrt)
    if generation in routes:
        return dict(routes[generation], generation=generation)
    newest = max(routes, key=lambda name: version_tuple(name.replace(".x", "")))
    if version_tuple(tensorrt)[:2] > version_tuple(newest.replace(".x", ""))[:2]:
        say(f"TensorRT {tensorrt} is newer than this kit's routes: using the {newest} route")
        return dict(routes[newest], generation=newest)
    raise KitError("TensorRT {} is not supported by this kit (routes: {}): JetPack 5.1 (TensorRT 8.5) is the "
                   "oldest".format(tensorrt, ", ".join(sorted(routes))))


class Calibration:
    """The kit's calibration images as normalized batches of the calibration profile's opt size."""

    def __init__(self, kit: Kit) -> None:
        images = kit.tensor_file("calibration")
        batch = int(kit.profiles()[-1]["opt"])  # TensorRT calibrates at the calibration profile's opt shape
        if len(images) == 0 or len(images) % batch:
            raise KitError(f"calibration.npy holds {len(images)} images, not whole batches of {batch}: rebuild the kit")
        self.sha256 = hashlib.sha256(images.tobytes()).hexdigest()
        self.batches = [np.ascontiguousarray(normalize(images[i:i + batch], kit.preprocessing))
                        for i in range(0, len(images), batch)]


def make_calibrator(trt: Any, kind: str, calibration: Calibration, cache: Path, cuda: CudaRuntime) -> Any:
    """An ``IInt8EntropyCalibrator2`` or ``IInt8MinMaxCalibrator`` feeding the kit's calibration batches.

    It reads ``cache`` when present (checked by the caller) and writes it after calibrating.
    """
    base = trt.IInt8MinMaxCalibrator if kind == "minmax" else trt.IInt8EntropyCalibrator2

    class KitCalibrator(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)  # a pybind11 trampoline: the parent's __init__ must run explicitly
            self.next_batch = 0
            self.device = cuda.malloc(calibration.batches[0].nbytes)

        def get_batch_size(self) -> int:
            # Explicit-batch networks take the batch from the calibration profile's opt shape; TensorRT reads
            # this only for implicit batch (gone in 10.0). Polygraphy returns 1 as well.
            return 1

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self.next_batch >= len(calibration.batches):
                return None
            cuda.copy_to_device(self.device, calibration.batches[self.next_batch])
            self.next_batch += 1
            return [self.device]  # the network's one input

        def read_calibration_cache(self) -> bytes | None:
            return cache.read_bytes() if cache.exists() else None

        def write_calibration_cache(self, data: Any) -> None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_bytes(bytes(data))

        def free(self) -> None:
            cuda.free(self.device)

    return KitCalibrator()


def engine_key(kit: Kit, precision: str, entry: dict[str, Any], target: Target,
               calibration_sha256: str | None) -> dict[str, Any]:
    """Everything an engine depends on: a sidecar that differs means a rebuild."""
    return dict(target.as_dict(), onnx_sha256=kit.onnx_sha256, precision=precision,
                source_sha256=sha256_file(kit.folder / entry["onnx"]), profiles=kit.profiles(),
                route={k: entry.get(k) for k in ("source_kind", "fp16_flag", "int8_flag", "calibrate", "calibrator")},
                workspace_mb=kit.plan["workspace_mb"], calibration_sha256=calibration_sha256)


def engine_path(kit: Kit, precision: str, target: Target) -> Path:
    """``engines/<model>_<precision>_b1-4-8_<gpu>_trt<version>_cuda<version>.engine``."""
    tags = "_".join("b{min}-{opt}-{max}".format(**p) for p in kit.profiles())
    return kit.engines / f"{kit.onnx_sha256[:12]}_{precision}_{tags}_{target.tag}.engine"


def calibration_cache_path(kit: Kit) -> Path:
    """The kit's calibration cache (the plan names it, and so do the DeepStream configs); its header and seal
    say which TensorRT and calibration data made it."""
    return kit.folder / kit.plan["calibration"]["cache"]


def build_engine(trt: Any, cuda: CudaRuntime, kit: Kit, precision: str, route: dict[str, Any], target: Target,
                 rebuild: bool = False, calibration_cache: Path | None = None) -> tuple[Path, float]:
    """Build (or reuse) one engine as the plan's route says; returns its path and the build seconds (0: reused).

    ``calibration_cache``: a cache the user brought (``--calibration-cache``); it must carry this TensorRT's
    header for the plan's calibrator, else this stops with one line.
    """
    entry = route["precisions"][precision]
    if not entry.get("available", True):
        raise KitError("{} is not built on TensorRT {}: {}".format(precision, target.tensorrt, entry["why"]))
    calibration = Calibration(kit) if entry["calibrate"] else None
    calibration_sha = calibration.sha256 if calibration is not None else None
    key = engine_key(kit, precision, entry, target, calibration_sha)
    output = engine_path(kit, precision, target)
    if output.exists() and not rebuild:
        problem = sealed_problem(output, key)
        if problem is None:
            return output, 0.0
        say(f"engine {problem}; rebuilding it")
    kit.engines.mkdir(parents=True, exist_ok=True)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    explicit = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    if version_tuple(target.tensorrt)[0] < 10 and explicit is not None:  # implicit batch is the default below 10
        flags |= 1 << int(explicit)
    if route["strongly_typed"]:
        # 10.x opts in with the flag; 11.x is always strongly typed and keeps the flag only for compatibility
        strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        if strongly is not None:
            flags |= 1 << int(strongly)
        elif version_tuple(target.tensorrt)[0] < 11:
            raise KitError(f"the plan builds strongly typed networks on TensorRT {target.tensorrt} but it has no "
                           "STRONGLY_TYPED flag (added in 8.6): build with the 8.5 route")
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(kit.folder / entry["onnx"])):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise KitError("TensorRT {} cannot parse {}: {}".format(target.tensorrt, entry["onnx"], errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(kit.plan["workspace_mb"]) << 20)
    if hasattr(trt.BuilderFlag, "TF32"):  # on by default in TensorRT (trtexec --noTF32, Polygraphy's default)
        config.clear_flag(trt.BuilderFlag.TF32)
    if entry["fp16_flag"]:
        config.set_flag(trt.BuilderFlag.FP16)
    if entry["int8_flag"]:
        config.set_flag(trt.BuilderFlag.INT8)
    if route.get("optimization_level") is not None:
        config.builder_optimization_level = int(route["optimization_level"])
    profiles = []
    for bounds in kit.profiles():
        profile = builder.create_optimization_profile()
        profile.set_shape(kit.input_name, kit.shape(bounds["min"]), kit.shape(bounds["opt"]), kit.shape(bounds["max"]))
        config.add_optimization_profile(profile)
        profiles.append(profile)
    timing_cache = kit.engines / f"timing_{target.tag}.cache"
    discard_foreign(timing_cache, target.as_dict(), "timing cache")
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.exists() else b"")
    config.set_timing_cache(cache, False)
    calibrator = None
    if calibration is not None:
        calibrator = _calibrator(trt, cuda, kit, calibration, target, calibration_cache)
        config.int8_calibrator = calibrator
        config.set_calibration_profile(profiles[-1])  # the profile whose opt shape the batches have
    say("building {} from {} on TensorRT {} ({})".format(precision, entry["onnx"], target.tensorrt, target.gpu))
    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - started
    if calibrator is not None:
        calibrator.free()
    if serialized is None:
        raise RuntimeError(f"TensorRT could not build the {precision} engine: see its log above")
    temporary = output.with_name(output.name + ".tmp")
    temporary.write_bytes(bytes(serialized))
    os.replace(str(temporary), str(output))
    seal(output, key, build_seconds=round(seconds, 3))
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    seal(timing_cache, target.as_dict())
    cache_path = calibration_cache or calibration_cache_path(kit)
    if calibration is not None and cache_path.exists():
        seal(cache_path, _calibration_key(kit, calibration, target))
    return output, seconds


def _calibration_key(kit: Kit, calibration: Calibration, target: Target) -> dict[str, Any]:
    return {"onnx_sha256": kit.onnx_sha256, "calibrator": kit.plan["calibrator"], "tensorrt": target.tensorrt,
            "calibration_sha256": calibration.sha256}


def _calibrator(trt: Any, cuda: CudaRuntime, kit: Kit, calibration: Calibration, target: Target,
                given: Path | None) -> Any:
    """The calibrator, reading a cache only when it belongs to this TensorRT, calibrator, model and data."""
    kind = kit.plan["calibrator"]
    if given is not None:
        if not given.is_file():
            raise KitError(f"calibration cache {given} does not exist")
        problem = calibration_cache_problem(given, target.tensorrt, kind)
        if problem is not None:
            raise KitError(problem + ": its scales cannot be trusted here; drop --calibration-cache to recalibrate")
        return make_calibrator(trt, kind, calibration, given, cuda)
    cache = calibration_cache_path(kit)
    if cache.exists():
        problem = calibration_cache_problem(cache, target.tensorrt, kind) or sealed_problem(
            cache, _calibration_key(kit, calibration, target))
        if problem is not None:
            say(f"calibration cache {problem}; recalibrating")
            cache.unlink()
    return make_calibrator(trt, kind, calibration, cache, cuda)


# --- Running engines --------------------------------------------------------------------------------------------


def dims(shape: Any) -> tuple[int, ...]:
    """A TensorRT ``Dims`` as a tuple of ints."""
    return tuple(int(shape[i]) for i in range(len(shape)))


class TrtRunner:
    """A serialized engine on GPU 0, run with the name-based tensor API (TensorRT 8.5 to 11) on profile 0."""

    runtime, device, threads = "tensorrt", "cuda", None

    def __init__(self, trt: Any, cuda: CudaRuntime, path: Path, kit: Kit) -> None:
        self.cuda, self.max_batch = cuda, int(kit.profiles()[0]["max"])
        self.logger = trt.Logger(trt.Logger.WARNING)  # the runtime and engine need both alive
        self.trt_runtime = trt.Runtime(self.logger)
        self.engine = self.trt_runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise KitError(f"{path.name} does not load with TensorRT {trt.__version__}: engines run only with the TensorRT and GPU that "
                           "built them; run `python3 trt_kit.py build`")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if inputs != [kit.input_name] or outputs != [kit.output_name]:
            raise KitError(f"{path.name} has inputs {inputs} and outputs {outputs}, not this kit's {kit.input_name!r} -> {kit.output_name!r}: it belongs to another "
                           "model")
        self.input_name, self.output_name = kit.input_name, kit.output_name
        self.input_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.input_name)))
        self.output_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.output_name)))
        self.context = self.engine.create_execution_context()
        self.stream = cuda.stream_create()
        self.context.set_optimization_profile_async(0, self.stream)
        self.context.set_input_shape(self.input_name, kit.shape(self.max_batch))
        most = int(np.prod(dims(self.context.get_tensor_shape(self.output_name))))
        self.device_input = cuda.malloc(int(np.prod(kit.shape(self.max_batch))) * self.input_dtype.itemsize)
        self.device_output = cuda.malloc(most * self.output_dtype.itemsize)

    def run(self, images: np.ndarray) -> np.ndarray:
        """Logits of a float32 NCHW batch (1 to the profile's max), copied into a new host array."""
        host = np.ascontiguousarray(images, dtype=self.input_dtype)
        self.context.set_input_shape(self.input_name, tuple(host.shape))
        self.context.set_tensor_address(self.input_name, self.device_input)
        self.context.set_tensor_address(self.output_name, self.device_output)
        self.cuda.copy_to_device(self.device_input, host, self.stream)
        if not self.context.execute_async_v3(self.stream):
            raise RuntimeError("TensorRT's execute_async_v3 failed: see its log above")
        # A fresh array per call: a reused output buffer would change results the caller already holds.
        output = np.empty(dims(self.context.get_tensor_shape(self.output_name)), dtype=self.output_dtype)
        self.cuda.copy_to_host(output, self.device_output, self.stream)
        self.cuda.stream_synchronize(self.stream)
        return output.astype(np.float32, copy=False)

    def close(self) -> None:
        self.cuda.free(self.device_input)
        self.cuda.free(self.device_output)
        self.cuda.stream_destroy(self.stream)


class OrtRunner:
    """The stand-in where TensorRT is absent: ONNX Runtime on the CPU, every graph optimization, as the course."""

    runtime, device = "onnxruntime", "cpu"

    def __init__(self, path: Path, threads: int) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise KitError("neither TensorRT nor ONNX Runtime is importable here: on a Jetson, TensorRT comes with "
                           "JetPack (python3-libnvinfer); elsewhere pip install onnxruntime") from None
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.threads, self.max_batch, self.version = threads, None, ort.__version__

    def run(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {self.input_name: np.ascontiguousarray(images, np.float32)})[0],
                          dtype=np.float32)

    def close(self) -> None:
        self.session = None


# --- Measuring ---------------------------------------------------------------------------------------------------


def measure(run: Callable[[np.ndarray], np.ndarray], shape: tuple[int, ...], warmup: int, iterations: int,
            clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Like trtexec and the course's benchmark: untimed warm-up runs, then timed runs of a random batch, end to
    end (input copied in, output copied out): p50/p99 latency in ms and throughput in images/s."""
    images = np.random.default_rng(shape[0]).standard_normal(shape, dtype=np.float32)
    for _ in range(warmup):
        run(images)
    samples = []
    for _ in range(iterations):
        started = clock()
        run(images)
        samples.append((clock() - started) * 1000.0)
    p50, p99 = np.percentile(samples, [50, 99])
    return {"p50_ms": float(p50), "p99_ms": float(p99), "throughput": shape[0] * 1000.0 / float(np.mean(samples))}


def top1(run: Callable[[np.ndarray], np.ndarray], images: np.ndarray, labels: np.ndarray, batch: int) -> float:
    """The fraction of images whose highest logit is their label, run in batches of ``batch``."""
    predictions = np.concatenate([run(images[i:i + batch]).argmax(-1) for i in range(0, len(images), batch)])
    return float((predictions == labels).mean())


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


def classify(run: Callable[[np.ndarray], np.ndarray], kit: Kit, folder: Path, batch: int) -> list[dict[str, Any]]:
    """The top-1 label and its probability for every image under ``folder``."""
    files = image_files(folder)
    rows = []
    for start in range(0, len(files), batch):
        chunk = files[start:start + batch]
        crops = np.stack([load_image(path, kit.preprocessing) for path in chunk])
        probabilities = softmax(run(normalize(crops, kit.preprocessing)))
        for path, row in zip(chunk, probabilities):
            best = int(row.argmax())
            rows.append({"file": str(path.relative_to(folder)), "label": kit.labels[best],
                         "probability": round(float(row[best]), 4)})
    return rows


# --- The commands -------------------------------------------------------------------------------------------------


class Session:
    """The runtime the commands use: TensorRT with the CUDA runtime, or the ONNX Runtime stand-in."""

    def __init__(self, kit: Kit, requested: str, threads: int) -> None:
        self.kit, self.threads = kit, threads
        self.trt = None if requested == "onnxruntime" else import_tensorrt()
        if self.trt is None and requested == "tensorrt":
            raise KitError("TensorRT's Python bindings are not importable: on a Jetson they come with JetPack "
                           "(sudo apt install python3-libnvinfer); or pass --runtime onnxruntime")
        self.stand_in = self.trt is None
        if self.stand_in and requested == "auto":
            say(STAND_IN_LINE)
        self.cuda = None if self.stand_in else CudaRuntime()
        self.target = None
        if self.cuda is not None and self.trt is not None:
            self.target = Target(self.trt.__version__, self.cuda.device_name(), self.cuda.compute_capability(),
                                 self.cuda.runtime_version())

    @property
    def tensorrt(self) -> str | None:
        return None if self.trt is None else str(self.trt.__version__)

    def route(self) -> dict[str, Any]:
        assert self.tensorrt is not None
        return route_for(self.kit, self.tensorrt)

    def precisions(self, asked: Sequence[str]) -> list[str]:
        """The asked precisions this route can build; the others are reported as skipped."""
        if self.stand_in:
            return ["fp32"]
        entries = self.route()["precisions"]
        for precision in asked:
            if not entries[precision].get("available", True):
                say("{} skipped on TensorRT {}: {}".format(precision, self.tensorrt, entries[precision]["why"]))
        return [p for p in asked if entries[p].get("available", True)]

    def runner(self, precision: str, engine: Path | None = None) -> Any:
        """A runner for ``precision``: the given engine (checked against this kit), the built one, or ORT."""
        if self.stand_in:
            return OrtRunner(self.kit.onnx, self.threads)
        assert self.trt is not None and self.cuda is not None and self.target is not None
        path = engine or engine_path(self.kit, precision, self.target)
        check_engine(path, self.kit, self.target)
        return TrtRunner(self.trt, self.cuda, path, self.kit)

    def key(self, precision: str) -> str:
        return "onnxruntime_fp32" if self.stand_in else f"tensorrt_{precision}"


def check_engine(path: Path, kit: Kit, target: Target) -> None:
    """Stop with one line unless ``path`` is an engine of this kit's model for this TensorRT, GPU and CUDA."""
    if not path.is_file():
        raise KitError(f"no engine {path}: run `python3 trt_kit.py build` first")
    try:
        meta = json.loads(Path(str(path) + ".json").read_text(encoding="utf-8"))["key"]
    except (OSError, ValueError, KeyError):
        raise KitError(f"{path.name} has no sidecar ({path.name}.json) saying which model it was built from: build the engines "
                       "with this kit (`python3 trt_kit.py build`)") from None
    if meta.get("onnx_sha256") != kit.onnx_sha256:
        raise KitError("{} was built from another model (ONNX {}...) than this kit's ({}...): build this kit's "
                       "engines with `python3 trt_kit.py build`".format(
                           path.name, str(meta.get("onnx_sha256"))[:12], kit.onnx_sha256[:12]))
    here = target.as_dict()
    differing = [k for k in here if meta.get(k) != here[k]]
    if differing:
        raise KitError("{} was built for another {} ({} here): engines run only where they were built; run "
                       "`python3 trt_kit.py build`".format(path.name, ", ".join(differing),
                                                           ", ".join(str(here[k]) for k in differing)))


def command_build(session: Session, args: argparse.Namespace) -> dict[str, Any]:
    """Build every asked precision; returns ``{precision: seconds}`` (0 for a reused engine)."""
    if session.stand_in:
        say("build skipped: no TensorRT here (the stand-in runs model.onnx as it is)")
        return {}
    assert session.trt is not None and session.cuda is not None and session.target is not None
    route = session.route()
    say("TensorRT {} -> the {} route: {}".format(session.tensorrt, route["generation"], route["explain"]))
    built = {}
    for precision in session.precisions(args.precisions):
        path, seconds = build_engine(session.trt, session.cuda, session.kit, precision, route, session.target,
                                     args.rebuild, args.calibration_cache)
        say(f"{precision}: {path.name} ({'reused' if not seconds else f'built in {seconds:.1f} s'})")
        built[precision] = round(seconds, 3)
    serve = next((p for p in ("fp16", "int8", "fp32") if p in built), None)
    if serve is not None:  # Triton's plan model: FP16 where built (INT8 needs its accuracy checked first)
        plan_file = session.kit.folder / session.kit.plan["triton_plan"]
        plan_file.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(str(engine_path(session.kit, serve, session.target)), str(plan_file))
        say(f"Triton: {plan_file.relative_to(session.kit.folder)} is the {serve} engine")
    return built


def command_bench(session: Session, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Latency and throughput per precision at the plan's batch sizes, in the course's row shape."""
    bench = session.kit.plan["benchmark"]
    rows = {}
    for precision in session.precisions(args.precisions):
        runner = session.runner(precision, args.engine)
        try:
            row = {"device": runner.device, "threads": runner.threads}
            for batch in bench["batch_sizes"]:
                if runner.max_batch is not None and batch > runner.max_batch:
                    continue
                figures = measure(runner.run, session.kit.shape(batch), args.warmup, args.iterations)
                row[f"latency_ms_p50_b{batch}"] = round(figures["p50_ms"], 3)
                row[f"latency_ms_p99_b{batch}"] = round(figures["p99_ms"], 3)
                row[f"throughput_b{batch}"] = round(figures["throughput"], 2)
        finally:
            runner.close()
        rows[session.key(precision)] = row
    return rows


def command_accuracy(session: Session, args: argparse.Namespace) -> dict[str, float]:
    """Top-1 on the kit's validation images per precision."""
    images, labels = session.kit.validation()
    batch = int(session.kit.profiles()[0]["max"])
    scores = {}
    for precision in session.precisions(args.precisions):
        runner = session.runner(precision, args.engine)
        try:
            scores[session.key(precision)] = top1(runner.run, images, labels, batch)
        finally:
            runner.close()
    return scores


def command_classify(session: Session, args: argparse.Namespace, folder: Path) -> list[dict[str, Any]]:
    """The top-1 label of every image in ``folder`` with the first asked precision."""
    image_files(folder)  # bad input first, before any engine loads
    precision = session.precisions(args.precisions)[0]
    runner = session.runner(precision, args.engine)
    try:
        return classify(runner.run, session.kit, folder, int(session.kit.profiles()[0]["max"]))
    finally:
        runner.close()


def results(session: Session, rows: dict[str, dict[str, Any]], classified: list[dict[str, Any]],
            notes: list[str]) -> dict[str, Any]:
    """The results.json that ``python -m course_utils import-results`` merges into the course's ledger."""
    ort_version: str | None = None
    try:
        import onnxruntime
        ort_version = onnxruntime.__version__
    except ImportError:
        pass
    jetpack = session.kit.plan.get("jetpack_by_l4t", {})
    return {"kit_format": KIT_FORMAT, "kit_onnx_sha256": session.kit.onnx_sha256,
            "backbone": session.kit.plan["model"]["backbone"], "runtime": "onnxruntime" if session.stand_in else
            "tensorrt", "stand_in": session.stand_in, "tensorrt": session.tensorrt,
            "device": device_info(jetpack, session.tensorrt, session.cuda),
            "tools": {"python": platform.python_version(), "numpy": np.__version__, "onnxruntime": ort_version,
                      "tensorrt": session.tensorrt},
            "recorded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "metrics": rows, "classified": classified, "notes": notes}


def command_all(session: Session, args: argparse.Namespace) -> dict[str, Any]:
    """build + accuracy + bench (+ classify the kit's images), then write results.json."""
    notes = [STAND_IN_LINE] if session.stand_in else []
    built = command_build(session, args)
    rows = command_bench(session, args)
    for key, score in command_accuracy(session, args).items():
        rows[key]["val_top1"] = score
    for precision, seconds in built.items():
        if seconds:
            rows[session.key(precision)]["build_s"] = seconds
    classified: list[dict[str, Any]] = []
    images = session.kit.folder / "images"
    try:
        classified = command_classify(session, args, images)
    except KitError as why:
        notes.append(f"classify skipped: {why}")
        say(notes[-1])
    data = results(session, rows, classified, notes)
    out = Path(args.out) if args.out else session.kit.folder / "results.json"
    out.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    say(f"wrote {out}: copy it back and run `python -m course_utils import-results {out.name}`")
    return data


def table(rows: dict[str, dict[str, Any]]) -> str:
    """The rows as a plain-text table."""
    columns = sorted({c for row in rows.values() for c in row if c not in ("device", "threads")})
    lines = ["runtime".ljust(18) + "".join(c.rjust(20) for c in columns)]
    for key, row in rows.items():
        lines.append(key.ljust(18) + "".join(str(row.get(c, "-")).rjust(20) for c in columns))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trt_kit.py", description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--kit", type=Path, default=Path(__file__).resolve().parent,
                        help="the kit folder (default: this script's folder)")
    common.add_argument("--runtime", choices=("auto", "tensorrt", "onnxruntime"), default="auto",
                        help="auto: TensorRT where installed, else ONNX Runtime stands in (said loudly)")
    common.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    common.add_argument("--engine", type=Path, help="run this engine file instead of the kit's own (checked)")
    common.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (stand-in only)")
    common.add_argument("--warmup", type=int, default=None, help="untimed runs per batch size (default: plan)")
    common.add_argument("--iterations", type=int, default=None, help="timed runs per batch size (default: plan)")
    common.add_argument("--rebuild", action="store_true", help="build engines even where a valid one exists")
    common.add_argument("--calibration-cache", type=Path, help="an INT8 calibration cache to use (checked)")
    common.add_argument("--out", help="where `all` writes results.json (default: in the kit)")
    sub = parser.add_subparsers(dest="command")
    sub.required = True
    for name, words in (("build", "build the engines"), ("bench", "benchmark like trtexec"),
                        ("accuracy", "top-1 on the kit's validation images"),
                        ("classify", "top-1 label of every image in a folder"),
                        ("all", "build, benchmark, accuracy, classify the kit's images; write results.json")):
        command = sub.add_parser(name, parents=[common], help=words, description=words)
        if name == "classify":
            command.add_argument("folder", type=Path, help="a folder of images (searched recursively)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        kit = Kit(args.kit)
        kit.check_model()
        bench = kit.plan["benchmark"]
        args.warmup = bench["warmup"] if args.warmup is None else args.warmup
        args.iterations = bench["iterations"] if args.iterations is None else args.iterations
        session = Session(kit, args.runtime, args.threads or int(bench["threads"]))
        if args.command == "build":
            print(json.dumps(command_build(session, args), indent=2))
        elif args.command == "bench":
            print(table(command_bench(session, args)))
        elif args.command == "accuracy":
            print(json.dumps(command_accuracy(session, args), indent=2))
        elif args.command == "classify":
            for row in command_classify(session, args, args.folder):
                print("{file}\t{label}\t{probability}".format(**row))
        else:
            print(table(command_all(session, args)["metrics"]))
    except KitError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
