"""lazy_import: optional stacks imported where they are used, one message when missing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from course_utils.core.errors import CourseError
from course_utils.core.lazy import MissingDependencyError, distribution, lazy_import


def test_a_present_module_is_returned() -> None:
    assert lazy_import("json", "dev") is json
    assert lazy_import("os.path", "dev").join("a", "b") == str(Path("a", "b"))


def test_a_missing_module_names_the_package_and_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "modelopt", None)  # as if nvidia-modelopt were not installed
    with pytest.raises(MissingDependencyError, match=r'^QAT needs the optional package nvidia-modelopt: '
                                                     r'pip install -e "\.\[deploy\]"$') as caught:
        lazy_import("modelopt.torch.quantization", "deploy", "QAT")
    error = caught.value
    assert isinstance(error, CourseError) and isinstance(error, ImportError)
    assert error.name == "modelopt.torch.quantization" and "\n" not in str(error)
    with pytest.raises(ImportError, match=r'no_such_stack needs the optional package no-such-stack: '
                                          r'pip install -e "\.\[train\]"'):
        lazy_import("no_such_stack", "train")


def test_a_missing_dependency_of_a_present_package_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "half_installed").mkdir()
    (tmp_path / "half_installed" / "__init__.py").write_text("import torch_pruning_absent_dependency\n")
    (tmp_path / "broken_stack.py").write_text("raise ImportError('libfoo.so: cannot open\\nshared object')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("half_installed", "broken_stack"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(MissingDependencyError, match="half-installed, which needs torch-pruning-absent-dependency"):
        lazy_import("half_installed", "train")
    with pytest.raises(MissingDependencyError, match=r"\(ImportError: libfoo.so: cannot open shared object\)"):
        lazy_import("broken_stack", "deploy", "the broken stack")


def test_distribution_names() -> None:
    assert distribution("modelopt.onnx.autocast") == "nvidia-modelopt"
    assert distribution("torch_pruning") == "torch-pruning" and distribution("onnxslim") == "onnxslim"
