import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from course_utils.core.config import CourseConfig
from course_utils.lessons import exercises
from course_utils.vision import finetune, zoo


@pytest.fixture
def tiny_dataset(noise_image_folder: Callable[[int, int], Any]):
    """Two visibly different classes (dark vs bright noise), 6 train and 4 val images each."""
    return noise_image_folder(6, 4)


@pytest.fixture
def tiny_config(config: CourseConfig) -> CourseConfig:
    config.train.batch_size = 4
    config.train.epochs_head = 1
    config.train.epochs_finetune = 2
    return config


def _model(classes: list[str]) -> zoo.Classifier:
    torch.manual_seed(0)
    return zoo.load("lite0", classes)


def test_an_interrupted_run_resumes_to_the_same_weights(tiny_dataset, tiny_config: CourseConfig, tmp_path: Path) -> None:
    straight = _model(tiny_dataset.classes)
    whole = finetune.fit(straight, tiny_dataset, tiny_config, run_dir=tmp_path / "a")
    assert whole.completed and whole.resumed_from_epoch is None and len(whole.history) == 3

    resumed = _model(tiny_dataset.classes)
    first = finetune.fit(resumed, tiny_dataset, tiny_config, run_dir=tmp_path / "b", max_epochs_this_call=2)
    assert not first.completed and len(first.history) == 2
    rest = finetune.fit(_model(tiny_dataset.classes), tiny_dataset, tiny_config, run_dir=tmp_path / "b")
    assert rest.completed and rest.resumed_from_epoch == 2
    assert [r.val_top1 for r in rest.history] == [r.val_top1 for r in whole.history]
    again = zoo.load("lite0", tiny_dataset.classes, pretrained=False)
    again.load_state_dict(torch.load(tmp_path / "b" / "best.pt", weights_only=True)["model"])
    for key, value in straight.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    # Asking again for a finished run trains nothing.
    assert finetune.fit(_model(tiny_dataset.classes), tiny_dataset, tiny_config, run_dir=tmp_path / "b").history == rest.history


def test_pretrained_features_separate_easy_classes(tiny_dataset, tiny_config: CourseConfig, tmp_path: Path) -> None:
    model = _model(tiny_dataset.classes)
    finetune.fit(model, tiny_dataset, tiny_config, run_dir=tmp_path / "run")
    evaluation = finetune.evaluate(model, tiny_dataset.samples["val"])
    assert evaluation.top1 == 1.0
    assert sum(map(sum, evaluation.confusion)) == 8 and not evaluation.misclassified


def test_phases_train_the_right_parameters() -> None:
    model = zoo.load("lite0", ["a", "b"], pretrained=False)
    names = [n for n, _ in model.named_parameters()]
    head = model.head_parameter_names()
    assert finetune.trainable_names(model, "head", "last") == head
    assert finetune.trainable_names(model, "finetune", "all") == set(names)
    last = finetune.trainable_names(model, "finetune", "last")
    assert head < last < set(names)
    assert "net.conv_stem.weight" not in last and "net.conv_head.weight" in last


def test_frozen_batch_norm_keeps_its_statistics() -> None:
    model = zoo.load("lite0", ["a", "b"], pretrained=False)
    finetune._set_trainable(model, model.head_parameter_names())
    finetune._train_mode(model)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    assert model.net.get_classifier().training


def test_early_stopping_ends_the_fine_tune_phase(tiny_dataset, tiny_config: CourseConfig, tmp_path: Path) -> None:
    tiny_config.train.epochs_finetune = 6
    tiny_config.train.early_stopping_patience = 1
    result = finetune.fit(_model(tiny_dataset.classes), tiny_dataset, tiny_config, run_dir=tmp_path / "run")
    assert result.completed and len(result.history) < 7


def test_head_parameter_exercise() -> None:
    model = zoo.load("lite0", ["a", "b"], pretrained=False)
    assert exercises.check_head_parameters(model, 1280 * 2 + 2).passed
    assert not exercises.check_head_parameters(model, 1280 * 2).passed


def test_a_missing_fine_tuned_model_names_the_notebook_and_trains_nothing(config: CourseConfig) -> None:
    from course_utils.core.artifacts import MissingArtifactError
    from course_utils.vision.deployment import load_finetuned

    with pytest.raises(MissingArtifactError, match="notebook 02"):
        load_finetuned(config)  # in smoke mode too: no stage quietly trains a model
    assert not (config.workspace / "train").exists()


def test_mixed_precision_follows_the_switch_on_cuda_only(config: CourseConfig) -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert finetune.mixed_precision(config.train, cuda)
    assert not finetune.mixed_precision(config.train.model_copy(update={"amp": False}), cuda)
    assert not finetune.mixed_precision(config.train, cpu)


@pytest.mark.parametrize("setting, expected", [(None, "every core"), (1, 1)])
def test_training_uses_the_train_threads_and_gives_the_timing_threads_back(
        tiny_dataset, tiny_config: CourseConfig, tmp_path: Path, setting: int | None, expected: Any) -> None:
    seen: list[int] = []

    def loss(logits: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return torch.nn.functional.cross_entropy(logits, labels)

    tiny_config.train.threads, tiny_config.train.epochs_finetune = setting, 0
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # what session.start leaves for timing (benchmark.threads)
    try:
        finetune.fit(_model(tiny_dataset.classes), tiny_dataset, tiny_config, run_dir=tmp_path / "run", loss_fn=loss)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)
    assert seen and set(seen) == {os.cpu_count() if expected == "every core" else expected}
