"""Transfer learning: train a new head on a frozen backbone, then unfreeze and fine-tune gently.

``fit`` checkpoints every epoch atomically (model, optimizer, scheduler, history). Each epoch's
randomness (shuffling, augmentation) is seeded from (seed, epoch) alone, so a run interrupted after
epoch k and resumed ends with exactly the weights of an uninterrupted run.

With ``train.gpus`` > 1, ``run`` starts that many processes (``vision.distributed``) and each trains with
DistributedDataParallel on its share of every global batch; see ``vision.distributed`` for the
scaling rule (batch per process, learning rates times the processes). Augmentation is seeded per
image and the shuffle per epoch, so the processes together see what one process sees.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
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
from course_utils.core.environment import package_version, seed_everything, torch_threads
from course_utils.vision import distributed
from course_utils.vision.data import ImageFolderDataset, load_rgb
from course_utils.vision.zoo import Classifier

if TYPE_CHECKING:
    from course_utils.core.artifacts import FinetuneRecord

LAST_FRACTION = 0.4  # unfreeze="last": the last 40% of the backbone's parameter tensors, in forward order
LABEL_SMOOTHING = 0.1
Sample = tuple[Path, int]
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, images, labels) -> loss


class ImageSamples(Dataset):
    """(path, label) pairs as (tensor, label), decoded with the course's careful RGB loader.

    With ``seed`` set, each image's random augmentation comes from a generator seeded by (seed, index):
    an image looks the same whichever process or loader worker decodes it, so several processes
    together see exactly what one process sees.
    """

    def __init__(self, samples: list[Sample], transform: Callable[[Any], torch.Tensor],
                 seed: int | None = None) -> None:
        self.samples = samples
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        image = load_rgb(path)
        if self.seed is None:
            return self.transform(image), label
        with torch.random.fork_rng(devices=[]):  # torchvision's transforms draw from the global generator
            torch.manual_seed(self.seed * 1_000_003 + index)
            return self.transform(image), label


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


def run_key(model: Classifier, dataset: ImageFolderDataset, train: TrainConfig, seed: int,
            processes: int = 1) -> str:
    """A short hash of everything that determines a training run: a changed setting starts a fresh run.

    ``processes`` (the data-parallel world size, which sets the global batch) counts, not ``train.gpus``:
    one process that resumes a run sees the key it was started under.
    """
    settings: dict[str, Any] = {"backbone": model.backbone, "weights": model.weights, "classes": model.classes,
                                "samples": [str(p) for p, _ in dataset.samples["train"]],
                                "train": train.model_dump(exclude={"gpus"}), "seed": seed}
    if processes > 1:
        settings["processes"] = processes
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


def _loader(samples: list[Sample], transform: Any, batch_size: int, workers: int) -> DataLoader:
    return DataLoader(ImageSamples(samples, transform), batch_size=batch_size, num_workers=workers)


def working_threads(setting: int | None = None) -> int | None:
    """PyTorch CPU threads for training and evaluation: ``setting`` (``train.threads``), else every core.

    The notebooks keep PyTorch at ``benchmark.threads`` for timing; work that is not timed should not run on
    that one thread (fine-tuning is about 1.5x faster on 2 cores than on 1). None (leave it) in a data-parallel
    rank, which already has its share of the cores.
    """
    return None if distributed.current().world_size > 1 else setting or os.cpu_count()


def evaluate(model: Classifier, samples: list[Sample], batch_size: int = 32, device: torch.device | None = None,
             workers: int = 0) -> Evaluation:
    """Top-1, loss, per-class top-1, confusion matrix and the misclassified images of ``samples``.

    In a data-parallel run each rank scores every N-th image and every rank gets the whole result.
    """
    device = device or next(model.parameters()).device
    rank = distributed.current()
    own = list(range(rank.rank, len(samples), rank.world_size))
    scored: list[tuple[int, float, int]] = []  # (index in samples, loss, predicted class)
    model.eval()
    with torch.inference_mode(), torch_threads(working_threads()):
        loader = _loader([samples[i] for i in own], model.preprocessing.eval_transform(), batch_size, workers)
        for images, labels in loader:
            logits = model(images.to(device)).float().cpu()
            losses = nn.functional.cross_entropy(logits, labels, reduction="none").tolist()
            scored += zip(own[len(scored):], losses, logits.argmax(-1).tolist())  # zip stops at this batch
    results = sorted(item for part in distributed.gather(scored) for item in part)
    predictions = [predicted for _, _, predicted in results]
    classes = model.classes
    confusion = [[0] * len(classes) for _ in classes]
    for (_, label), predicted in zip(samples, predictions):
        confusion[label][predicted] += 1
    correct = sum(confusion[i][i] for i in range(len(classes)))
    return Evaluation(
        top1=correct / max(1, len(samples)),
        loss=sum(loss for _, loss, _ in results) / max(1, len(samples)),
        per_class_top1={c: confusion[i][i] / max(1, sum(confusion[i])) for i, c in enumerate(classes)},
        confusion=confusion,
        misclassified=[(p, classes[t], classes[y]) for (p, t), y in zip(samples, predictions) if t != y],
    )


def _phase_plan(train: TrainConfig, lr_scale: int = 1) -> list[tuple[str, float]]:
    """(phase, learning rate) of each epoch; ``lr_scale`` is the linear scaling rule's factor (the processes)."""
    return ([("head", train.lr_head * lr_scale)] * train.epochs_head
            + [("finetune", train.lr_finetune * lr_scale)] * train.epochs_finetune)


def _optimizer(model: Classifier, phase: str, train: TrainConfig, lr: float, steps: int) -> tuple[Any, Any]:
    _set_trainable(model, trainable_names(model, phase, train.unfreeze))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps))
    return optimizer, scheduler


def _save(path: Path, payload: dict[str, Any]) -> None:
    if distributed.current().main:  # the ranks hold the same weights: one writes
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)


def fit(
    model: Classifier,
    dataset: ImageFolderDataset,
    config: CourseConfig,
    run_dir: Path | None = None,
    device: torch.device | None = None,
    max_epochs_this_call: int | None = None,
    loss_fn: LossFn | None = None,
) -> TrainResult:
    """Train ``model`` on ``dataset`` with the config's ``train`` settings; resume a matching interrupted run.

    The run lives in ``run_dir`` (default ``<workspace>/train/<backbone>-<key>``): ``last.pt`` after every
    epoch, ``best.pt`` for the best validation top-1. The best weights are loaded into ``model`` at the end.
    ``max_epochs_this_call`` stops early on purpose (to demonstrate and test resuming). ``loss_fn(logits, images,
    labels)`` replaces the label-smoothed cross-entropy (pruning's retraining distils through it).

    Called in every rank of a data-parallel run (``distributed.launch``), it trains with DDP: each rank
    takes its share of each global batch of N * ``batch_size`` images at N times the learning rates,
    metrics are summed over the ranks, and rank 0 alone writes the checkpoints and shows progress.
    """
    train = config.train
    rank = distributed.current()
    device = device or distributed.device()
    run_dir = run_dir or config.workspace / "train" / (
        f"{model.backbone}-{run_key(model, dataset, train, config.seed, rank.world_size)}")
    last, best = run_dir / "last.pt", run_dir / "best.pt"
    plan = _phase_plan(train, lr_scale=rank.world_size)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    scaler = torch.amp.GradScaler("cuda", enabled=mixed_precision(train, device))
    images = ImageSamples(dataset.samples["train"], model.preprocessing.train_transform())
    order = distributed.sampler(images, seed=config.seed * 1000)  # the same permutations with 1 process or N
    loader = DataLoader(images, batch_size=train.batch_size, sampler=order, num_workers=train.num_workers)
    steps_per_epoch = len(loader)

    history: list[EpochRecord] = []
    start_epoch, resumed, stale, best_top1, best_epoch, stopped = 0, None, 0, -1.0, -1, False
    optimizer: Any = None
    scheduler: Any = None
    net: nn.Module | None = None  # the model, or its DDP wrapper in a data-parallel run
    with torch_threads(working_threads(train.threads)), distributed.global_batch_norm(model, device):
        if last.exists():
            state = torch.load(last, map_location=device, weights_only=True)
            model.load_state_dict(state["model"])
            history = [EpochRecord(**r) for r in state["history"]]
            start_epoch = resumed = state["epoch"] + 1
            best_top1, best_epoch = state["best_top1"], state["best_epoch"]
            stale, stopped = state["stale"], state["stopped"]
            if start_epoch < len(plan) and not stopped:
                phase, lr = plan[start_epoch]
                optimizer, scheduler = _optimizer(model, phase, train, lr, steps_per_epoch * plan.count((phase, lr)))
                net = distributed.data_parallel(model, device)
                if plan[state["epoch"]][0] == phase:
                    optimizer.load_state_dict(state["optimizer"])
                    scheduler.load_state_dict(state["scheduler"])
            else:
                start_epoch = len(plan)
        started = time.perf_counter()
        for epoch in range(start_epoch, len(plan)):
            if stopped or (max_epochs_this_call is not None and epoch - start_epoch >= max_epochs_this_call):
                break
            phase, lr = plan[epoch]
            if epoch == 0 or plan[epoch - 1][0] != phase or net is None:
                optimizer, scheduler = _optimizer(model, phase, train, lr, steps_per_epoch * plan.count((phase, lr)))
                net = distributed.data_parallel(model, device)  # after the trainable set changed
            seed_everything(config.seed * 1000 + epoch)
            order.set_epoch(epoch)
            images.seed = config.seed * 1000 + epoch
            record = _train_one_epoch(net, model, loader, dataset, train, optimizer, scheduler, scaler, device,
                                      epoch, phase, loss_fn)
            history.append(record)
            if record.val_top1 > best_top1:
                best_top1, best_epoch, stale = record.val_top1, epoch, 0
                _save(best, {"model": model.state_dict(), "epoch": epoch, "val_top1": best_top1})
            else:
                stale += 1
            stopped = phase == "finetune" and stale >= train.early_stopping_patience
            _save(last, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "epoch": epoch, "history": [asdict(r) for r in history],
                         "best_top1": best_top1, "best_epoch": best_epoch, "stale": stale, "stopped": stopped})
    distributed.barrier()  # rank 0's checkpoints are on disk before any rank reads them
    completed = stopped or len(history) == len(plan)
    if completed and best.exists():
        model.load_state_dict(torch.load(best, map_location=device, weights_only=True)["model"])
    model.eval()
    return TrainResult(history, best_top1, best_epoch, completed, resumed, best,
                       train_seconds=time.perf_counter() - started)


def mixed_precision(train: TrainConfig, device: torch.device) -> bool:
    """Whether fine-tuning runs in float16 autocast with a gradient scaler: ``train.amp`` on a CUDA device."""
    return train.amp and device.type == "cuda"


def _train_one_epoch(net: nn.Module, model: Classifier, loader: DataLoader, dataset: ImageFolderDataset,
                     train: TrainConfig, optimizer: Any, scheduler: Any, scaler: Any, device: torch.device,
                     epoch: int, phase: str, loss_fn: LossFn | None = None) -> EpochRecord:
    """One pass over this rank's batches through ``net`` (``model``, or its DDP wrapper), then validation."""
    cuda = device.type == "cuda"
    amp = mixed_precision(train, device)
    _train_mode(model)
    seen, correct, loss_sum = 0, 0, 0.0
    started = time.perf_counter()
    for images, labels in tqdm(loader, desc=f"epoch {epoch + 1} ({phase})", leave=False,
                               disable=not distributed.current().main):
        images, labels = images.to(device), labels.to(device)
        if cuda:
            images = images.to(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            logits = net(images)
            loss = (loss_fn(logits, images, labels) if loss_fn is not None
                    else nn.functional.cross_entropy(logits, labels, label_smoothing=LABEL_SMOOTHING))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        seen += len(labels)
        correct += (logits.argmax(-1) == labels).sum().item()
        loss_sum += loss.item() * len(labels)
    seconds = time.perf_counter() - started
    total_seen, total_correct, total_loss = distributed.sum_across([seen, correct, loss_sum], device)
    val = evaluate(model, dataset.samples["val"], train.batch_size, device, train.num_workers)
    return EpochRecord(epoch, phase, optimizer.param_groups[0]["lr"], total_loss / total_seen,
                       total_correct / total_seen, val.loss, val.top1, seconds, total_seen / seconds)


def models_dir(config: CourseConfig) -> Path:
    """Where the course keeps the models each stage hands to the next."""
    return config.workspace / "models"


def train_classifier(config: CourseConfig, dataset: ImageFolderDataset, pretrained: bool = True,
                     device: torch.device | None = None) -> tuple[Classifier, TrainResult, Evaluation]:
    """Load the configured backbone with a new head for the dataset's classes, fine-tune it, evaluate it."""
    from course_utils.core.environment import check_online
    from course_utils.vision.zoo import load

    seed_everything(config.seed)  # the new head's initial weights are random too
    with distributed.main_first():  # in a data-parallel run, rank 0 fills the weights cache for the others
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
        "history": [{"epoch": r.epoch, "phase": r.phase, **{k: round(getattr(r, k), 4) for k in (
            "train_loss", "val_loss", "train_top1", "val_top1")}} for r in result.history],  # the report's curves
        "confusion": evaluation.confusion,  # rows: true class, columns: predicted
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
    match a finished one returns at once with its weights. With ``train.gpus`` > 1 the training runs in
    that many processes (``distributed.launch``; rank 0 saves the model and the record) and the model
    returned here is read back from ``models/finetuned.pt``.
    """
    from course_utils.core.artifacts import FinetuneRecord
    from course_utils.core.ledger import Ledger
    from course_utils.vision.data import resolve_dataset
    from course_utils.vision.zoo import entry, load_classifier

    entry(config.model.backbone)  # an unknown model name fails here, before any data is read
    dataset = dataset or resolve_dataset(config)
    if config.train.gpus == 1:
        model, training, evaluation = train_classifier(config, dataset, pretrained=pretrained)
        return FinetuneResult(model, training, evaluation, _record(config, dataset, model, training, evaluation))
    plan = distributed.plan_launch(config.train.gpus)
    training, evaluation = distributed.launch(plan, _train_in_rank, config, dataset, pretrained)
    record = Ledger(config.workspace).require(FinetuneRecord)  # rank 0 saved it and the model
    return FinetuneResult(load_classifier(models_dir(config) / "finetuned.pt"), training, evaluation, record)


def _train_in_rank(config: CourseConfig, dataset: ImageFolderDataset,
                   pretrained: bool) -> tuple[TrainResult, Evaluation]:
    """One rank of a data-parallel ``run``: train with the others; rank 0 saves the model and records it."""
    model, training, evaluation = train_classifier(config, dataset, pretrained=pretrained)
    if distributed.current().main:
        _record(config, dataset, model, training, evaluation)
    return training, evaluation


def _record(config: CourseConfig, dataset: ImageFolderDataset, model: Classifier, training: TrainResult,
            evaluation: Evaluation) -> FinetuneRecord:
    """Save ``models/finetuned.pt`` and the stage's record in the ledger; the record states the global batch."""
    from course_utils.core.artifacts import FileRef, FinetuneRecord
    from course_utils.core.ledger import Ledger
    from course_utils.vision.zoo import save_classifier

    saved = save_classifier(model, models_dir(config) / "finetuned.pt")
    train, processes = config.train, config.train.gpus
    record = FinetuneRecord(
        checkpoint=FileRef.of(saved, config.workspace), backbone=model.backbone, dataset=dataset.name,
        classes=list(model.classes), weights=model.weights,
        settings={"train": train.model_dump(), "seed": config.seed,
                  "data_parallel": {"processes": processes, "global_batch": processes * train.batch_size,
                                    "lr_head": train.lr_head * processes,
                                    "lr_finetune": train.lr_finetune * processes,
                                    "lr_rule": "linear: the spec's rates times the processes"}},
        tools={name: package_version(name) for name in ("torch", "torchvision", "timm", "mmpretrain")},
        metrics=summary(training, evaluation))
    return Ledger(config.workspace).save(record)
