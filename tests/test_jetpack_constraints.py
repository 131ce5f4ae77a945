"""The Jetson install keeps JetPack's torch, torchvision and TensorRT: the ranges, the extras and the exact pins.

Runs in the main venv and in `make py310`'s (Python 3.10 and torch 2.3, as on JetPack 6.0), where the packages
installed are the ones a Jetson gets.
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from course_utils.core import jetpack
from course_utils.core.jetpack import MissingJetPackPackage, ProvidedPackage, pin_lines

CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints" / "jetpack6.txt"
# NVIDIA's own builds for JetPack 6.0 (torch 2.3, 2.4) and 6.1 / 6.2 (2.5), as their wheels name them.
NVIDIA_TORCH = ["2.3.0a0+40ec155e58.nv24.03", "2.4.0a0+3bcc3cddb5.nv24.07", "2.5.0a0+872d972e41.nv24.08"]
NVIDIA_TORCHVISION = ["0.18.0a0+6043bc2", "0.19.0a0+48b1edf", "0.20.0a0+afc54f7"]
JETPACK_TENSORRT = ["8.6.2", "10.3.0"]


def _constraints() -> dict[str, SpecifierSet]:
    lines = (line.split("#")[0].strip() for line in CONSTRAINTS.read_text().splitlines())
    return {(req := Requirement(line)).name: req.specifier for line in lines if line}


def _course_requirements(extra: str) -> list[Requirement]:
    """What ``pip install course-utils[extra]`` asks for, its extras expanded (from the installed metadata)."""
    requirements, seen, todo = [], set(), [extra]
    declared = [Requirement(text) for text in importlib.metadata.requires("course-utils") or []]
    while todo:
        name = todo.pop()
        seen.add(name)
        for req in declared:
            if req.marker is None or not req.marker.evaluate({"extra": name}):
                continue
            if req.name == "course-utils":
                todo += [e for e in req.extras if e not in seen]
            elif req.marker.evaluate({"extra": name, "python_version": "3.10"}):
                requirements.append(req)
    return requirements


@pytest.mark.parametrize("name, builds", [
    ("torch", NVIDIA_TORCH), ("torchvision", NVIDIA_TORCHVISION), ("tensorrt", JETPACK_TENSORRT)])
def test_the_ranges_accept_jetpacks_builds_and_refuse_pypis(name: str, builds: list[str]) -> None:
    allowed = _constraints()[name]
    assert all(allowed.contains(Version(build), prereleases=True) for build in builds)
    main_pins = {"torch": "2.14.1", "torchvision": "0.29.1", "tensorrt": "11.0.0"}  # x86 builds must not come in
    assert not allowed.contains(Version(main_pins[name]), prereleases=True)


def test_jetpack7_takes_its_own_torch_and_not_jetpack6s() -> None:
    lines = (line.split("#")[0].strip() for line in (CONSTRAINTS.parent / "jetpack7.txt").read_text().splitlines())
    allowed = {(req := Requirement(line)).name: req.specifier for line in lines if line}
    assert allowed["torch"].contains(Version("2.9.0"), prereleases=True)
    assert not allowed["torch"].contains(Version(NVIDIA_TORCH[-1]), prereleases=True)
    assert allowed["tensorrt"].contains("10.13.3") and not allowed["tensorrt"].contains(JETPACK_TENSORRT[-1])


def test_numpy_stays_below_2_for_nvidias_torch() -> None:
    assert not _constraints()["numpy"].contains("2.0.0")


def test_the_jetson_extra_asks_for_none_of_jetpacks_packages_and_everything_else_the_course_does() -> None:
    jetson = {req.name for req in _course_requirements("jetson")}
    assert not jetson & set(jetpack.PROVIDED), "JetPack provides these; the jetson extra must not ask for them"
    everything = {req.name for req in _course_requirements("all")}
    developer_tools = {req.name for req in _course_requirements("dev")}
    assert everything - developer_tools - jetson == {"torch", "torchvision"}


@pytest.mark.skipif(sys.version_info >= (3, 11), reason="the JetPack 6 set: `make py310`'s venv (Python 3.10)")
def test_every_installed_package_accepts_each_of_nvidias_jetpack6_builds() -> None:
    # The packages pip resolved on Python 3.10 within constraints/jetpack6.txt: each one that asks for torch or
    # torchvision must also take NVIDIA's pre-release builds (a `torch>=2.3` would refuse 2.3.0a0+nv24.03).
    builds = {"torch": NVIDIA_TORCH, "torchvision": NVIDIA_TORCHVISION}
    refused = []
    for dist in importlib.metadata.distributions():
        for text in dist.requires or []:
            req = Requirement(text)
            if req.name not in builds or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
                continue
            if req.name == "torch" and dist.metadata["Name"] == "torchvision":
                continue  # PyPI's torchvision pins PyPI's torch; JetPack's torchvision is built against its own
            refused += [f"{dist.metadata['Name']} wants {req}, refuses {build}" for build in builds[req.name]
                        if not req.specifier.contains(Version(build), prereleases=True)]
    assert not refused


def test_the_pins_name_the_exact_builds_found(tmp_path: Path) -> None:
    found = [ProvidedPackage("torch", "2.5.0a0+872d972e41.nv24.08", tmp_path),
             ProvidedPackage("torchvision", "0.20.0a0+afc54f7", tmp_path),
             ProvidedPackage("tensorrt", None, None)]
    lines = pin_lines(found)
    assert [line.split()[0] for line in lines] == ["torch==2.5.0a0+872d972e41.nv24.08",
                                                   "torchvision==0.20.0a0+afc54f7"]
    assert all(Requirement(line.split()[0]).specifier.contains(Version(package.version or ""), prereleases=True)
               for line, package in zip(lines, found))


def test_a_torch_the_venv_cannot_see_stops_the_install() -> None:
    with pytest.raises(MissingJetPackPackage, match="--system-site-packages"):
        pin_lines([ProvidedPackage("torch", None, None), ProvidedPackage("torchvision", "0.20.0", None)])


def test_pins_here_name_this_torch(capsys: pytest.CaptureFixture[str]) -> None:
    assert jetpack.main(["pins"]) == 0
    pins = capsys.readouterr().out
    assert f"torch=={importlib.metadata.version('torch')}" in pins
    located = jetpack.find_provided("torch")
    assert located.location is not None and (located.location / "torch" / "__init__.py").exists()
    assert located.in_venv == (sys.prefix != sys.base_prefix)
