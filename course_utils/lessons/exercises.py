"""The notebooks' exercises, checked: one function per exercise, in course order.

Each takes the learner's answer (None: not attempted) and computes the expected one from the course's own
objects, so a check never hard-codes a result it could measure; ``strict=True`` (``SHOW_SOLUTIONS``) raises
on a wrong answer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from course_utils.lessons.checks import ExerciseResult, check_value

if TYPE_CHECKING:
    from course_utils.core.config import CourseConfig
    from course_utils.deploy.onnx_export import OnnxArtifacts
    from course_utils.deploy.runtimes import RuntimeResult
    from course_utils.genai.imagegen import Generation
    from course_utils.genai.llm import Endpoint
    from course_utils.vision.data import ImageFolderDataset
    from course_utils.vision.zoo import Classifier


def check_train_counts(dataset: ImageFolderDataset, answer: dict[str, int] | None, strict: bool = False) -> ExerciseResult:
    """Notebook 00: the number of training images of each class, as ``{class: count}``."""
    expected = dataset.counts()["train"]
    return check_value(
        None if answer is None else dict(answer), expected,
        f"Right: {expected}. Class balance matters: on a 90/10 split, 90% accuracy means nothing.",
        "Not quite. Hint: `dataset.samples['train']` is a list of (path, label) pairs and "
        "`dataset.classes[label]` names a label.",
        strict,
    )


def check_normalised_white(model: Classifier, answer: float | None, strict: bool = False) -> Any:
    """Notebook 01 exercise: the value a white pixel (255) has after the model's normalisation (red channel)."""
    expected = (255 - model.preprocessing.mean[0]) / model.preprocessing.std[0]
    return check_value(
        answer, expected,
        f"Right: {expected:.4f}. Feed a model the statistics it was trained with, or its accuracy quietly drops.",
        "Not quite. Hint: normalised = (pixel - mean) / std, with mean and std from `model.preprocessing` "
        "(on the 0-255 scale).",
        strict, equal=lambda a, b: abs(float(a) - b) < 1e-3,
    )


def check_head_parameters(model: Classifier, answer: int | None, strict: bool = False) -> Any:
    """Notebook 02 exercise: the number of parameters phase 1 (head only) trains."""
    head = model.head_parameter_names()
    expected = sum(p.numel() for name, p in model.named_parameters() if name in head)
    total = sum(p.numel() for p in model.parameters())
    return check_value(
        answer, expected,
        f"Right: {expected:,} of {total:,} ({expected / total:.2%}). That is why phase 1 needs so little data.",
        "Not quite. Hint: sum `p.numel()` over the parameters whose names are in `model.head_parameter_names()`.",
        strict,
    )


def check_macs_kept(ratio: float, answer: float | None, strict: bool = False) -> ExerciseResult:
    """Notebook 03: the fraction of a convolution's MACs left when ``ratio`` of its in and out channels go."""
    expected = (1 - ratio) ** 2
    return check_value(
        answer, expected,
        f"Right: (1 - {ratio})² = {expected:.4g}. A convolution's MACs grow with input x output channels, so "
        "channel pruning saves quadratically; depthwise convolutions (one input channel each) only linearly.",
        "Not quite. Hint: a convolution's MACs are C_in x C_out x kernel area x output pixels, and pruning "
        "removes the same fraction of C_in (the previous layer's outputs) and of C_out.",
        strict, equal=lambda a, b: abs(float(a) - b) < 0.01,
    )


def check_deployed_kind(answer: str | None, config: CourseConfig, strict: bool = False) -> ExerciseResult:
    """Notebook 03: which model ships, ``"pruned"`` or ``"finetuned"``, as ``deployed_model`` decides it."""
    from course_utils.core.ledger import Ledger, deployed_model

    deployed = deployed_model(Ledger(config.workspace), config)
    return check_value(
        answer, deployed.kind,
        f"Right: the {deployed.kind} model ships, because {deployed.reason}. Every later stage (export, engines, "
        "INT8, QAT, the app) starts from it.",
        "Not quite. Hint: the pruned model ships only when it removes at least `prune.target_macs_reduction` of the "
        "MACs *and* its top-1 is within `prune.max_top1_drop` of the unpruned model's; both must hold.",
        strict,
    )


def check_most_folded_op(artifacts: OnnxArtifacts, answer: str | None, strict: bool = False) -> ExerciseResult:
    """Exercise: the op type that constant folding (the ``sanitize`` step alone) removed the most nodes of."""
    from course_utils.deploy.graph_optimize import GraphStats, histogram_delta

    row = next(r for r in artifacts.steps if r["run"] == "single" and r["step"] == "sanitize")
    delta = histogram_delta(artifacts.stats("raw"), GraphStats(row["nodes"], row["ops"]))
    expected = min(delta, key=lambda op: delta[op]) if delta else ""
    return check_value(
        answer, expected,
        f"Right: {expected} ({delta.get(expected, 0):+d}). Those nodes only computed values known before any image "
        "arrives; folding computed them once, at optimization time.",
        "Not quite. Hint: `histogram_delta(artifacts.stats('raw'), GraphStats(row['nodes'], row['ops']))` for the "
        "`sanitize` row of `artifacts.steps` whose `run` is 'single'; the most negative count wins.",
        strict)


def check_batch_dimension(path: Path, answer: str | int | None, strict: bool = False) -> ExerciseResult:
    """Exercise: the first dimension of the exported graph's input, read from the ONNX file."""
    from course_utils.deploy.onnx_export import batch_dimension

    expected = batch_dimension(path)
    return check_value(
        answer, expected,
        f"Right: {expected!r}. A name instead of a number means any batch size is accepted; TensorRT turns it "
        "into an optimization profile (min/opt/max) in the next notebook.",
        "Not quite. Hint: `onnx.load(path).graph.input[0].type.tensor_type.shape.dim[0]` has a `dim_param` "
        "(a name) or a `dim_value` (a number).",
        strict)


def check_profile_shapes(answer: dict[str, tuple[int, ...]] | None, config: CourseConfig, input_size: int,
                         strict: bool = False) -> ExerciseResult:
    """Notebook 05 exercise: the min/opt/max input shapes of the engines' first profile."""
    from course_utils.deploy.tensorrt_engines import batch_profiles

    expected = batch_profiles(config.engine)[0].shapes(input_size)
    return check_value(
        None if answer is None else {k: tuple(v) for k, v in answer.items()}, expected,
        f"Right: {expected}. TensorRT tunes its kernels for `opt`, and refuses batches outside min..max.",
        "Not quite. Hint: shapes are NCHW, (batch, 3, size, size), with the batches from "
        "config.engine.batch_min / batch_opt / batch_max.",
        strict,
    )


def check_speedup(answer: float | None, results: Sequence[RuntimeResult],
                  strict: bool = False) -> ExerciseResult:
    """Notebook 05 exercise: ONNX Runtime FP32's throughput at batch 8 divided by PyTorch FP32's."""
    from course_utils.deploy.runtimes import speedup

    expected = speedup(results, "onnxruntime_fp32", "pytorch_fp32")
    return check_value(
        answer, expected,
        f"Right: {expected:.2f}x. Same model, same CPU: graph fusion and a lean runtime make the difference.",
        "Not quite. Hint: find the two results by `.key`, take `.latencies[8].throughput` of each, divide.",
        strict, equal=lambda a, b: abs(float(a) - b) <= 0.02 * b,
    )


def check_quantization_steps(answer: dict[str, float] | None, high: float = 6.0,
                             strict: bool = False) -> ExerciseResult:
    """Notebook 06 exercise: the step between two INT8 levels for activations in [0, ``high``], S8 symmetric and U8."""
    expected = {"s8": high / 127, "u8": high / 255}
    return check_value(
        None if answer is None else {k: float(v) for k, v in answer.items()}, expected,
        f"Right: S8 steps of {expected['s8']:.4f}, U8 steps of {expected['u8']:.4f}. A symmetric S8 range spends "
        "its negative half on values a ReLU6 never outputs: U8 resolves activations twice as finely.",
        "Not quite. Hint: symmetric S8 maps [-amax, amax] onto [-127, 127], so one step is amax / 127; "
        "asymmetric U8 maps [min, max] onto [0, 255].",
        strict,
        equal=lambda a, b: set(a) == set(b) and all(abs(a[k] - b[k]) <= 1e-4 for k in b),
    )


def check_fake_quant(answer: float | None, value: float = 0.1234, amax: float = 1.0,
                     strict: bool = False) -> ExerciseResult:
    """Notebook 07 exercise: what symmetric INT8 fake quantization (scale ``amax / 127``) turns ``value`` into."""
    scale = amax / 127
    expected = float(np.clip(np.round(value / scale), -127, 127) * scale)
    return check_value(
        answer, expected,
        f"Right: {value} becomes {expected:.6f} (level {round(value / scale)} of ±127). The forward pass sees this "
        "rounded value; the backward pass pretends rounding was the identity, so the weights can still learn.",
        "Not quite. Hint: scale = amax / 127; quantize with round(value / scale), clip to [-127, 127], multiply back.",
        strict, equal=lambda a, b: abs(float(a) - b) <= 1e-6,
    )


def rails_verdicts(requests: Sequence[str], configuration: str, endpoint: Endpoint | None = None,
                   cache_dir: Path | None = None) -> dict[str, str]:
    """Which rail type stops each request in ``configuration``: ``input``, ``dialog`` or ``none``, as the rails
    themselves answer (``story_rails.evaluate_rails``: the input and dialog rails, no story written)."""
    from course_utils.genai.story import StoryError
    from course_utils.genai.story_rails import RedTeamItem, evaluate_rails

    items = [RedTeamItem(text, adversarial=False, category="exercise") for text in requests]
    result = evaluate_rails(configuration, items, endpoint, cache_dir=cache_dir)
    if result.skipped:
        raise StoryError(f"The {configuration} rails cannot run here ({result.skipped}): pick another configuration.")
    return {item.text: verdict.rail_type or "none" for item, verdict in zip(result.items, result.verdicts)}


def check_rail_for(answer: dict[str, str] | None, requests: Sequence[str], configuration: str,
                   endpoint: Endpoint | None = None, cache_dir: Path | None = None,
                   strict: bool = False) -> ExerciseResult:
    """Notebook 08: which rail type stops each request in ``configuration``, ``{"request": "input" | "dialog" |
    "none"}``, checked against the rails' own verdicts (``rails_verdicts``)."""
    expected = rails_verdicts(requests, configuration, endpoint, cache_dir)
    wrong = [text for text in expected if (answer or {}).get(text) != expected[text]]
    return check_value(
        answer, expected,
        f"Right, for the {configuration} rails: {expected}. Injections and harm die at the input rails; an off-topic "
        "question is stopped by the learned classifier (input, in `guarded`), by the dialog rails (`semantic`), or "
        "not at all by keyword rules; a benign request reaches the model, whose story the output rails still read.",
        f"Not quite, for the {configuration} rails: look again at {wrong}. Keyword rules catch trigger words only; "
        "the learned classifier (`guarded`) also stops off-topic questions at the input rails; the dialog rails "
        "run in `semantic` only.",
        strict,
    )


def check_unet_rows(answer: int | None, generation: Generation, strict: bool = False) -> ExerciseResult:
    """Notebook 09 exercise: how many latent rows the UNet processed for ``generation`` (measured by a hook)."""
    return check_value(
        answer, generation.unet_rows,
        f"Right: {generation.unet_rows}. Classifier-free guidance (guidance_scale > 1) runs the UNet on a "
        "conditional and an unconditional row at every step: twice the work. SD-Turbo skips it (guidance 0).",
        "Not quite. Hint: one row per denoising step, and guidance_scale > 1 adds an unconditional row per step.",
        strict,
    )


def check_wer(answer: float | None, reference: str, hypothesis: str, strict: bool = False) -> ExerciseResult:
    """Notebook 11 exercise: the word error rate of ``hypothesis`` against ``reference``, worked out by hand."""
    from course_utils.genai.speech import word_error_rate

    expected = word_error_rate(reference, hypothesis)
    return check_value(
        answer, expected,
        f"Right: {expected:.3f}. WER counts word edits, so one wrong letter costs a whole word, and it can exceed 1.",
        "Not quite. Hint: count substitutions + deletions + insertions (after lower-casing and dropping "
        "punctuation), then divide by the number of words in the *reference*.",
        strict, equal=lambda a, b: math.isclose(float(a), b, abs_tol=1e-3),
    )


def check_demo_steps(answer: set[str] | None, strict: bool = False) -> ExerciseResult:
    """Notebook 10 exercise: which steps must happen before the demo (of ``DEMO_STEP_QUIZ``)?"""
    expected = {step for step, ahead in DEMO_STEP_QUIZ.items() if ahead}
    return check_value(
        None if answer is None else set(answer), expected,
        "Right: training, export, calibration, engine builds and downloads take minutes and can fail; "
        "classifying, writing and drawing take seconds, so they are the show.",
        "Not quite. Hint: what takes minutes, needs the network or can fail for reasons the audience should "
        "never watch you debug? Those steps belong to `prepare-demo`.",
        strict,
    )


# Steps of the demo -> whether they must happen ahead of time (True) or may happen live (False).
DEMO_STEP_QUIZ: dict[str, bool] = {
    "fine-tune the classifier": True, "export to ONNX": True, "calibrate INT8": True,
    "build TensorRT engines": True, "download the picture model": True,
    "classify the photos": False, "write the story": False, "draw the picture": False,
}
