"""Quantization-aware training (QAT) with NVIDIA ModelOpt: fake-quantize, calibrate, fine-tune, export Q/DQ ONNX.

ModelOpt's ``modelopt.torch.quantization`` wraps every convolution and linear layer with INT8
"fake" quantizers: values are rounded to the INT8 grid and scaled back to float in the forward
pass, so the network *feels* the quantization error, while the backward pass lets gradients
through (straight-through estimator). After calibration (ranges from the same images as PTQ) the
model is exactly a PTQ model; a short fine-tune at a small learning rate then lets the weights
adapt to the grid. The same fine-tune also helps an FP32 model, so the honest comparison trains
FP32 for the same steps too.

QAT starts from the model the course deploys (``core.ledger.deployed_model``: the pruned model only when
it met its target, else the fine-tuned one), the same network notebook 06 quantized after training.
Training reuses ``finetune.fit`` (checkpoints, resume, seeded epochs) in its own run folders under
``<workspace>/int8``; the Q/DQ ONNX is exported with the TorchScript exporter (the dynamo exporter
cannot trace ModelOpt's quantizers) and checked in ONNX Runtime against the fake-quant model.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from course_utils.core.artifacts import DeployedModel, QatRecord
from course_utils.core.atomic import write_json_atomic
from course_utils.core.config import CourseConfig
from course_utils.core.lazy import lazy_import
from course_utils.deploy.calibration import CalibrationSet
from course_utils.deploy.ptq import build_or_reuse, calibration_batch, int8_dir, key_digest, quiet_quantizers

RunKind = Literal["qat", "fp32"]


def qat_config(config: CourseConfig) -> CourseConfig:
    """The training settings of QAT (and of its FP32 control): ``quant.qat_epochs`` at ``quant.qat_lr``, all layers.

    No head-only phase: the head is trained already; every quantized layer may adapt to its grid.
    """
    train = config.train.model_copy(update={"epochs_head": 0, "epochs_finetune": config.quant.qat_epochs,
                                           "lr_finetune": config.quant.qat_lr, "unfreeze": "all"})
    return config.model_copy(update={"train": train})


def _modelopt_quantization() -> Any:
    # Importing it warns about CUDA, TorchScript and transformers versions, none of which QAT on the CPU uses.
    with quiet_quantizers(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lazy_import("modelopt.torch.quantization", "deploy", "QAT")


def fake_quantize(model: Any, calibration: CalibrationSet) -> Any:
    """Insert ModelOpt INT8 fake quantizers (per-channel weights, per-tensor activations) and calibrate them.

    Calibration runs ``model`` on every calibration batch (max calibration). ``model`` is changed in
    place and returned; a model with random mmpretrain weights must have had ``init_weights()``
    (``zoo.load`` does it), or its fake-quantized gradients explode.
    """
    import torch

    mtq = _modelopt_quantization()

    def forward_loop(net: Any) -> None:
        with torch.no_grad():
            for batch in calibration.batches():
                net(torch.from_numpy(batch[calibration.input_name]))

    model.eval()
    return mtq.quantize(model, mtq.INT8_DEFAULT_CFG, forward_loop)


def enabled_quantizers(model: Any) -> int:
    """How many of the model's fake quantizers are active (inputs and weights of every quantized layer)."""
    TensorQuantizer = lazy_import("modelopt.torch.quantization.nn", "deploy", "QAT").TensorQuantizer

    return sum(isinstance(m, TensorQuantizer) and m.is_enabled for m in model.modules())


def run_key(model_sha256: str, calibration: CalibrationSet, config: CourseConfig, kind: RunKind) -> dict[str, Any]:
    """What a QAT (or FP32 control) run depends on: the FP32 weights, the calibration set, the training settings."""
    from course_utils.core.environment import package_version

    return {"kind": kind, "model_sha256": model_sha256, "train": qat_config(config).train.model_dump(),
            "batchnorm_statistics": "frozen",
            "seed": config.seed, "calibration_sha256": calibration.sha256 if kind == "qat" else None,
            "modelopt": package_version("modelopt") if kind == "qat" else None}


def run_dir(config: CourseConfig, key: dict[str, Any]) -> Path:
    """The training folder of one run (``finetune.fit`` resumes or reuses what it finds there)."""
    return int8_dir(config) / f"{key['kind']}-{key_digest(key)}"


def freeze_batchnorm_statistics(model: Any) -> int:
    """Keep every batch-norm layer's running statistics as they are during training; returns how many layers.

    ``finetune.fit`` puts batch-norm layers with trainable parameters in train mode, where each step pulls
    their running mean and variance towards the statistics of small, augmented batches. Those running
    statistics are what inference (and the calibrated quantizers) rely on, and on 245 training images the
    drift costs several points of top-1 in one epoch, to FP32 as much as to QAT. Momentum 0 keeps them
    (QAT recipes freeze them for the same reason); the affine weights still train.
    """
    from torch import nn

    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for layer in layers:
        layer.momentum = 0.0
    return len(layers)


def qat_onnx_path(config: CourseConfig, model_sha256: str, key: dict[str, Any]) -> Path:
    """Where the Q/DQ ONNX of a QAT run goes: ``<workspace>/int8/<model>_qat_<key>.onnx``."""
    return int8_dir(config) / f"{model_sha256[:12]}_qat_{key_digest(key)}.onnx"


def fine_tune(model: Any, dataset: Any, config: CourseConfig, key: dict[str, Any]) -> Any:
    """``finetune.fit`` with the QAT settings and frozen batch-norm statistics in the run's own folder.

    Returns fit's ``TrainResult``; the same recipe serves QAT and its FP32 control.
    """
    from course_utils.vision.finetune import fit

    freeze_batchnorm_statistics(model)
    folder = run_dir(config, key)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "key.json", key)
    return fit(model, dataset, qat_config(config), run_dir=folder)


def export_qdq_onnx(model: Any, path: Path, input_size: int, opset: int = 17,
                    key: dict[str, Any] | None = None) -> Path:
    """Export a fake-quantized model to a Q/DQ ONNX with a dynamic batch; reused when ``key`` matches its sidecar.

    The dynamo exporter fails on ModelOpt's quantizers; the TorchScript exporter turns each one into a
    QuantizeLinear/DequantizeLinear pair, the explicit INT8 that TensorRT builds from.
    """
    from course_utils.core.environment import package_version
    from course_utils.deploy.onnx_export import export_onnx

    def make(out: Path) -> None:
        export_onnx(model, out, input_size, exporter="torchscript", opset=max(opset, 13))

    full_key = {**(key or {}), "opset": max(opset, 13), "input_size": input_size, "torch": package_version("torch")}
    build_or_reuse(path, full_key, make, force=key is None)
    return path


@dataclass(frozen=True)
class Parity:
    """How closely ONNX Runtime reproduces the fake-quant PyTorch model on the same images.

    ``near_ties``: images whose two best PyTorch logits lie within twice the largest logit difference, where
    either answer is rounding noise; ``decisive_agreement``: agreement on all the other images.
    """

    max_abs_diff: float
    logit_scale: float
    agreement: float
    decisive_agreement: float
    near_ties: int
    images: int

    def ok(self, rtol: float = 0.05) -> bool:
        """Same class on every decisive image, and no logit further apart than ``rtol`` of the logits' scale."""
        return self.decisive_agreement == 1.0 and self.max_abs_diff <= rtol * self.logit_scale


def onnx_parity(model: Any, onnx_path: Path, images: np.ndarray, threads: int = 1, batch_size: int = 8) -> Parity:
    """Run the same images through the fake-quant PyTorch model and its Q/DQ ONNX in ONNX Runtime; compare.

    Small logit differences are expected: both round to the same INT8 grid, but values that sit on a
    rounding boundary may land one level apart, and the two accumulate in different orders.
    """
    from course_utils.deploy.runtimes import OrtRunner
    from course_utils.vision.inference import TorchRunner

    with OrtRunner(onnx_path, threads=threads, precision="int8") as onnx_runner:
        onnx_logits = np.concatenate([onnx_runner.run(images[i:i + batch_size])
                                      for i in range(0, len(images), batch_size)])
    torch_runner = TorchRunner(model)
    torch_logits = np.concatenate([torch_runner.run(images[i:i + batch_size])
                                   for i in range(0, len(images), batch_size)])
    max_diff = float(np.abs(onnx_logits - torch_logits).max())
    top2 = np.sort(torch_logits, axis=-1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) > 2 * max_diff
    same = onnx_logits.argmax(-1) == torch_logits.argmax(-1)
    return Parity(max_diff, float(np.abs(torch_logits).max()), float(same.mean()),
                  float(same[decisive].mean()) if decisive.any() else 1.0, int((~decisive).sum()), len(images))


@dataclass(frozen=True)
class QatResult:
    """PTQ vs QAT vs FP32, on the same validation images, calibration set and training budget."""

    val_top1_fp32: float
    val_top1_ptq_same_recipe: float
    val_top1: float
    val_top1_fp32_same_steps: float
    epochs: int
    onnx_path: Path
    parity: Parity
    quantizers: int

    def metrics(self) -> dict[str, Any]:
        """The QAT record's figures."""
        return {"val_top1": self.val_top1, "top1_drop_vs_fp32": round(self.val_top1_fp32 - self.val_top1, 6),
                "val_top1_ptq_same_recipe": self.val_top1_ptq_same_recipe,
                "ptq_top1_drop_vs_fp32": round(self.val_top1_fp32 - self.val_top1_ptq_same_recipe, 6),
                "val_top1_fp32": self.val_top1_fp32, "val_top1_fp32_same_steps": self.val_top1_fp32_same_steps,
                "epochs": self.epochs, "quantizers": self.quantizers,
                "onnx_parity_agreement": self.parity.agreement, "onnx_parity_near_ties": self.parity.near_ties,
                "onnx_parity_max_abs_diff": round(self.parity.max_abs_diff, 6), "onnx_parity_ok": self.parity.ok()}

    def rows(self) -> list[dict[str, Any]]:
        """The comparison as table rows."""
        return [{"model": "FP32 (fine-tuned)", "val_top1": self.val_top1_fp32, "extra steps": 0},
                {"model": "FP32 + the same extra steps", "val_top1": self.val_top1_fp32_same_steps,
                 "extra steps": self.epochs},
                {"model": "INT8 PTQ (ModelOpt, same calibration)", "val_top1": self.val_top1_ptq_same_recipe,
                 "extra steps": 0},
                {"model": "INT8 QAT", "val_top1": self.val_top1, "extra steps": self.epochs}]


def save_record(config: CourseConfig, deployed: DeployedModel, result: QatResult) -> QatRecord:
    """Record the stage: the Q/DQ ONNX made from the deployed model, and the PTQ/QAT/FP32 comparison."""
    from course_utils.core.artifacts import FileRef, QatRecord
    from course_utils.core.environment import package_version
    from course_utils.core.ledger import Ledger

    return Ledger(config.workspace).save(QatRecord(
        onnx=FileRef.of(result.onnx_path, config.workspace), made_from={"model": deployed.sha256},
        settings={"quant": config.quant.model_dump(), "export": config.export.model_dump()},
        tools={"modelopt": package_version("modelopt"), "torch": package_version("torch")},
        metrics=result.metrics()))


def run(config: CourseConfig) -> QatResult:
    """The whole QAT stage as ``python -m course_utils qat`` runs it (notebook 07 teaches it cell by cell and ends
    with ``save_record``); needs the deployed model (notebook 02, and 03 if pruning met its target)."""
    from course_utils.deploy.calibration import build_calibration_set
    from course_utils.deploy.onnx_export import model_sha256
    from course_utils.deploy.runtimes import top1, validation_arrays
    from course_utils.vision.data import resolve_dataset
    from course_utils.vision.deployment import load_deployed
    from course_utils.vision.inference import TorchRunner

    dataset, (model, deployed) = resolve_dataset(config), load_deployed(config)
    transform = model.preprocessing.eval_transform()
    calibration = build_calibration_set(dataset.samples["train"], transform, config.quant.calibration_images,
                                        calibration_batch(config), config.seed)
    images, labels = validation_arrays(dataset.samples["val"], transform)
    sha = model_sha256(model)
    fp32_top1 = top1(TorchRunner(model), images, labels)
    control = copy.deepcopy(model)
    fake_quantize(model, calibration)
    ptq_top1 = top1(TorchRunner(model), images, labels)
    qat_key = run_key(sha, calibration, config, "qat")
    trained = fine_tune(model, dataset, config, qat_key)
    fine_tune(control, dataset, config, run_key(sha, calibration, config, "fp32"))
    onnx_path = qat_onnx_path(config, sha, qat_key)
    export_qdq_onnx(model, onnx_path, model.preprocessing.input_size, config.export.opset, qat_key)
    result = QatResult(fp32_top1, ptq_top1, top1(TorchRunner(model), images, labels),
                       top1(TorchRunner(control), images, labels), len(trained.history), onnx_path,
                       onnx_parity(model, onnx_path, images, config.benchmark.threads), enabled_quantizers(model))
    save_record(config, deployed, result)
    return result
