"""Transfer learning: train a new head on a frozen backbone, then unfreeze and fine-tune gently.

``fit`` checkpoints every epoch atomically (model, optimizer, scheduler, history). Each epoch's
randomness (shuffling, augmentation) is seeded from (seed, epoch) alone, so a run interrupted after
epoch k and resumed ends with exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from course_utils.core.atomic import atomic_path
from course_utils.core.config import CourseConfig, TrainConfig
from course_utils.core.environment import package_version, seed_everything
from course_utils.vision.data import ImageFolderDataset, load_rgb
from course_utils.vision.zoo import Classifier

if TYPE_CHECKING:
    from course_utils.core.artifacts import FinetuneRecord

LAST_FRACTION = 0.4  # unfreeze="last": the last 40% of the backbone's parameter tensors, in forward order
Sample = tuple[Path, int]


class ImageSamples(Dataset):
    """(path, label) pairs as (tensor, label), decoded with the course's careful RGB loader."""

    def __init__(self, samples: list[Sample], transform: Callable[[Any], torch.Tensor]) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.transform(load_rgb(path)), label


@dataclass
class EpochRecord:
    epoch: int
    phase: str
    lr: float
    train_loss: float
    train_top1: float
    val_loss: float
    val_top1: float
    seconds: float
    images_per_second: float


@dataclass
class TrainResult:
    history: list[EpochRecord]
    best_val_top1: float
    best_epoch: int
    completed: bool
    resumed_from_epoch: int | None
    checkpoint: Path
    train_seconds: float = field(default=0.0)

    @property
    def images_per_second(self) -> float:
        return sum(r.images_per_second for r in self.history) / max(1, len(self.history))


@dataclass
class Evaluation:
    top1: float
    loss: float
    per_class_top1: dict[str, float]
    confusion: list[list[int]]
    misclassified: list[tuple[Path, str, str]]


def pick_device(prefer: str | None = None) -> torch.device:
    """CUDA when present (or asked for), else the CPU."""
    if prefer:
        return torch.device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_key(model: Classifier, dataset: ImageFolderDataset, train: TrainConfig, seed: int) -> str:
    """A short hash of everything that determines a training run: a changed setting starts a fresh run."""
    settings = {"backbone": model.backbone, "weights": model.weights, "classes": model.classes,
                "samples": [str(p) for p, _ in dataset.samples["train"]], "train": train.model_dump(), "seed": seed}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def trainable_names(model: Classifier, phase: str, unfreeze: str) -> set[str]:
    """Parameters trained in a phase: the head alone, then the head plus all or the last part of the backbone."""
    head = model.head_parameter_names()
    if phase == "head" or unfreeze not in {"all", "last"}:
        return head
    backbone = [n for n, _ in model.named_parameters() if n not in head]
    keep = backbone if unfreeze == "all" else backbone[math.floor(len(backbone) * (1 - LAST_FRACTION)):]
    return head | set(keep)


def _set_trainable(model: Classifier, names: set[str]) -> None:
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in names)


def _train_mode(model: nn.Module) -> None:
    """Train mode, except batch-norm layers whose parameters are frozen keep their ImageNet statistics."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


def _loader(samples: list[Sample], transform: Any, batch_size: int, shuffle: bool, workers: int) -> DataLoader:
    return DataLoader(ImageSamples(samples, transform), batch_size=batch_size, shuffle=shuffle,
                      num_workers=workers, drop_last=False)


def evaluate(model: Classifier, samples: list[Sample], batch_size: int = 32, device: torch.device | None = None,
             workers: int = 0) -> Evaluation:
    """Top-1, loss, per-class top-1, confusion matrix and the misclassified images of ``samples``."""
    device = device or next(model.parameters()).device
    classes = model.classes
    confusion = [[0] * len(classes) for _ in classes]
    total_loss, predictions = 0.0, []
    model.eval()
    with torch.inference_mode():
        for images, labels in _loader(samples, model.preprocessing.eval_transform(), batch_size, False, workers):
            logits = model(images.to(device)).float().cpu()
            total_loss += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            predictions += logits.argmax(-1).tolist()
    for (_, label), predicted in zip(samples, predictions):
        confusion[label][predicted] += 1
    correct = sum(confusion[i][i] for i in range(len(classes)))
    return Evaluation(
        top1=correct / max(1, len(samples)),
        loss=total_loss / max(1, len(samples)),
        per_class_top1={c: confusion[i][i] / max(1, sum(confusion[i])) for i, c in enumerate(classes)},
        confusion=confusion,
        misclassified=[(p, classes[t], classes[y]) for (p, t), y in zip(samples, predictions) if t != y],
    )


def _phase_plan(train: TrainConfig) -> list[tuple[str, float]]:
    return [("head", train.lr_head)] * train.epochs_head + [("finetune", train.lr_finetune)] * train.epochs_finetune


def _optimizer(model: Classifier, phase: str, train: TrainConfig, lr: float, steps: int) -> tuple[Any, Any]:
    _set_trainable(model, trainable_names(model, phase, train.unfreeze))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps))
    return optimizer, scheduler


def _save(path: Path, payload: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def fit(
    model: Classifier,
    dataset: ImageFolderDataset,
    config: CourseConfig,
    run_dir: Path | None = None,
    device: torch.device | None = None,
    max_epochs_this_call: int | None = None,
) -> TrainResult:
    """Train ``model`` on ``dataset`` with the config's ``train`` settings; resume a matching interrupted run.

    The run lives in ``run_dir`` (default ``<workspace>/train/<backbone>-<key>``): ``last.pt`` after every
    epoch, ``best.pt`` for the best validation top-1. The best weights are loaded into ``model`` at the end.
    ``max_epochs_this_call`` stops early on purpose (to demonstrate and test resuming).
    """
    train = config.train
    device = device or pick_device()
    run_dir = run_dir or config.workspace / "train" / f"{model.backbone}-{run_key(model, dataset, train, config.seed)}"
    last, best = run_dir / "last.pt", run_dir / "best.pt"
    plan = _phase_plan(train)
    model.to(device)
    cuda = device.type == "cuda"
    if cuda:
        model.to(memory_format=torch.channels_last)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    steps_per_epoch = math.ceil(len(dataset.samples["train"]) / train.batch_size)

    history: list[EpochRecord] = []
    start_epoch, resumed, stale, best_top1, best_epoch, stopped = 0, None, 0, -1.0, -1, False
    optimizer = scheduler = None
    if last.exists():
        state = torch.load(last, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        history = [EpochRecord(**r) for r in state["history"]]
        start_epoch = resumed = state["epoch"] + 1
        best_top1, best_epoch, stale, stopped = state["best_top1"], state["best_epoch"], state["stale"], state["stopped"]
        if start_epoch < len(plan) and not stopped:
            phase, lr = plan[start_epoch]
            optimizer, scheduler = _optimizer(model, phase, train, lr, steps_per_epoch * plan.count((phase, lr)))
            if plan[state["epoch"]][0] == phase:
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
        else:
            start_epoch = len(plan)
    started = time.perf_counter()
    epochs_run = 0
    for epoch in range(start_epoch, len(plan)):
        if stopped or (max_epochs_this_call is not None and epochs_run >= max_epochs_this_call):
            break
        phase, lr = plan[epoch]
        if epoch == 0 or plan[epoch - 1][0] != phase or optimizer is None:
            optimizer, scheduler = _optimizer(model, phase, train, lr, steps_per_epoch * plan.count((phase, lr)))
        seed_everything(config.seed * 1000 + epoch)
        record = _train_one_epoch(model, dataset, train, optimizer, scheduler, scaler, device, epoch, phase)
        history.append(record)
        epochs_run += 1
        if record.val_top1 > best_top1:
            best_top1, best_epoch, stale = record.val_top1, epoch, 0
            _save(best, {"model": model.state_dict(), "epoch": epoch, "val_top1": best_top1})
        else:
            stale += 1
        stopped = phase == "finetune" and stale >= train.early_stopping_patience
        _save(last, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "epoch": epoch, "history": [asdict(r) for r in history],
                     "best_top1": best_top1, "best_epoch": best_epoch, "stale": stale, "stopped": stopped})
    completed = stopped or len(history) == len(plan)
    if completed and best.exists():
        model.load_state_dict(torch.load(best, map_location=device, weights_only=True)["model"])
    model.eval()
    return TrainResult(history, best_top1, best_epoch, completed, resumed, best,
                       train_seconds=time.perf_counter() - started)


def _train_one_epoch(model: Classifier, dataset: ImageFolderDataset, train: TrainConfig, optimizer: Any,
                     scheduler: Any, scaler: Any, device: torch.device, epoch: int, phase: str) -> EpochRecord:
    cuda = device.type == "cuda"
    loader = _loader(dataset.samples["train"], model.preprocessing.train_transform(), train.batch_size, True,
                     train.num_workers)
    _train_mode(model)
    seen, correct, loss_sum = 0, 0, 0.0
    started = time.perf_counter()
    for images, labels in tqdm(loader, desc=f"epoch {epoch + 1} ({phase})", leave=False):
        images, labels = images.to(device), labels.to(device)
        if cuda:
            images = images.to(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            logits = model(images)
            loss = nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        seen += len(labels)
        correct += (logits.argmax(-1) == labels).sum().item()
        loss_sum += loss.item() * len(labels)
    seconds = time.perf_counter() - started
    val = evaluate(model, dataset.samples["val"], train.batch_size, device, train.num_workers)
    return EpochRecord(epoch, phase, optimizer.param_groups[0]["lr"], loss_sum / seen, correct / seen,
                       val.loss, val.top1, seconds, seen / seconds)


def models_dir(config: CourseConfig) -> Path:
    """Where the course keeps the models each stage hands to the next."""
    return config.workspace / "models"


def train_classifier(config: CourseConfig, dataset: ImageFolderDataset, pretrained: bool = True,
                     device: torch.device | None = None) -> tuple[Classifier, TrainResult, Evaluation]:
    """Load the configured backbone with a new head for the dataset's classes, fine-tune it, evaluate it."""
    from course_utils.core.environment import check_online
    from course_utils.vision.zoo import load

    seed_everything(config.seed)  # the new head's initial weights are random too
    model = load(config.model.backbone, dataset.classes, pretrained=pretrained,
                 allow_random_init=config.model.allow_random_init or not pretrained,
                 cache_root=config.workspace / "cache",
                 online=pretrained and check_online(offline=config.offline)[0])
    result = fit(model, dataset, config, device=device)
    return model, result, evaluate(model, dataset.samples["val"], config.train.batch_size)


def summary(result: TrainResult, evaluation: Evaluation) -> dict[str, Any]:
    """The figures the fine-tuning record keeps (backbone, dataset and weights are fields of the record)."""
    return {
        "val_top1": evaluation.top1, "per_class_top1": evaluation.per_class_top1,
        "epochs": len(result.history), "best_epoch": result.best_epoch + 1,
        "train_seconds": round(sum(r.seconds for r in result.history), 2),
        "images_per_second": round(result.images_per_second, 2),
        "resumed_from_epoch": result.resumed_from_epoch,
    }


@dataclass
class FinetuneResult:
    """The fine-tuning stage's outcome: the trained model, its history, its evaluation and the ledger record."""

    model: Classifier
    training: TrainResult
    evaluation: Evaluation
    record: FinetuneRecord


def run(config: CourseConfig, dataset: ImageFolderDataset | None = None, pretrained: bool = True) -> FinetuneResult:
    """The fine-tuning stage: train (or resume, or reuse a finished run), save ``models/finetuned.pt``, record it.

    Notebook 02, ``python -m course_utils train`` and ``prepare-demo`` all call this; a run whose settings
    match a finished one returns at once with its weights.
    """
    from course_utils.core.artifacts import FileRef, FinetuneRecord
    from course_utils.core.ledger import Ledger
    from course_utils.vision.data import resolve_dataset
    from course_utils.vision.zoo import entry, save_classifier

    entry(config.model.backbone)  # an unknown model name fails here, before any data is read
    dataset = dataset or resolve_dataset(config)
    model, training, evaluation = train_classifier(config, dataset, pretrained=pretrained)
    saved = save_classifier(model, models_dir(config) / "finetuned.pt")
    record = FinetuneRecord(
        checkpoint=FileRef.of(saved, config.workspace), backbone=model.backbone, dataset=dataset.name,
        classes=list(model.classes), weights=model.weights, settings={"train": config.train.model_dump(),
                                                                      "seed": config.seed},
        tools={name: package_version(name) for name in ("torch", "torchvision", "timm", "mmpretrain")},
        metrics=summary(training, evaluation))
    Ledger(config.workspace).save(record)
    return FinetuneResult(model, training, evaluation, record)
