"""Data-parallel fine-tuning: 2 gloo processes on the CPU train what one process trains, and resume.

The comparison's tolerance: with the same global batch (2 processes x 2 images against 1 x 4), the
same seed and the learning rates scaled as the linear rule scales them, the parameters' distance from
the one-process run, over the distance they moved in training (L2 over all parameters), stays under
``TOLERANCE`` (15%). It is not zero because the two runs add the same numbers in another order, and
AdamW's first step moves every weight by about ``lr * sign(gradient)``: a weight whose gradient sums
per-image terms that nearly cancel takes a full step one way or the other on rounding noise alone.
Measured on this 2-core machine over six seeds and phase lengths: 0.3% to 4.2% (4.2% for this test's
settings); per-process batch-norm statistics, the learning rates left unscaled or another seed give
60% to 140%. Two runs with the same number of processes agree exactly, which the resume test uses.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from course_utils.cli import main
from course_utils.core.artifacts import FinetuneRecord
from course_utils.core.config import CourseConfig, TrainConfig
from course_utils.core.environment import seed_everything
from course_utils.core.ledger import Ledger
from course_utils.vision import distributed, finetune, zoo
from course_utils.vision.data import ImageFolderDataset
from course_utils.vision.zoo import WeightsUnavailableError

TOLERANCE = 0.15


@pytest.fixture
def small_dataset(noise_image_folder: Callable[[int, int], Any]) -> ImageFolderDataset:
    """Two classes of noise (dark, bright): 4 training and 2 validation images each."""
    return noise_image_folder(4, 2)


@pytest.fixture(autouse=True)
def _free_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(distributed.PORT_VARIABLE, raising=False)  # the launcher picks a free port


def _settings(config: CourseConfig, workspace: Path, gpus: int, batch_size: int, lr_scale: int) -> CourseConfig:
    """Two head epochs (the interruption falls inside a phase) and one fine-tune epoch."""
    settings = config.model_copy(deep=True)
    settings.workspace = workspace
    settings.train = settings.train.model_copy(update={
        "gpus": gpus, "batch_size": batch_size, "epochs_head": 2, "epochs_finetune": 1,
        "lr_head": config.train.lr_head * lr_scale, "lr_finetune": config.train.lr_finetune * lr_scale})
    return settings


def _initial_model(config: CourseConfig, classes: list[str]) -> zoo.Classifier:
    """The model ``train_classifier`` starts from: pretrained backbone, head drawn from the seed."""
    seed_everything(config.seed)
    return zoo.load(config.model.backbone, classes, cache_root=config.workspace / "cache")


def _whole_run_then_an_interrupted_one(config: CourseConfig, dataset: ImageFolderDataset, whole: Path) -> None:
    """In each rank: a whole run in ``whole``, then the stage's own run stopped after its first epoch."""
    finetune.fit(_initial_model(config, dataset.classes), dataset, config, run_dir=whole)
    finetune.fit(_initial_model(config, dataset.classes), dataset, config, max_epochs_this_call=1)


def _last(run_dir: Path) -> dict:
    return torch.load(run_dir / "last.pt", weights_only=True)


def _relative_distance(weights: dict, reference: dict, start: dict, names: set[str]) -> float:
    """|weights - reference| / |reference - start| over the tensors ``names`` (L2)."""
    apart = sum(((weights[n].double() - reference[n].double()) ** 2).sum() for n in names)
    moved = sum(((reference[n].double() - start[n].double()) ** 2).sum() for n in names)
    return float((apart / moved).sqrt())


def _without_timings(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k not in {"seconds", "images_per_second"}} for record in history]


@pytest.mark.slow
def test_two_processes_train_what_one_process_trains_and_resume(small_dataset: ImageFolderDataset,
                                                                  config: CourseConfig, tmp_path: Path) -> None:
    one = _settings(config, tmp_path / "one", gpus=1, batch_size=4, lr_scale=2)
    two = _settings(config, tmp_path / "two", gpus=2, batch_size=2, lr_scale=1)
    initial = _initial_model(one, small_dataset.classes)
    start, parameters = initial.state_dict(), {name for name, _ in initial.named_parameters()}
    _, reference_run, _ = finetune.train_classifier(one, small_dataset)
    reference = _last(reference_run.checkpoint.parent)

    distributed.launch(distributed.plan_launch(2), _whole_run_then_an_interrupted_one, two, small_dataset,
                       tmp_path / "whole")
    resumed = finetune.run(two, small_dataset)  # the stage, in 2 processes: resumes the interrupted run

    assert resumed.training.resumed_from_epoch == 1 and resumed.training.completed
    whole, final = _last(tmp_path / "whole"), _last(resumed.training.checkpoint.parent)
    assert _without_timings(final["history"]) == _without_timings(whole["history"])
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, final["model"][name]), name

    assert _relative_distance(final["model"], reference["model"], start, parameters) < TOLERANCE
    assert len(final["history"]) == len(reference["history"]) == 3
    for mine, theirs in zip(final["history"], reference["history"]):
        assert (mine["phase"], mine["lr"], mine["val_top1"]) == (theirs["phase"], theirs["lr"], theirs["val_top1"])
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-2)

    stated = Ledger(two.workspace).require(FinetuneRecord).settings["data_parallel"]
    assert (stated["processes"], stated["global_batch"], stated["lr_head"], stated["lr_finetune"]) == (
        2, 4, two.train.lr_head * 2, two.train.lr_finetune * 2)
    best = torch.load(resumed.training.checkpoint, weights_only=True)["model"]  # rank 0 saved the best epoch's
    assert all(torch.equal(best[name], value) for name, value in resumed.model.state_dict().items())


def _fail_on_rank_one() -> None:
    if distributed.current().rank == 1:
        raise WeightsUnavailableError("no weights on rank 1")
    distributed.barrier()  # rank 0 waits for a rank that never comes: the launcher must stop it


@pytest.mark.slow
def test_a_course_error_in_one_rank_stops_every_rank_and_arrives_as_itself(capfd: pytest.CaptureFixture) -> None:
    with pytest.raises(WeightsUnavailableError, match="no weights on rank 1"):
        distributed.launch(distributed.plan_launch(2), _fail_on_rank_one)
    assert "Traceback" not in capfd.readouterr().err


def test_more_gpus_than_present_or_no_nccl_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(distributed.DistributedError, match="more GPUs than this machine has"):
        distributed.plan_launch(2)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: False)
    with pytest.raises(distributed.DistributedError, match="no NCCL"):
        distributed.plan_launch(2)


def test_a_port_in_use_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setenv(distributed.PORT_VARIABLE, str(port))
        with pytest.raises(distributed.DistributedError, match=f"Port {port} .* in use"):
            distributed.plan_launch(2)


def test_the_cli_refuses_more_processes_than_the_machine_has(config: CourseConfig,
                                                             capsys: pytest.CaptureFixture) -> None:
    code = main(["train", "--spec", "smoke", "--set", f"workspace={config.workspace}", "--gpus", "4096"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "at most" in err and len(err.strip().splitlines()) == 1
    assert not (config.workspace / "train").exists()


def test_the_plan_states_the_global_batch_and_the_scaled_rates() -> None:
    line = distributed.LaunchPlan(4, "cuda", "nccl", 0).describe(TrainConfig(batch_size=16, lr_head=0.003,
                                                                            lr_finetune=0.0005))
    assert "global batch 64 = 4 x 16" in line and "head 0.012" in line and "fine-tune 0.002" in line
