import json
import sys
from pathlib import Path

import pytest

from course_utils import cli
from course_utils.core.environment import (
    check_online,
    detect_jetson,
    jetpack_for_l4t,
    parse_tegra_release,
    tensorrt_version,
)

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
