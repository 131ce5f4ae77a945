"""What JetPack provides (torch, torchvision, TensorRT) and how the course keeps it: exact pins, and where each loads from.

Standard library only: ``make jetson`` runs ``python -m course_utils.core.jetpack pins`` in the new venv before
anything of the course is installed. Its output is a pip constraints file that pins the very builds found
(``torch==2.5.0a0+872d972e41.nv24.08``), so a later ``pip install`` that would replace one stops with a conflict
instead; ``constraints/jetpack6.txt`` adds the ranges the course is tested with.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# What to do when a package JetPack should provide is not visible in this venv.
PROVIDED: dict[str, str] = {
    "torch": "install NVIDIA's PyTorch wheel for your JetPack (README, On a Jetson)",
    "torchvision": "install the torchvision build that matches NVIDIA's torch (README, On a Jetson)",
    "tensorrt": "JetPack's python3-libnvinfer provides it (sudo apt install nvidia-jetpack)",
}
REQUIRED = ("torch", "torchvision")  # without them pip would fetch PyPI's builds; TensorRT nothing installs


@dataclass(frozen=True)
class ProvidedPackage:
    """One of JetPack's packages as this interpreter sees it."""

    name: str
    version: str | None  # from its package metadata; None when it is absent or has none
    location: Path | None  # the folder it is imported from; None when it is not importable

    @property
    def in_venv(self) -> bool:
        """Whether it is installed inside the active venv rather than in the system's site-packages."""
        return (self.location is not None and sys.prefix != sys.base_prefix
                and Path(sys.prefix).resolve() in self.location.resolve().parents)


def find_provided(name: str) -> ProvidedPackage:
    """Where ``name`` would be imported from and its installed version, without importing it."""
    spec = importlib.util.find_spec(name)
    location = None
    if spec is not None and spec.origin not in (None, "namespace"):
        location = Path(str(spec.origin)).parent.parent
    elif spec is not None and spec.submodule_search_locations:
        location = Path(next(iter(spec.submodule_search_locations))).parent
    try:
        version: str | None = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        version = None
    return ProvidedPackage(name=name, version=version, location=location)


class MissingJetPackPackage(RuntimeError):
    """A package JetPack should provide is not visible: pip would install PyPI's build in its place."""


def pin_lines(packages: Sequence[ProvidedPackage]) -> list[str]:
    """Pip constraints that pin each found package to its exact build; raises for a missing required one.

    A venv made without ``--system-site-packages`` does not see a system-wide torch: the message says so.
    """
    lines = []
    for package in packages:
        if package.version is not None:
            lines.append(f"{package.name}=={package.version}  # {package.location or 'location unknown'}")
        elif package.name in REQUIRED:
            raise MissingJetPackPackage(
                f"{package.name} is not visible in this environment: {PROVIDED[package.name]}, in this venv or "
                "system-wide, with the venv made by `python3 -m venv --system-site-packages .venv`")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """``pins``: print the constraints that keep JetPack's builds (``make jetson`` writes them to the venv)."""
    parser = argparse.ArgumentParser(prog="python -m course_utils.core.jetpack", description=__doc__)
    parser.add_argument("command", choices=["pins"])
    parser.parse_args(argv)
    packages = [find_provided(name) for name in PROVIDED]
    try:
        lines = pin_lines(packages)
    except MissingJetPackPackage as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for package in packages:
        if package.version is None:
            print(f"warning: {package.name} not found ({PROVIDED[package.name]}); the course will use ONNX Runtime",
                  file=sys.stderr)
    print("# JetPack's own builds, pinned by `python -m course_utils.core.jetpack pins`: pip may not replace them.")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
