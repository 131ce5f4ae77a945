"""QAT with ModelOpt on a tiny network: calibrate, train a step, save/resume, export Q/DQ, match in ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from course_utils.core.config import CourseConfig
from course_utils.deploy import qat
from course_utils.deploy.calibration import CalibrationSet
from course_utils.lessons import exercises

SIZE = 32


def tiny_net() -> object:
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU6(),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU6(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(32, 4)).eval()


def images(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, SIZE, SIZE)).astype(np.float32)


@pytest.fixture(scope="module")
def calibration() -> CalibrationSet:
    return CalibrationSet((), images(16, 0), batch_size=4, seed=0)


@pytest.fixture(scope="module")
def quantized(calibration: CalibrationSet) -> object:
    return qat.fake_quantize(tiny_net(), calibration)


def test_fake_quantization_is_calibrated_and_close_to_fp32(quantized: object, calibration: CalibrationSet) -> None:
    import torch

    assert qat.enabled_quantizers(quantized) == 7  # inputs and weights of 2 convs and the linear, pooling input
    with torch.no_grad():
        fp32 = tiny_net()(torch.from_numpy(images(8, 1)))
        int8 = quantized(torch.from_numpy(images(8, 1)))  # type: ignore[operator]
    assert not torch.equal(fp32, int8) and torch.allclose(fp32, int8, atol=0.1)


def test_a_training_step_has_finite_gradients_and_the_state_round_trips(calibration: CalibrationSet,
                                                                        tmp_path: Path) -> None:
    import torch

    model = qat.fake_quantize(tiny_net(), calibration)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = model[0].weight.detach().clone()
    loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(images(8, 2))), torch.arange(8) % 4)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    optimizer.step()
    assert not torch.equal(before, model[0].weight)
    torch.save(model.state_dict(), tmp_path / "last.pt")  # what finetune.fit checkpoints and resumes
    fresh = qat.fake_quantize(tiny_net(), calibration)
    fresh.load_state_dict(torch.load(tmp_path / "last.pt", weights_only=True))
    model.eval()
    fresh.eval()
    with torch.no_grad():
        x = torch.from_numpy(images(4, 3))
        assert torch.equal(model(x), fresh(x))


def test_frozen_batchnorm_statistics_survive_training_mode() -> None:
    import torch

    model = tiny_net()
    assert qat.freeze_batchnorm_statistics(model) == 1
    before = model[1].running_mean.clone()
    model.train()
    model(torch.from_numpy(images(8, 5)) * 3 + 1)
    assert torch.equal(model[1].running_mean, before)
    fresh = tiny_net().train()
    fresh(torch.from_numpy(images(8, 5)) * 3 + 1)
    assert not torch.equal(fresh[1].running_mean, before)  # what fit would otherwise do to them


def test_qdq_export_matches_the_fake_quant_model_in_onnx_runtime(quantized: object, tmp_path: Path) -> None:
    import onnx

    path = qat.export_qdq_onnx(quantized, tmp_path / "qat.onnx", SIZE, key={"k": 1})
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("QuantizeLinear") >= 3 and ops.count("DequantizeLinear") >= 6
    parity = qat.onnx_parity(quantized, path, images(24, 4))
    assert parity.images == 24 and parity.ok() and parity.max_abs_diff < 0.05 * parity.logit_scale
    assert parity.agreement >= 1 - parity.near_ties / 24
    assert not qat.Parity(0.01, 1.0, 0.9, 0.95, 1, 20).ok()  # a decisive image predicted differently
    assert not qat.Parity(0.5, 1.0, 1.0, 1.0, 0, 20).ok()  # logits too far apart
    stamp = path.stat().st_mtime_ns
    assert qat.export_qdq_onnx(quantized, path, SIZE, key={"k": 1}).stat().st_mtime_ns == stamp  # reused
    qat.export_qdq_onnx(quantized, path, SIZE, key={"k": 2})
    assert path.stat().st_mtime_ns != stamp


def test_qat_settings_and_run_folders(config: CourseConfig, calibration: CalibrationSet) -> None:
    train = qat.qat_config(config).train
    assert (train.epochs_head, train.epochs_finetune, train.lr_finetune, train.unfreeze) == (
        0, config.quant.qat_epochs, config.quant.qat_lr, "all")
    assert config.train.epochs_head != 0  # the course's own settings are untouched
    keys = {kind: qat.run_key("ab" * 32, calibration, config, kind) for kind in ("qat", "fp32")}
    assert qat.run_dir(config, keys["qat"]) != qat.run_dir(config, keys["fp32"])
    other = CalibrationSet((), images(8, 9), 4, 0)
    assert qat.run_key("ab" * 32, other, config, "qat") != keys["qat"]
    assert qat.run_key("ab" * 32, other, config, "fp32") == keys["fp32"]  # the FP32 control is not calibrated
    longer = config.model_copy(update={"quant": config.quant.model_copy(update={"qat_epochs": 3})})
    assert qat.run_key("ab" * 32, calibration, longer, "qat") != keys["qat"]


def test_qat_result_figures(tmp_path: Path) -> None:
    from course_utils.core.artifacts import ZooRecord
    from course_utils.core.ledger import Ledger

    parity = qat.Parity(0.01, 3.0, 1.0, 1.0, 0, 10)
    result = qat.QatResult(0.9, 0.85, 0.91, 0.9, 1, tmp_path / "q.onnx", parity, 6)
    figures = result.metrics()
    assert figures["top1_drop_vs_fp32"] == pytest.approx(-0.01)
    assert figures["ptq_top1_drop_vs_fp32"] == pytest.approx(0.05) and figures["onnx_parity_ok"]
    Ledger(tmp_path).save(ZooRecord(metrics=figures))  # the QAT figures keep the ledger's conventions
    assert [row["val_top1"] for row in result.rows()] == [0.9, 0.9, 0.85, 0.91]


def test_fake_quant_exercise() -> None:
    assert not exercises.check_fake_quant(None).passed
    assert not exercises.check_fake_quant(0.1234).passed
    assert exercises.check_fake_quant(16 / 127).passed
    with pytest.raises(AssertionError):
        exercises.check_fake_quant(15 / 127, strict=True)
