"""Where a course run ran and with what: the machine in words and the versions of the key libraries.

The main job (``core.notebooks.run_all``) records both in its ``course`` record, so the report can say
them without importing any heavy stack: nothing here imports PyTorch or TensorRT (versions are read from
package metadata, the GPU from ``nvidia-smi``, a Jetson from its release files and ``nvpmodel``).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

from course_utils.core.environment import detect_jetson, package_version

KEY_LIBRARIES = ("torch", "torchvision", "timm", "mmpretrain", "torch_pruning", "onnx", "onnxruntime", "polygraphy",
                 "onnxslim", "modelopt", "tensorrt", "openai", "nemoguardrails", "llama_cpp", "diffusers",
                 "transformers", "faster_whisper", "papermill")
CPUINFO = Path("/proc/cpuinfo")


def _command_line(command: list[str]) -> str | None:
    """The first non-empty line a short command prints, or None when it is absent or fails."""
    if shutil.which(command[0]) is None:
        return None
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return next((line.strip() for line in done.stdout.splitlines() if line.strip()), None)


def cpu_model(cpuinfo: Path = CPUINFO) -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux, else what ``platform`` knows)."""
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in {"model name", "Model", "Hardware"} and value.strip():
                return value.strip()
    return platform.processor() or platform.machine()


def describe_machine() -> dict[str, str]:
    """This machine for the report: CPU and cores, memory, GPU, and a Jetson's module, JetPack and power mode."""
    machine = {"cpu": f"{cpu_model()} · {os.cpu_count() or 1} cores", "system": platform.platform(terse=True)}
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        machine["memory"] = f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB"
    if (gpu := _command_line(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"])) is not None:
        machine["gpu"] = gpu
    if (jetson := detect_jetson()) is not None:
        machine["jetson"] = f"{jetson.module or 'Jetson'} (L4T {jetson.l4t}, JetPack {jetson.jetpack or 'unknown'})"
        machine["power_mode"] = jetson.power_mode or "unknown"
    return machine


def key_versions() -> dict[str, str | None]:
    """Installed versions of the libraries the course's figures depend on (None: not installed)."""
    return {name: package_version(name) for name in KEY_LIBRARIES}
