import json
import os
import sys
from pathlib import Path

import pytest

from course_utils import cli
from course_utils.core import environment
from course_utils.core.config import CourseConfig
from course_utils.core.environment import (
    check_online,
    detect_jetson,
    jetpack_for_l4t,
    parse_tegra_release,
    tensorrt_version,
)
from course_utils.doctor import doctor_report, format_doctor

JETPACK_512 = "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, DATE: Tue Aug  1 19:57:35 UTC 2023\n"
JETPACK_62 = "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8 01:49:37 UTC 2025\n"


@pytest.mark.parametrize("text, l4t, jetpack, trt", [
    (JETPACK_512, "35.4.1", "5.1.2", "8.5.2"),
    (JETPACK_62, "36.4.3", "6.1 / 6.2", "10.3"),
])
def test_jetson_release_file(tmp_path: Path, text: str, l4t: str, jetpack: str, trt: str) -> None:
    release, model = tmp_path / "nv_tegra_release", tmp_path / "model"
    release.write_text(text)
    model.write_bytes(b"NVIDIA Jetson Orin Nano Developer Kit\x00")
    info = detect_jetson(release, model)
    assert info is not None
    assert (info.l4t, info.jetpack, info.tensorrt_shipped) == (l4t, jetpack, trt)
    assert info.module == "NVIDIA Jetson Orin Nano Developer Kit"


def test_not_a_jetson(tmp_path: Path) -> None:
    assert detect_jetson(tmp_path / "missing", tmp_path / "missing") is None
    assert parse_tegra_release("garbage") is None
    assert jetpack_for_l4t("99.1") == (None, None)


def test_offline_switch_skips_the_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("offline=True must not touch the network")

    monkeypatch.setattr("course_utils.core.environment.socket.create_connection", no_network)
    online, reason = check_online(offline=True)
    assert online is False and reason is not None and "offline is set" in reason


def test_a_placeholder_tensorrt_counts_as_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # tensorrt-stubs and PyPI's placeholder install an importable `tensorrt` with no Builder.
    (tmp_path / "tensorrt").mkdir()
    (tmp_path / "tensorrt" / "__init__.py").write_text("__version__ = '10.13.0'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    assert tensorrt_version() is None


def test_doctor_json(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("COURSE_WORKSPACE", str(tmp_path))
    assert cli.main(["doctor", "--json", "--no-network", "--spec", "smoke"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["environment"]["cpu_count"] >= 1
    assert report["environment"]["course_path"].startswith(("CPU", "GPU", "full"))
    assert set(report["datasets"]) >= {"hymenoptera", "package-textures"}
    assert report["assets"]["efficientnet-lite0 weights"]["present"] is True


def test_cli_reports_config_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["doctor", "--no-network", "--set", "train.epoch_head=1"]) == 2
    assert "did you mean 'epochs_head'" in capsys.readouterr().err


# An Orin Nano's /etc/nvpmodel.conf, abridged to its POWER_MODEL lines (JetPack 6.2, "Super" modes).
ORIN_NANO_NVPMODEL_CONF = """
< PARAM TYPE=FILE NAME=CPU_ONLINE >
< POWER_MODEL ID=0 NAME=15W >
CPU_ONLINE CORE_0 1
< POWER_MODEL ID=1 NAME=7W >
CPU_ONLINE CORE_4 0
< POWER_MODEL ID=2 NAME=MAXN_SUPER >
< PM_CONFIG DEFAULT=2 >
"""


@pytest.fixture
def orin_nano(tmp_path: Path) -> dict[str, Path]:
    """A fake Jetson file tree: L4T release, device-tree model, nvpmodel's config and status; no nvpmodel."""
    files = {"release_file": tmp_path / "nv_tegra_release", "model_file": tmp_path / "model",
             "nvpmodel_conf": tmp_path / "nvpmodel.conf", "nvpmodel_status": tmp_path / "status"}
    files["release_file"].write_text(JETPACK_62)
    files["model_file"].write_bytes(b"NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super\x00")
    files["nvpmodel_conf"].write_text(ORIN_NANO_NVPMODEL_CONF)
    files["nvpmodel_status"].write_text("pmode:0001 fmode:quiet\n")
    return files


def _fake_nvpmodel(folder: Path, monkeypatch: pytest.MonkeyPatch, output: str) -> None:
    folder.mkdir()
    script = folder / "nvpmodel"
    script.write_text(f"#!/bin/sh\ncat <<'EOF'\n{output}EOF\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}:{os.environ['PATH']}")


def test_the_power_mode_comes_from_nvpmodel(orin_nano: dict[str, Path], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_nvpmodel(tmp_path / "bin", monkeypatch, "NV Power Mode: MAXN_SUPER\n2\n")
    info = detect_jetson(**orin_nano)
    assert info is not None
    assert info.power_mode == "MAXN_SUPER (mode 2)"
    assert info.power_modes == {0: "15W", 1: "7W", 2: "MAXN_SUPER"}


def test_without_nvpmodel_the_status_file_names_the_mode(orin_nano: dict[str, Path],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    info = detect_jetson(**orin_nano)
    assert info is not None and info.power_mode == "7W (mode 1)"
    orin_nano["nvpmodel_status"].unlink()
    info = detect_jetson(**orin_nano)
    assert info is not None and info.power_mode is None


def test_the_doctor_reports_the_power_mode_and_where_jetpacks_packages_load_from(
        orin_nano: dict[str, Path], config: CourseConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    real_detect = environment.detect_jetson
    monkeypatch.setattr(environment, "detect_jetson", lambda: real_detect(**orin_nano))
    report = doctor_report(config, probe_network=False)
    text = format_doctor(report)
    assert "Power mode: 7W (mode 1); this board's: 0 15W, 1 7W, 2 MAXN_SUPER" in text
    import torch

    assert f"torch from {Path(torch.__file__).parent.parent}" in text
    cuda_step = [step for step in report["next_steps"] if "cannot use this Jetson's GPU" in step]
    assert len(cuda_step) == (0 if torch.cuda.is_available() else 1)
