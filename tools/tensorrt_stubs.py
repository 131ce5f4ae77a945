"""Give mypy TensorRT's types without ever making ``tensorrt`` importable at run time.

``tensorrt-stubs`` (type stubs for TensorRT 10.13) installs a ``tensorrt`` folder that Python imports
as an empty namespace package: in site-packages it shadows a real TensorRT and breaks Polygraphy and
ModelOpt. So it is installed with ``--no-deps`` into a folder nothing imports from
(``.venv/typestubs-src``), and its ``.pyi`` files are copied to the folder mypy reads through
``MYPYPATH`` (``.venv/typestubs``), with the two kinds of syntax error it ships patched:
parameters named ``in`` (a Python keyword) and a parameter without a default after ones with
defaults (``INetworkDefinition.add_scale_nd``). ``make typecheck`` runs this, then mypy.

Usage: ``python tools/tensorrt_stubs.py [--source DIR] [--dest DIR]`` (prints the folder for MYPYPATH).
"""

from __future__ import annotations

import argparse
import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
STUBS_REQUIREMENT = "tensorrt-stubs==10.13.0.35.1"
PACKAGES = ("tensorrt", "tensorrt_bindings")
DEF_LINE = re.compile(r"^(?P<head>\s*def \w+\()(?P<params>.*)(?P<tail>\)\s*(->.*)?:\s*)$")


def split_parameters(params: str) -> list[str]:
    """Split a parameter list on its top-level commas (commas inside brackets stay)."""
    parts, depth, current = [], 0, ""
    for char in params:
        depth += char in "([{"
        depth -= char in ")]}"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    if current.strip():
        parts.append(current)
    return parts


def patch_parameters(params: str) -> str:
    """Rename parameters called ``in`` and give ``= ...`` to required ones that follow defaulted ones."""
    patched, seen_default = [], False
    for part in split_parameters(params):
        name = part.split(":")[0].split("=")[0].strip()
        if name == "in":
            part = part.replace("in", "in_", 1)
        if name.startswith("*") or name == "/":
            seen_default = name == "/" and seen_default
        elif "=" in part:
            seen_default = True
        elif seen_default:
            part = f"{part} = ..."
        patched.append(part)
    return ",".join(patched)


def patch_stub(text: str) -> str:
    """The stub text with every one-line ``def`` signature patched (other lines unchanged)."""
    lines = []
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        match = DEF_LINE.match(body)
        if match:
            body = match["head"] + patch_parameters(match["params"]) + match["tail"]
        lines.append(body + line[len(line.rstrip("\r\n")):])
    return "".join(lines)


def install(source: Path) -> None:
    """``pip install --no-deps --target source`` the pinned stubs, unless that exact version is there."""
    if (source / f"{STUBS_REQUIREMENT.replace('==', '-').replace('-', '_', 1)}.dist-info").exists():
        return
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade",
                    "--target", str(source), STUBS_REQUIREMENT], check=True)


def build(source: Path, dest: Path) -> list[Path]:
    """Copy the stub packages from ``source`` into ``dest``, patched; every file must then parse."""
    written = []
    for package in PACKAGES:
        if not (source / package).is_dir():
            raise SystemExit(f"{source / package} is missing: delete {source} and run this again to "
                             f"reinstall {STUBS_REQUIREMENT}.")
        shutil.rmtree(dest / package, ignore_errors=True)
        for stub in sorted((source / package).rglob("*.pyi")):
            target = dest / stub.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            text = patch_stub(stub.read_text(encoding="utf-8"))
            try:
                ast.parse(text, filename=str(target))
            except SyntaxError as error:
                raise SystemExit(f"{target}:{error.lineno}: not valid Python after patching ({error.msg}); "
                                 "extend patch_parameters in tools/tensorrt_stubs.py.") from None
            target.write_text(text, encoding="utf-8")
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=REPO_ROOT / ".venv" / "typestubs-src",
                        help="where pip installs tensorrt-stubs (never on sys.path)")
    parser.add_argument("--dest", type=Path, default=REPO_ROOT / ".venv" / "typestubs",
                        help="the patched stubs, for MYPYPATH")
    args = parser.parse_args(argv)
    install(args.source)
    build(args.source, args.dest)
    print(args.dest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
