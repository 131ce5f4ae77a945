"""Image generation: the tiny offline pipeline, schedulers, memory plans, the blocked-story guard, the round trip."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from course_utils.core.config import CourseConfig, ImageGenConfig
from course_utils.genai import imagegen
from course_utils.genai.imagegen import DeviceInfo, memory_plan
from course_utils.lessons import exercises
from course_utils.lessons.checks import ExerciseFailed

pytest.importorskip("diffusers")


@dataclass
class Story:
    text: str = "An ant carries a leaf across the garden. It is heavy."
    image_prompt: str = "an ant carrying a green leaf"
    blocked: bool = False
    blocked_by: str | None = None


@pytest.fixture(scope="module")
def generator(tmp_path_factory: pytest.TempPathFactory) -> imagegen.ImageGenerator:
    """The tiny random pipeline, built once for the module (offline, CPU)."""
    from course_utils.core.config import load_config

    torch.set_num_threads(1)
    workspace = tmp_path_factory.mktemp("imagegen") / "workspace"
    config = load_config("smoke", {"workspace": str(workspace)}, environ={})
    return imagegen.load_generator(config, imagegen.resolve_model(config, online=False), DeviceInfo("cpu"))


def test_offline_the_tiny_random_pipeline_is_built_and_says_it_is_noise(generator: imagegen.ImageGenerator) -> None:
    source = generator.source
    assert source.name == "tiny-random-sd" and source.real_weights is False and source.local_files_only
    assert "NOISE" in source.note and "imagegen.model" in source.note
    folder = Path(source.location)
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler", "model_index.json"} <= {p.name for p in folder.iterdir()}
    assert json.loads((folder / imagegen.TINY_MARKER).read_text())["fingerprint"]["real_weights"] is False


def test_the_tiny_pipeline_is_reused_and_rebuilt_when_stale(generator: imagegen.ImageGenerator) -> None:
    folder = Path(generator.source.location)
    stamp = (folder / "model_index.json").stat().st_mtime_ns
    assert imagegen.build_tiny_pipeline(folder, seed=42) == folder
    assert (folder / "model_index.json").stat().st_mtime_ns == stamp, "a valid pipeline must be reused"
    marker = folder / imagegen.TINY_MARKER
    data = json.loads(marker.read_text())
    data["fingerprint"]["recipe"] = -1
    marker.write_text(json.dumps(data))
    imagegen.build_tiny_pipeline(folder, seed=42)
    assert json.loads(marker.read_text())["fingerprint"]["recipe"] == imagegen.TINY_RECIPE


def test_the_saved_pipeline_reloads_offline_and_draws_the_same_picture(generator: imagegen.ImageGenerator) -> None:
    from diffusers import StableDiffusionPipeline

    first = generator.generate("a bee on a flower", steps=2, seed=3, size=64)
    reloaded = StableDiffusionPipeline.from_pretrained(generator.source.location, local_files_only=True)
    again = imagegen.ImageGenerator(reloaded, generator.source, generator.plan, reloaded.scheduler)
    again.pipe.set_progress_bar_config(disable=True)
    second = again.generate("a bee on a flower", steps=2, seed=3, size=64)
    assert first.image.size == (64, 64)
    assert np.array_equal(np.asarray(first.image), np.asarray(second.image))
    third = generator.generate("a bee on a flower", steps=2, seed=4, size=64)
    assert not np.array_equal(np.asarray(first.image), np.asarray(third.image)), "the seed must matter"


@pytest.mark.parametrize("name, cls", [("ddim", "DDIMScheduler"), ("euler_a", "EulerAncestralDiscreteScheduler"),
                                       ("lcm", "LCMScheduler")])
def test_schedulers_switch_and_switch_back(generator: imagegen.ImageGenerator, name: str, cls: str) -> None:
    default = type(generator.default_scheduler).__name__
    generator.use_scheduler(name)
    try:
        assert type(generator.pipe.scheduler).__name__ == cls
        assert generator.generate("a cat", steps=2, size=64).scheduler == name
    finally:
        generator.use_scheduler("default")
    assert type(generator.pipe.scheduler).__name__ == default
    with pytest.raises(imagegen.ImageGenError, match="Unknown scheduler"):
        generator.use_scheduler("karras")


def test_guidance_doubles_the_unet_rows_and_the_exercise_checks_it(generator: imagegen.ImageGenerator) -> None:
    plain = generator.generate("a cat", steps=3, guidance_scale=0.0, size=64)
    guided = generator.generate("a cat", steps=3, guidance_scale=2.0, size=64)
    assert (plain.unet_rows, guided.unet_rows) == (3, 6)
    assert exercises.check_unet_rows(6, guided).passed
    assert not exercises.check_unet_rows(3, guided).passed
    with pytest.raises(ExerciseFailed):
        exercises.check_unet_rows(3, guided, strict=True)


def test_progress_is_reported_and_cancel_stops_between_steps(generator: imagegen.ImageGenerator) -> None:
    seen: list[tuple[int, int]] = []
    generator.generate("a cat", steps=3, size=64, on_step=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    with pytest.raises(imagegen.GenerationCancelled):
        generator.generate("a cat", steps=3, size=64, cancel=lambda: True)


def test_a_blocked_story_never_reaches_the_picture(generator: imagegen.ImageGenerator) -> None:
    settings = ImageGenConfig(steps=1, size=64)
    calls = []
    hook = generator.pipe.unet.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(imagegen.BlockedStoryError, match="blocked"):
            imagegen.picture_for_story(generator, Story(blocked=True, blocked_by="violence"), settings)
        assert calls == [], "the UNet must not run for a blocked story"
        generation = imagegen.picture_for_story(generator, Story(), settings)
    finally:
        hook.remove()
    assert calls and generation.prompt.startswith("an ant carrying a green leaf, children's storybook")


def test_prompts_use_the_story_style_and_fall_back_to_the_first_sentence() -> None:
    prompt, negative = imagegen.prompt_for_story(Story(image_prompt="  "), "comic")
    assert prompt == "An ant carries a leaf across the garden., comic book panel, bold ink outlines, flat colours"
    assert "watermark" in negative
    assert imagegen.styled_prompt("a  bee", "none") == ("a bee", "")
    with pytest.raises(imagegen.ImageGenError, match="Unknown style"):
        imagegen.styled_prompt("a bee", "baroque")


@pytest.mark.parametrize("device, expected", [
    (DeviceInfo("cpu"), ("cpu", "float32", False, False, "none")),
    (DeviceInfo("jetson", 7.4, "Orin"), ("cuda", "float16", True, True, "none")),
    (DeviceInfo("jetson", 30.0, "AGX Orin"), ("cuda", "float16", False, False, "none")),
    (DeviceInfo("cuda", 4.0, "GTX"), ("cuda", "float16", True, True, "sequential")),
    (DeviceInfo("cuda", 8.0, "RTX"), ("cuda", "float16", True, True, "model")),
    (DeviceInfo("cuda", 80.0, "H100"), ("cuda", "float16", False, False, "none")),
])
def test_memory_options_follow_the_device(device: DeviceInfo, expected: tuple) -> None:
    plan = memory_plan(device, ImageGenConfig())
    assert (plan.device, plan.dtype, plan.attention_slicing, plan.vae_tiling, plan.cpu_offload) == expected


def test_memory_options_can_be_overridden() -> None:
    settings = ImageGenConfig(dtype="float32", attention_slicing=False, cpu_offload="sequential")
    plan = memory_plan(DeviceInfo("jetson", 7.4, "Orin"), settings)
    assert (plan.dtype, plan.attention_slicing, plan.vae_tiling, plan.cpu_offload) == ("float32", False, True,
                                                                                       "sequential")
    assert "overridden" in plan.reason
    assert memory_plan(DeviceInfo("cuda", 80.0), ImageGenConfig(device="cpu")).device == "cpu"
    with pytest.raises(imagegen.ImageGenError, match="no CUDA GPU"):
        memory_plan(DeviceInfo("cpu"), ImageGenConfig(device="cuda"))
    with pytest.raises(imagegen.ImageGenError, match="needs a CUDA GPU"):
        memory_plan(DeviceInfo("cpu"), ImageGenConfig(cpu_offload="model"))


def test_offline_without_fallback_the_error_says_how_to_fix(config: CourseConfig) -> None:
    config.imagegen.model = "nobody/no-such-model"
    config.imagegen.offline_fallback = None
    with pytest.raises(imagegen.ImageGenError, match="imagegen.model"):
        imagegen.resolve_model(config, online=False)
    config.imagegen.offline_fallback = "tiny-random"
    assert imagegen.resolve_model(config, online=True).location == "nobody/no-such-model"


def test_a_local_folder_is_used_as_given(generator: imagegen.ImageGenerator, config: CourseConfig,
                                         tmp_path: Path) -> None:
    config.imagegen.model = generator.source.location
    assert imagegen.resolve_model(config, online=False).real_weights is False  # the marker says random
    real = tmp_path / "my-model"
    real.mkdir()
    config.imagegen.model = str(real)
    source = imagegen.resolve_model(config, online=False)
    assert (source.real_weights, source.location) == (True, str(real))


def test_the_round_trip_reports_survival_honestly(generator: imagegen.ImageGenerator) -> None:
    from course_utils.vision import zoo

    classifier = zoo.load("lite0", ["ants", "bees"], pretrained=False)
    generation = generator.generate("an ant", steps=1, size=64)
    trip = imagegen.round_trip(classifier, generation, "ants")
    assert trip.survived == (trip.predictions[0][0] == "ants") and trip.chance == 0.5
    assert "chance" in trip.verdict and "noise" in trip.verdict
    metrics = imagegen.stage_metrics(generation, generator, trip)
    assert {"model", "real_weights", "steps", "seconds_per_image", "size"} <= set(metrics)
    assert metrics["real_weights"] is False and metrics["size"] == 64
