"""tools/tensorrt_stubs.py: the patches that make tensorrt-stubs parseable for mypy."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

from course_utils.core.config import REPO_ROOT

_spec = importlib.util.spec_from_file_location("tensorrt_stubs_tool", REPO_ROOT / "tools" / "tensorrt_stubs.py")
assert _spec is not None and _spec.loader is not None
stubs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stubs)

BROKEN = (
    "class INetworkDefinition:\r\n"
    "    def add_scale_nd(self, input: ITensor, mode: ScaleMode, shift: Weights = None, "
    "channel_axis: int) -> IScaleLayer:\r\n"
    "        ...\r\n"
    "    def get_workspace_size(self, in: list[PluginTensorDesc], out: list[PluginTensorDesc]) -> int:\r\n"
    "        ...\r\n"
    "    def ok(self, a: dict[str, int] = {}, *args: int, b: int, **kwargs: int) -> None:\r\n"
    "        ...\r\n"
)


def test_patched_stub_parses_and_keeps_line_endings() -> None:
    patched = stubs.patch_stub(BROKEN)
    ast.parse(patched)
    assert "channel_axis: int = ...)" in patched
    assert "(self, in_: list[PluginTensorDesc], out" in patched
    assert "*args: int, b: int, **kwargs" in patched  # keyword-only parameters need no default
    assert patched.count("\r\n") == BROKEN.count("\r\n")


def test_split_parameters_respects_brackets() -> None:
    assert stubs.split_parameters("a: dict[str, int], b: tuple[int, int] = (1, 2)") == [
        "a: dict[str, int]", " b: tuple[int, int] = (1, 2)"]


def test_build_refuses_a_missing_source(tmp_path: Path) -> None:
    import pytest

    with pytest.raises(SystemExit, match="is missing"):
        stubs.build(tmp_path / "nothing", tmp_path / "out")
