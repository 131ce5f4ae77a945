"""What this machine has and what the course can do on it: GPU, Jetson, TensorRT, network, threads.

Nothing here imports a heavy stack at module import time: ``torch``, ``tensorrt`` and friends are
looked up only when a report is made, so ``python -m course_utils doctor`` works on any machine.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import random
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from course_utils.core.jetpack import PROVIDED, find_provided

TEGRA_RELEASE = Path("/etc/nv_tegra_release")
DEVICE_TREE_MODEL = Path("/proc/device-tree/model")
CUDA_VERSION_FILE = Path("/usr/local/cuda/version.json")  # written by JetPack and the CUDA toolkit
NVPMODEL_CONF = Path("/etc/nvpmodel.conf")  # the board's power modes: "< POWER_MODEL ID=0 NAME=15W >"
NVPMODEL_STATUS = Path("/var/lib/nvpmodel/status")  # the mode set last: "pmode:0000 fmode:..."
ONLINE_PROBE = ("download.pytorch.org", 443)

# L4T (R<major>.<minor>[.<patch>]) -> JetPack release and the TensorRT it ships.
# Source: NVIDIA's JetPack archive and release notes.
JETPACK_BY_L4T: dict[str, tuple[str, str]] = {
    "32.7": ("4.6.x", "8.2.1"),
    "35.1": ("5.0.2", "8.4.1"),
    "35.2": ("5.1", "8.5.2"),
    "35.3": ("5.1.1", "8.5.2"),
    "35.4": ("5.1.2", "8.5.2"),
    "35.5": ("5.1.3", "8.5.2"),
    "35.6": ("5.1.4", "8.5.2"),
    "36.2": ("6.0 DP", "8.6.2"),
    "36.3": ("6.0", "8.6.2"),
    "36.4": ("6.1 / 6.2", "10.3"),
    "38.2": ("7.0", "10.13"),
}

OPTIONAL_STACKS = {
    "torch": "training and PyTorch inference",
    "torchvision": "datasets and transforms",
    "mmpretrain": "the OpenMMLab backbone zoo",
    "timm": "EfficientViT and timm backbones",
    "torch_pruning": "structured pruning",
    "onnx": "ONNX export",
    "onnxruntime": "ONNX Runtime inference and CPU INT8",
    "polygraphy": "graph optimization, comparison and TensorRT loaders",
    "onnxslim": "graph slimming",
    "modelopt": "NVIDIA Model Optimizer (explicit INT8, QAT)",
    "openai": "the LLM client",
    "nemoguardrails": "NeMo Guardrails",
    "llama_cpp": "the offline LLM server",
    "diffusers": "Stable Diffusion",
    "papermill": "running notebooks headless",
}


@dataclass
class JetsonInfo:
    """A Jetson module as read from the L4T release file, the device tree and nvpmodel."""

    l4t: str
    jetpack: str | None
    tensorrt_shipped: str | None
    module: str | None
    power_mode: str | None = None  # "15W (mode 0)"; None when neither nvpmodel nor its status file tells
    power_modes: dict[int, str] = field(default_factory=dict)  # every mode this board has, by id


@dataclass
class EnvironmentReport:
    """Everything the doctor reports; ``as_dict()`` is what ``doctor --json`` prints."""

    python: str
    platform: str
    machine: str
    cpu_count: int
    torch: str | None = None
    cuda_available: bool = False
    gpu_name: str | None = None
    compute_capability: str | None = None
    jetson: JetsonInfo | None = None
    tensorrt: str | None = None
    onnxruntime_providers: list[str] = field(default_factory=list)
    online: bool = False
    offline_reason: str | None = None
    stacks: dict[str, str | None] = field(default_factory=dict)
    # Where torch, torchvision and tensorrt are imported from (None: not importable): on a Jetson, JetPack's builds.
    imported_from: dict[str, str | None] = field(default_factory=dict)

    @property
    def course_path(self) -> str:
        """The path the course takes on this machine, in a few words."""
        if self.tensorrt and self.cuda_available:
            return "full: TensorRT engines on the GPU"
        if self.cuda_available:
            return "GPU without TensorRT: PyTorch CUDA and ONNX Runtime"
        return "CPU path: PyTorch and ONNX Runtime on the CPU"

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["course_path"] = self.course_path
        return data


def parse_tegra_release(text: str) -> str | None:
    """The L4T version (``35.4.1``) from ``/etc/nv_tegra_release`` contents, or None."""
    match = re.search(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    if not match:
        return None
    return f"{match.group(1)}.{match.group(2)}"


def jetpack_for_l4t(l4t: str) -> tuple[str | None, str | None]:
    """JetPack release and shipped TensorRT version for an L4T version, if known."""
    major_minor = ".".join(l4t.split(".")[:2])
    return JETPACK_BY_L4T.get(major_minor, (None, None))


def parse_power_modes(conf_text: str) -> dict[int, str]:
    """The power modes ``/etc/nvpmodel.conf`` defines, ``{0: "15W", 1: "7W", ...}``."""
    return {int(mode): name for mode, name in re.findall(r"<\s*POWER_MODEL\s+ID=(\d+)\s+NAME=([^\s>]+)", conf_text)}


def nvpmodel_query() -> tuple[str, int | None] | None:
    """The mode ``nvpmodel -q`` reports (``NV Power Mode: MAXN`` then its id), or None where it cannot tell."""
    if shutil.which("nvpmodel") is None:
        return None
    try:
        done = subprocess.run(["nvpmodel", "-q"], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    name = re.search(r"NV Power Mode:\s*(\S+)", done.stdout)
    if name is None:
        return None
    mode = re.search(r"^\s*(\d+)\s*$", done.stdout[name.end():], re.MULTILINE)
    return name.group(1), int(mode.group(1)) if mode else None


def detect_power_mode(modes: dict[int, str], status_file: Path = NVPMODEL_STATUS) -> str | None:
    """The power mode as ``"15W (mode 0)"``: from ``nvpmodel -q``, else the id in nvpmodel's status file.

    ``modes`` (from :func:`parse_power_modes`) names an id read from the status file.
    """
    queried = nvpmodel_query()
    if queried is not None:
        name, mode = queried
        return name if mode is None else f"{name} (mode {mode})"
    status = status_file.read_text(errors="replace") if status_file.exists() else ""
    match = re.search(r"pmode:(\d+)", status)
    if match is None:
        return None
    mode = int(match.group(1))
    return f"{modes.get(mode, 'unnamed')} (mode {mode})"


def detect_jetson(release_file: Path = TEGRA_RELEASE, model_file: Path = DEVICE_TREE_MODEL,
                  nvpmodel_conf: Path = NVPMODEL_CONF, nvpmodel_status: Path = NVPMODEL_STATUS) -> JetsonInfo | None:
    """Describe the Jetson this runs on, its power mode included, or None on any other machine."""
    if not release_file.exists():
        return None
    l4t = parse_tegra_release(release_file.read_text(errors="replace"))
    if l4t is None:
        return None
    jetpack, tensorrt = jetpack_for_l4t(l4t)
    module = model_file.read_text(errors="replace").strip("\x00\n ") if model_file.exists() else None
    modes = parse_power_modes(nvpmodel_conf.read_text(errors="replace")) if nvpmodel_conf.exists() else {}
    return JetsonInfo(l4t=l4t, jetpack=jetpack, tensorrt_shipped=tensorrt, module=module,
                      power_mode=detect_power_mode(modes, nvpmodel_status), power_modes=modes)


def package_version(module: str) -> str | None:
    """The installed version of ``module`` (import name), or None when it is not importable."""
    if importlib.util.find_spec(module) is None:
        return None
    distribution = {"torch_pruning": "torch-pruning", "modelopt": "nvidia-modelopt",
                    "llama_cpp": "llama-cpp-python", "mmpretrain": "mmpretrain"}.get(module, module)
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return getattr(importlib.import_module(module), "__version__", "unknown")


def tensorrt_version() -> str | None:
    """The version of a real, importable TensorRT, or None.

    ``tensorrt-stubs`` and the PyPI placeholder install an importable ``tensorrt`` with no
    ``Builder``; those count as absent.
    """
    if importlib.util.find_spec("tensorrt") is None:
        return None
    try:
        trt = importlib.import_module("tensorrt")
    except Exception:  # noqa: BLE001 (a broken install, e.g. missing libnvinfer, is as good as none)
        return None
    if not hasattr(trt, "Builder"):
        return None
    return str(getattr(trt, "__version__", "unknown"))


def cuda_version() -> str | None:
    """The CUDA this machine's TensorRT runs on, as precisely as it can be told, or None without CUDA.

    TensorRT's pip wheels carry their CUDA major in their name (``tensorrt-cu12``, ``tensorrt-cu13``: the same
    version numbers exist for both); JetPack writes ``/usr/local/cuda/version.json``; else the CUDA PyTorch
    was built with. Engines, timing caches and calibration caches are keyed by it.
    """
    for dist in importlib.metadata.distributions():
        match = re.fullmatch(r"tensorrt[-_](?:libs[-_])?cu(\d+)(?:[-_].*)?", (dist.metadata["Name"] or "").lower())
        if match:
            return match.group(1)
    try:
        return str(json.loads(CUDA_VERSION_FILE.read_text(encoding="utf-8"))["cuda"]["version"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        import torch
    except ImportError:
        return None
    return torch.version.cuda


def check_online(offline: bool, timeout_s: float = 2.0) -> tuple[bool, str | None]:
    """Whether download servers are reachable; offline mode says no without trying.

    Callers pass ``offline=config.offline`` (which ``COURSE_OFFLINE=1`` or ``offline: true`` in the spec sets).
    """
    if offline:
        return False, "offline is set (COURSE_OFFLINE=1 or offline: true in the spec)"
    try:
        with socket.create_connection(ONLINE_PROBE, timeout=timeout_s):
            return True, None
    except OSError as error:
        return False, f"{ONLINE_PROBE[0]} unreachable ({error.__class__.__name__})"


def detect_environment(probe_network: bool = True, offline: bool = False) -> EnvironmentReport:
    """Inspect this machine; ``probe_network=False`` skips the (short) online check, as ``offline=True`` does."""
    report = EnvironmentReport(
        python=platform.python_version(),
        platform=platform.platform(),
        machine=platform.machine(),
        cpu_count=os.cpu_count() or 1,
        jetson=detect_jetson(),
        tensorrt=tensorrt_version(),
        stacks={name: package_version(name) for name in OPTIONAL_STACKS},
        imported_from={name: str(found.location) if (found := find_provided(name)).location else None
                       for name in PROVIDED},
    )
    if report.stacks.get("torch"):
        import torch

        report.torch = torch.__version__
        report.cuda_available = torch.cuda.is_available()
        if report.cuda_available:
            report.gpu_name = torch.cuda.get_device_name(0)
            major, minor = torch.cuda.get_device_capability(0)
            report.compute_capability = f"{major}.{minor}"
    if report.stacks.get("onnxruntime"):
        import onnxruntime

        report.onnxruntime_providers = list(onnxruntime.get_available_providers())
    if probe_network:
        report.online, report.offline_reason = check_online(offline=offline)
    else:
        report.offline_reason = "not checked"
    return report


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and (when installed) PyTorch, and ask PyTorch for deterministic kernels."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    if importlib.util.find_spec("torch") is not None:
        import torch

        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def set_threads(threads: int) -> None:
    """Use ``threads`` CPU threads for PyTorch's intra-op work (1 is often fastest on a busy 2-core box)."""
    if importlib.util.find_spec("torch") is not None:
        import torch

        torch.set_num_threads(threads)


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """PyTorch's CPU intra-op threads set to ``threads`` inside the block, then restored (None: left alone)."""
    import torch

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
