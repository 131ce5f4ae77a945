import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from skimage import data as sample_photos

from course_utils.lessons import exercises
from course_utils.lessons.checks import ExerciseFailed
from course_utils.vision import zoo


def test_registry_covers_the_course_backbones() -> None:
    families = {e.family for e in zoo.REGISTRY.values()}
    assert len(zoo.REGISTRY) == 28
    assert {"VGG", "Inception", "ResNet", "Swin", "Conformer", "CLIP", "EfficientViT", "EfficientNet-Lite"} <= families
    assert sum(e.source == "mmpretrain" for e in zoo.REGISTRY.values()) == 24
    sizes = {e.alias: e.input_size for e in zoo.REGISTRY.values()}
    assert (sizes["inception-v3"], sizes["mobilevit-small"], sizes["edgenext-xxsmall"], sizes["lite2"]) == (299, 256, 256, 260)


def test_every_row_names_its_weights(tmp_path: Path) -> None:
    rows = {row["alias"]: row for row in zoo.registry_table(tmp_path)}
    for row in rows.values():
        assert row["weights_url"], row["name"]
        # timm publishes no hash: its first download's sha256 is recorded and enforced afterwards.
        assert row["weights_sha256"] or row["source"] == "timm", row["name"]
        assert 0.5 < (row["imagenet_top1"] or 0.7) < 0.9
    assert re.fullmatch(r"[0-9a-f]{8}", rows["resnet50"]["weights_sha256"])
    assert rows["resnet50"]["weights_url"].startswith("https://download.openmmlab.com/")
    assert rows["lite0"]["weights_local"] and not rows["resnet50"]["weights_local"]


@pytest.mark.parametrize("typo, suggestion", [("resnet5", "resnet50"), ("efficientnet-lite", "efficientnet-lite0"),
                                              ("deit_tiny", "deit-tiny")])
def test_typos_get_suggestions(typo: str, suggestion: str) -> None:
    with pytest.raises(zoo.UnknownModelError, match=f"'{suggestion}'"):
        zoo.entry(typo)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_lite_weights_map_onto_timm_with_identical_logits(index: int) -> None:
    from efficientnet_lite_pytorch import EfficientNet

    model = zoo.load(f"efficientnet-lite{index}")
    weights = zoo.local_weights(zoo.entry(f"lite{index}"), Path("unused"))
    reference = EfficientNet.from_pretrained(f"efficientnet-lite{index}", weights_path=str(weights)).eval()
    size = model.preprocessing.input_size
    images = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        assert torch.allclose(model(images), reference(images), atol=1e-5)


def test_pretrained_lite0_recognises_the_sample_photos() -> None:
    model = zoo.load("efficientnet-lite0")
    cat, coffee = zoo.predict(model, [Image.fromarray(sample_photos.chelsea()), Image.fromarray(sample_photos.coffee())])
    assert {"tiger cat", "Egyptian cat", "tabby"} & {label for label, _ in cat[:2]}
    assert coffee[0][0] == "espresso" and coffee[0][1] > 0.5


def test_offline_without_weights_is_refused_unless_opted_in(tmp_path: Path) -> None:
    with pytest.raises(zoo.WeightsUnavailableError, match="allow_random_init"):
        zoo.load("mobilenet-v2", ["a", "b"], cache_root=tmp_path)
    with pytest.warns(UserWarning, match="RANDOM"):
        model = zoo.load("mobilenet-v2", ["a", "b"], allow_random_init=True, cache_root=tmp_path)
    assert model.weights == "random"


@pytest.mark.parametrize("name", ["mobilenet-v2", "deit-tiny", "conformer-tiny", "inception-v3",
                                  "efficientvit-b0", "lite0"])
def test_new_head_for_n_classes(name: str) -> None:
    model = zoo.load(name, ["a", "b", "c"], pretrained=False)
    size = model.preprocessing.input_size
    with torch.inference_mode():
        assert model(torch.randn(2, 3, size, size)).shape == (2, 3)
    head = model.head_parameter_names()
    assert head and all(n in dict(model.named_parameters()) for n in head)
    assert len(head) < len(list(model.parameters()))


def test_mmpretrain_models_get_their_own_initialisation() -> None:
    assert zoo.load("deit-tiny", pretrained=False).net._is_init  # init_weights() ran


def test_saved_classifier_rebuilds_identically(tmp_path: Path) -> None:
    model = zoo.load("lite0", ["ants", "bees"])
    path = zoo.save_classifier(model, tmp_path / "m.pt")
    again = zoo.load_classifier(path)
    images = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(model.eval()(images), again(images))
    assert again.classes == ["ants", "bees"] and again.weights == model.weights


def test_normalisation_exercise() -> None:
    model = zoo.load("lite0", pretrained=False)
    assert exercises.check_normalised_white(model, 1.0).passed
    assert not exercises.check_normalised_white(model, 2.2489).passed
    with pytest.raises(ExerciseFailed):
        exercises.check_normalised_white(model, 0.5, strict=True)


def test_cpu_latency_is_the_p50_of_the_one_timer() -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    threads = torch.get_num_threads()
    assert zoo.cpu_latency_ms(net, 16, batch=2, threads=1, warmup=1, iterations=3) > 0
    assert torch.get_num_threads() == threads  # the runner's thread setting does not leak
