"""Structured pruning and retraining, TAO-style, with Torch-Pruning doing the channel surgery.

Structured pruning removes whole channels (and, in ViTs, whole attention heads), so the pruned
network is a smaller dense network that any runtime runs faster, unlike sparse weights. Torch-Pruning
traces the model into a dependency graph: removing an output channel of one layer removes the matching
input channel of every layer that reads it (residual additions, depthwise convolutions, concatenations),
so the network stays consistent. The course decides *what* may be pruned: never the classifier head's
outputs (the class count must not change), attention only as whole heads, grouped convolutions group-wise.

A pruned model no longer matches its architecture's config, so ``save_pruned`` stores the registry name,
the classes, Torch-Pruning's pruning history (which channels of which layer went) and the weights:
``load_pruned`` rebuilds the original architecture, replays the history, then loads the weights, all
from plain data read with ``weights_only=True``.

``scope="whole_blocks"`` prunes depth instead of width: it removes whole residual blocks, the ones the
training images miss least per multiply-accumulate saved. A residual block computes ``x + f(x)``, so without it
the network still computes ``x``, the path every block of a stage adds into; networks trained with
stochastic depth (EfficientNet, ConvNeXt, DeiT) learned to work with blocks left out.

Retraining wins back what the surgery cost: ``prune_and_retrain`` retrains with ``finetune.fit``, optionally
distilling from the unpruned model (``DistillationLoss``) and pruning in several smaller steps with short
retrains between them. It trains on the training images minus a dev part (``data.dev_split``) and picks its
best epoch on that dev part, so the validation split the course reports is scored once, never tuned on.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from course_utils.core.atomic import atomic_path, write_json_atomic
from course_utils.core.config import CourseConfig
from course_utils.core.environment import package_version, torch_threads
from course_utils.core.errors import CourseError
from course_utils.core.lazy import MissingDependencyError, lazy_import
from course_utils.vision.zoo import Classifier, cpu_latency_ms

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from course_utils.core.artifacts import DeployedModel, PruneRecord
    from course_utils.vision.data import ImageFolderDataset
    from course_utils.vision.finetune import Sample

IMPORTANCES: tuple[str, ...] = ("l1", "l2", "bn_scale", "taylor", "hessian", "fpgm")
SCOPES: tuple[str, ...] = ("all", "within_blocks", "whole_blocks")
GRADIENT_IMPORTANCES = ("taylor", "hessian")  # scored from loss gradients on training images
FORMAT = "course-pruned/1"
MAX_LAYER_RATIO = 0.9  # never remove more than 90% of one layer's channels
TAYLOR_BATCHES = 4
BLOCK_SCORE_IMAGES = 128  # training images a block's removal is scored on (loss increase)
MIN_BLOCK_SHARE = 0.005  # a candidate block must carry at least this share of the model's MACs
HESSIAN_SAMPLES = 32  # per-sample gradients for the Fisher (Hessian) diagonal: one backward pass each
RECORD = "pruning"  # the attribute under which a pruned Classifier carries its recipe and history

# Registry backbones the course refuses to prune, with the reason: benchmarks/prune_registry.py prunes every
# backbone and checks its forward pass, ONNX export and reload; these failed (docs/benchmarks.md).
UNPRUNABLE: dict[str, str] = {
    "shufflenet-v1-1x_16xb64_in1k": "its grouped 1x1 convolutions feed a channel shuffle, and the pruned "
    "groups no longer line up (the pruned model's forward pass fails)",
    "shufflenet-v2-1x_16xb64_in1k": "its channel split and shuffle make Torch-Pruning's dependency analysis "
    "run for minutes without finishing",
    "res2net50-w14-s8_3rdparty_8xb32_in1k": "its hierarchical split-and-concatenate of channel groups breaks "
    "Torch-Pruning's index mapping (IndexError)",
    "swin-tiny_16xb64_in1k": "its window attention carries relative-position tables that Torch-Pruning does "
    "not prune with the heads (IndexError)",
    "conformer-tiny-p16_3rdparty_in1k": "its coupled CNN and transformer branches cannot be traced by "
    "Torch-Pruning (TypeError)",
    "twins-svt-small_3rdparty_8xb128_in1k": "its locally-grouped and sub-sampled attention layers cannot be "
    "pruned as whole heads (IndexError)",
    "mvitv2-tiny_3rdparty_in1k": "its pooling attention reshapes channels per head, and the pruned model's "
    "forward pass fails",
    "edgenext-xxsmall_3rdparty_in1k": "its channel-split depthwise stages and cross-covariance attention "
    "break Torch-Pruning's index mapping (IndexError)",
    "efficientvit_b0.r224_in1k": "its multi-scale linear attention aggregates q, k and v with grouped "
    "convolutions that break Torch-Pruning's index mapping (IndexError)",
}


class PruningError(CourseError, ValueError):
    """A pruning request the course cannot carry out; the message says why and what to do instead."""


@dataclass(frozen=True)
class PruneRecipe:
    """How a model was pruned: by ``ratio`` (fraction of channels removed in every layer) or by ``threshold``.

    ``threshold`` is TAO's rule: a channel goes when its importance, divided by the largest importance in
    its layer, is below the threshold. ``granularity`` rounds kept channel counts to multiples of it
    (TAO's ``pruning_granularity``: tensor cores like multiples of 8); no layer is cut below ``min_channels``
    (TAO's ``min_num_filters``). ``input_size`` is the example input
    the dependency graph was traced with; ``effective_ratio`` is the fraction of channels a threshold removed;
    ``steps`` is how many equal steps of iterative pruning reached the ratio. ``scope`` is ``all`` (every
    prunable channel), ``within_blocks`` (the residual stream and the stem stay whole: ``stream_layers``) or
    ``whole_blocks`` (``ratio`` is then the fraction of MACs to remove by dropping residual blocks).
    """

    importance: str
    granularity: int
    input_size: int
    min_channels: int = 16
    ratio: float | None = None
    threshold: float | None = None
    effective_ratio: float | None = None
    steps: int = 1
    scope: str = "all"


def check_request(model: Classifier, ratio: float | None, threshold: float | None, importance: str,
                  scope: str = "all") -> None:
    """Raise ``PruningError`` for an out-of-range ratio or threshold, an unknown criterion, scope or backbone."""
    if (ratio is None) == (threshold is None):
        raise PruningError("Give exactly one of `ratio` (fraction of channels to remove) or `threshold` "
                           "(TAO-style normalised-magnitude threshold).")
    if ratio is not None and not 0.0 <= ratio <= MAX_LAYER_RATIO:
        raise PruningError(f"ratio={ratio} is out of range: it is the fraction of each layer's channels to "
                           f"remove, from 0.0 (nothing) to {MAX_LAYER_RATIO} (keep one in ten), e.g. 0.5.")
    if threshold is not None and not 0.0 < threshold < 1.0:
        raise PruningError(f"threshold={threshold} is out of range: importances are divided by their layer's "
                           "largest, so the threshold must lie strictly between 0 and 1 (TAO uses 0.1-0.7).")
    if importance not in IMPORTANCES:
        raise PruningError(f"Unknown importance {importance!r}: choose one of {', '.join(IMPORTANCES)}.")
    if scope not in SCOPES:
        raise PruningError(f"Unknown scope {scope!r}: choose one of {', '.join(SCOPES)}.")
    if scope == "whole_blocks" and threshold is not None:
        raise PruningError("scope='whole_blocks' removes whole blocks, not channels: give `ratio` (the fraction "
                           "of MACs to remove, e.g. 0.4) instead of TAO's channel `threshold`.")
    if model.backbone in UNPRUNABLE:
        raise PruningError(f"{model.backbone} cannot be pruned by the course: {UNPRUNABLE[model.backbone]}. "
                           "Pick another backbone (efficientnet-lite0, resnet50, mobilenet-v2, deit-tiny…).")


def example_input(model: Classifier, input_size: int | None = None, batch_size: int = 1) -> torch.Tensor:
    """A zero batch of the model's input shape (what tracing, MAC counting and timing feed it)."""
    size = input_size or model.preprocessing.input_size
    return torch.zeros(batch_size, 3, size, size)


def _importance(name: str, normalizer: str | None) -> Any:
    tp = lazy_import("torch_pruning", "train", "Pruning")

    if name == "bn_scale":
        return tp.importance.BNScaleImportance(normalizer=normalizer)
    if name == "taylor":
        return tp.importance.GroupTaylorImportance(normalizer=normalizer)
    if name == "hessian":
        return tp.importance.GroupHessianImportance(normalizer=normalizer)
    if name == "fpgm":
        return tp.importance.FPGMImportance(normalizer=normalizer)
    return tp.importance.GroupMagnitudeImportance(p=1 if name == "l1" else 2, normalizer=normalizer)


def head_modules(model: Classifier) -> list[nn.Module]:
    """The classifier head's layers: their outputs are the classes, so they are never pruned."""
    names = model.head_parameter_names()
    return [module for prefix, module in model.named_modules()
            if (own := [f"{prefix}.{n}" for n, _ in module.named_parameters(recurse=False)])
            and all(name in names for name in own)]


def _attention_heads(model: Classifier) -> dict[nn.Module, int]:
    """``{qkv layer: head count}`` for the attention layers pruned as whole heads (after the tracing fix)."""
    from course_utils.vision.compat import fix_mmpretrain_attention

    return {attention.qkv: attention.num_heads for attention in fix_mmpretrain_attention(model)}


def _update_head_counts(model: Classifier) -> None:
    """After heads went, each attention layer's head count follows from its qkv width (head size is kept)."""
    from course_utils.vision.compat import fix_mmpretrain_attention

    for attention in fix_mmpretrain_attention(model):
        attention.num_heads = attention.qkv.out_features // (3 * attention.head_dims)
        attention.embed_dims = attention.num_heads * attention.head_dims


def _gradient_batches(model: Classifier, samples: list[Sample] | None, importance: str,
                      batch_size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``TAYLOR_BATCHES`` batches of ``samples`` (evaluation transform), for gradient-based scores."""
    from course_utils.vision.finetune import ImageSamples

    if not samples:
        raise PruningError(f"importance={importance!r} needs data to compute loss gradients: pass `samples` "
                           "(e.g. dataset.samples['train']), or choose l1, l2, bn_scale or fpgm.")
    loader = torch.utils.data.DataLoader(ImageSamples(samples, model.preprocessing.eval_transform()),
                                         batch_size=batch_size, shuffle=False)
    return [batch for _, batch in zip(range(TAYLOR_BATCHES), loader)]


def _score_gradients(model: Classifier, pruner: Any, importance: str, samples: list[Sample] | None) -> None:
    """Fill the gradients a gradient-based criterion reads, on the model as it is now.

    Taylor importance is |weight x gradient|: the loss gradient summed over a few batches. Hessian importance
    (grouped Optimal Brain Damage) is weight² x the Fisher diagonal, the mean of *per-sample* squared gradients.
    Torch-Pruning 1.6.1's ``accumulate_grad`` keeps only the last sample it was given (its running sum is
    keyed by parameter but looked up by name), so the course sums the squares itself and hands over their
    root mean square once: squared again inside, that is exactly the Fisher diagonal.
    """
    model.zero_grad()
    batches = _gradient_batches(model, samples, importance)
    if importance == "taylor":
        for images, labels in batches:
            nn.functional.cross_entropy(model(images), labels).backward()
        return
    squares: dict[nn.Parameter, torch.Tensor] = {}
    pairs = [(image, label) for images, labels in batches for image, label in zip(images, labels)]
    for image, label in pairs[:HESSIAN_SAMPLES]:
        model.zero_grad()
        nn.functional.cross_entropy(model(image[None]), label[None]).backward()
        for parameter in model.parameters():
            if parameter.grad is not None:
                squares[parameter] = squares.get(parameter, 0) + parameter.grad.detach() ** 2
    count = min(len(pairs), HESSIAN_SAMPLES)
    for parameter in model.parameters():
        parameter.grad = (squares[parameter] / count).sqrt() if parameter in squares else None
    pruner.importance.zero_grad()
    pruner.importance.accumulate_grad(model)


def _narrow_layer_ratios(model: Classifier, ratio: float, recipe: PruneRecipe,
                         skip: set[nn.Module]) -> dict[nn.Module, float]:
    """Smaller ratios for layers that would otherwise keep fewer than ``recipe.min_channels`` outputs.

    TAO's ``min_num_filters``: narrow layers (the stem, the first blocks) carry everything that follows,
    and rounding to the granularity would otherwise halve a 16-channel layer at any ratio.
    """
    step = recipe.granularity
    floor = -(-recipe.min_channels // step) * step  # min_channels rounded up to the granularity
    limits: dict[nn.Module, float] = {}
    for module in model.modules():
        if module in skip or not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            continue
        width = module.out_channels if isinstance(module, nn.modules.conv._ConvNd) else module.out_features
        kept = (width - int(width * ratio)) // step * step
        if kept < floor:
            limits[module] = max(0.0, (width - floor) / width - 1e-9)
    return limits


PRUNABLE_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


def stream_layers(model: Classifier, input_size: int | None = None) -> list[nn.Module]:
    """The layers whose output channels leave their block: the residual stream and the stem.

    Torch-Pruning groups the channels that must go together. A group written by two or more dense (not
    depthwise) layers is a residual stream: every block of a stage adds its output into the same channels
    (a ResNet or MobileNet stage, a ViT's embedding). The group written by the convolution that reads the
    image's 3 channels is the stem. Keeping these whole and pruning only inside the blocks (the expanded
    channels of an inverted residual, a bottleneck's middle, an MLP's hidden layer, attention heads) leaves
    every block's input as it was trained.
    """
    tp = lazy_import("torch_pruning", "train", "Pruning")

    _attention_heads(model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        graph = tp.DependencyGraph().build_dependency(model, example_input(model, input_size))
    kept: list[nn.Module] = []
    for group in graph.get_all_groups(ignored_layers=head_modules(model), root_module_types=list(PRUNABLE_TYPES)):
        writers = [dep.target.module for dep, _ in group
                   if graph.is_out_channel_pruning_fn(dep.handler) and isinstance(dep.target.module, PRUNABLE_TYPES)]
        dense = [layer for layer in writers if getattr(layer, "groups", 1) == 1]
        if len(dense) > 1 or any(getattr(layer, "in_channels", None) == 3 for layer in dense):
            kept.extend(layer for layer in dense if layer not in kept)
    return kept


def _parent_and_name(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, child = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), child


def residual_blocks(model: Classifier) -> list[str]:
    """The blocks that can be left out: items of a stage (``nn.Sequential`` or ``nn.ModuleList``) that pass
    their input through when their weights are zero, and carry at least ``MIN_BLOCK_SHARE`` of the MACs.

    A residual block computes ``x + f(x)``: with every weight zeroed ``f`` is 0 and the block returns its input,
    where a plain layer (a VGG convolution, a MobileNet's depthwise step) returns zeros. Testing that on the
    input each item sees in one forward pass finds the blocks of any architecture without a list per family:
    every block of a stage but the first (which changes the width or the resolution) in ResNets, MobileNets,
    EfficientNets, ConvNeXts and ViTs.
    """
    heads = set(head_modules(model))
    stages = [(name, module) for name, module in model.named_modules()
              if isinstance(module, (nn.Sequential, nn.ModuleList))]
    items = {f"{stage}.{child}" if stage else child: block for stage, module in stages
             for child, block in module.named_children()
             if any(True for _ in block.parameters()) and block not in heads}
    seen: dict[str, torch.Tensor] = {}  # each same-shape item's input in one forward pass

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if (len(inputs) == 1 and isinstance(inputs[0], torch.Tensor) and isinstance(output, torch.Tensor)
                    and inputs[0].shape == output.shape):
                seen[name] = inputs[0].detach().clone()
        return hook

    handles = [block.register_forward_hook(record(name)) for name, block in items.items()]
    try:
        with torch.inference_mode():
            model.eval()(torch.randn(example_input(model).shape, generator=torch.Generator().manual_seed(0)))
    finally:
        for handle in handles:
            handle.remove()
    total = macs_and_params(model)[0]
    return [name for name in items if name in seen and _passes_input_when_zeroed(items[name], seen[name])
            and _block_macs(model, name) >= MIN_BLOCK_SHARE * total]


def _passes_input_when_zeroed(block: nn.Module, inputs: torch.Tensor) -> bool:
    """Whether a copy of ``block`` with all weights zero returns ``inputs`` (a residual block does)."""
    zeroed = copy.deepcopy(block).eval()
    with torch.inference_mode():
        for parameter in zeroed.parameters():
            parameter.zero_()
        return bool(torch.allclose(zeroed(inputs), inputs, atol=1e-5))


def _block_macs(model: Classifier, name: str) -> int:
    """The MACs of one image's pass through the block ``name`` (the model's MACs with and without it)."""
    with _left_out(model, [name]):
        without = macs_and_params(model)[0]
    return macs_and_params(model)[0] - without


@contextmanager
def _left_out(model: nn.Module, names: list[str]) -> Iterator[None]:
    """``model`` with the blocks ``names`` replaced by ``nn.Identity`` for the duration, then restored."""
    saved = [(*_parent_and_name(model, name), model.get_submodule(name)) for name in names]
    drop_blocks(model, names)
    try:
        yield
    finally:
        for parent, child, block in reversed(saved):
            parent.register_module(child, block)


def _scoring_batches(model: Classifier, samples: list[Sample]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Up to ``BLOCK_SCORE_IMAGES`` of ``samples`` with the evaluation transform, decoded once for every block."""
    from course_utils.vision.finetune import ImageSamples

    return list(torch.utils.data.DataLoader(
        ImageSamples(samples[:BLOCK_SCORE_IMAGES], model.preprocessing.eval_transform()), batch_size=32))


def _training_loss(model: Classifier, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean cross-entropy of ``model`` on ``batches``, on every core (untimed work: 1.6x faster than one here)."""
    from course_utils.vision.finetune import working_threads

    total, count = 0.0, 0
    with torch.inference_mode(), torch_threads(working_threads()):
        for images, labels in batches:
            total += float(nn.functional.cross_entropy(model.eval()(images), labels, reduction="sum"))
            count += len(labels)
    return total / max(count, 1)


# Block scores by model weights and images, kept for the process: a sweep and its distilled twin (notebook 03)
# prune the same model on the same images, and scoring every block costs a forward pass per block.
_BLOCK_SCORES: dict[str, list[tuple[str, float, int]]] = {}


def blocks_to_drop(model: Classifier, ratio: float, samples: list[Sample] | None) -> list[str]:
    """The residual blocks whose removal saves at least ``ratio`` of the MACs for the least training loss.

    Each block is scored alone: the increase of the training loss without it. The set is then the one whose
    summed increase is least among those saving ``ratio`` (``cheapest_covering_set``), cheapest block first.
    """
    if not samples:
        raise PruningError("scope='whole_blocks' ranks blocks by the training loss without them: pass `samples` "
                           "(e.g. dataset.samples['train']).")
    candidates = residual_blocks(model)
    if not candidates:
        raise PruningError(f"{model.backbone} has no residual blocks the course can leave out: use "
                           "scope='all' or 'within_blocks' (channel pruning).")
    if ratio <= 0:
        return []
    key = json.dumps([fingerprint(model), [str(path) for path, _ in samples[:BLOCK_SCORE_IMAGES]]])
    if key not in _BLOCK_SCORES:
        batches = _scoring_batches(model, samples)
        base_loss = _training_loss(model, batches)
        scored = []
        for name in candidates:
            with _left_out(model, [name]):
                increase = _training_loss(model, batches) - base_loss
            scored.append((name, increase, _block_macs(model, name)))
        _BLOCK_SCORES[key] = scored
    total = macs_and_params(model)[0]
    return cheapest_covering_set(_BLOCK_SCORES[key], ratio * total, total)


def overlaps(block: str, others: list[str]) -> bool:
    """Whether the block named ``block`` sits inside one of ``others`` or holds one (its MACs counted twice)."""
    return any(block.startswith(f"{other}.") or other.startswith(f"{block}.") for other in others)


def cheapest_covering_set(blocks: list[tuple[str, float, int]], needed: float, total: int) -> list[str]:
    """The names of the ``blocks`` (name, cost, MACs) whose MACs reach ``needed`` at the least summed cost.

    A covering knapsack, solved exactly by dynamic programming over the MACs saved in thousandths of ``total``
    (each block's share rounded down, so a set never saves less than it is credited with). Sorting by cost per
    MAC instead overshoots the ratio by most of one block here: on EfficientNet-Lite0 at 0.4 it dropped seven
    of nine blocks (-45% MACs). A block nested in a chosen one (or holding one) is never added to it. When no
    set saves ``needed``, the one saving the most. Cheapest block first.
    """
    scale = 1000 / total
    goal = math.ceil(needed * scale - 1e-9)
    cheapest: dict[int, tuple[float, list[str]]] = {0: (0.0, [])}  # thousandths saved (capped at goal) -> set
    for name, cost, macs in blocks:
        for saved, (spent, chosen) in list(cheapest.items()):
            if overlaps(name, chosen):
                continue
            reached = min(goal, saved + int(macs * scale))
            if reached not in cheapest or spent + cost < cheapest[reached][0]:
                cheapest[reached] = (spent + cost, [*chosen, name])
    costs = {name: cost for name, cost, _ in blocks}
    return sorted(cheapest[max(cheapest)][1], key=costs.__getitem__)


def drop_blocks(model: nn.Module, names: list[str]) -> None:
    """Replace the blocks ``names`` of ``model`` by ``nn.Identity`` (in place)."""
    for name in names:
        parent, child = _parent_and_name(model, name)
        parent.register_module(child, nn.Identity())


def _pruner(model: Classifier, recipe: PruneRecipe, ratio: float, global_pruning: bool) -> Any:
    """Torch-Pruning's pruner for ``recipe``, reaching ``ratio`` in ``recipe.steps`` equal steps."""
    tp = lazy_import("torch_pruning", "train", "Pruning")

    heads = _attention_heads(model)
    with warnings.catch_warnings():
        # ViTs' cls_token, pos_embed and layer scales are bare parameters; Torch-Pruning prunes their last
        # dimension, the embedding, which is right for them (benchmarks/prune_registry.py checks them all).
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        return tp.pruner.BasePruner(
            model, example_input(model, recipe.input_size),
            importance=_importance(recipe.importance, "max" if global_pruning else "mean"),
            global_pruning=global_pruning, pruning_ratio=ratio, max_pruning_ratio=MAX_LAYER_RATIO,
            iterative_steps=recipe.steps,
            pruning_ratio_dict=_narrow_layer_ratios(model, ratio, recipe, set(heads)),
            ignored_layers=head_modules(model)
            + (stream_layers(model, recipe.input_size) if recipe.scope == "within_blocks" else []),
            round_to=recipe.granularity if recipe.granularity > 1 else None,
            num_heads=heads, prune_num_heads=bool(heads), prune_head_dims=False, head_pruning_ratio=ratio,
        )


def _threshold_ratio(pruner: Any, threshold: float, importance: str) -> float:
    """The fraction of all prunable channels whose max-normalised importance is below ``threshold``.

    Global pruning of that fraction, ranked by the same max-normalised scores, removes exactly those
    channels (up to granularity rounding): TAO's threshold rule, carried out by Torch-Pruning.
    """
    # Torch-Pruning's l2 score is the *squared* norm; TAO thresholds the norm itself: compare with threshold².
    cutoff = threshold**2 if importance == "l2" else threshold
    scores = [imp for group in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                                        root_module_types=pruner.root_module_types)
              if (imp := pruner.estimate_importance(group)) is not None]
    return float((torch.cat(scores) < cutoff).float().mean()) if scores else 0.0


def prune_classifier(
    model: Classifier,
    ratio: float | None = None,
    threshold: float | None = None,
    importance: str = "l2",
    granularity: int = 8,
    min_channels: int = 16,
    samples: list[Sample] | None = None,
    input_size: int | None = None,
    steps: int = 1,
    between_steps: Callable[[Classifier, int], None] | None = None,
    scope: str = "all",
) -> Classifier:
    """A structurally pruned copy of ``model`` (the original is left as it was).

    ``ratio`` removes that fraction of channels from every prunable layer (and of heads from every attention
    layer); ``threshold`` removes, TAO-style, the channels whose importance divided by the largest in their
    layer is below it (ranked model-wide). ``importance`` is ``l1``/``l2`` (weight magnitude), ``bn_scale``
    (batch-norm scale, "network slimming"), ``fpgm`` (distance to the layer's geometric median), ``taylor``
    (|weight x gradient|) or ``hessian`` (weight² x Fisher diagonal, grouped Optimal Brain Damage); the last
    two need training ``samples``. ``granularity`` rounds kept channel counts down to its multiples, never
    below ``min_channels``. With ``steps`` > 1 the ratio is reached in equal steps (iterative pruning), each
    scored on the weights as they are then; ``between_steps(model, step)`` runs after every step but the last
    (a short retrain). ``scope="within_blocks"`` keeps the residual stream and the stem whole (``stream_layers``);
    ``scope="whole_blocks"`` removes whole residual blocks instead of channels, ``ratio`` of the MACs, scored on
    ``samples`` (``blocks_to_drop``). The copy carries its recipe, Torch-Pruning's history and the dropped blocks
    (``pruning_record``), which ``save_pruned`` stores; a refused or failed request raises ``PruningError``.
    """
    check_request(model, ratio, threshold, importance, scope)
    if steps < 1:
        raise PruningError(f"steps={steps}: iterative pruning needs at least one step (1 prunes in one shot).")
    recipe = PruneRecipe(importance, granularity, input_size or model.preprocessing.input_size, min_channels,
                         ratio, threshold, steps=steps, scope=scope)
    pruned = copy.deepcopy(model).cpu().eval().requires_grad_(True)  # traced and scored on the CPU
    if ratio == 0.0:
        setattr(pruned, RECORD, {"recipe": asdict(replace(recipe, steps=1)), "history": []})
        return pruned
    if scope == "whole_blocks":
        if steps > 1:
            raise PruningError("scope='whole_blocks' removes its blocks in one step: set steps=1.")
        with _plain_errors(model):
            dropped = blocks_to_drop(pruned, ratio or 0.0, samples)
            drop_blocks(pruned, dropped)
        _check_output(pruned, model)
        setattr(pruned, RECORD, {"recipe": asdict(recipe), "history": [], "dropped_blocks": dropped})
        return pruned
    with _plain_errors(model):
        pruner = _pruner(pruned, recipe, ratio or 0.0, global_pruning=threshold is not None)
        if threshold is not None:
            if importance in GRADIENT_IMPORTANCES:
                _score_gradients(pruned, pruner, importance, samples)
            recipe = replace(recipe, effective_ratio=round(_threshold_ratio(pruner, threshold, importance), 4))
            pruner = _pruner(pruned, recipe, recipe.effective_ratio or 0.0, global_pruning=True)
    for step in range(steps):
        pruned.cpu()  # a retrain between steps may have moved it to a GPU
        with _plain_errors(model):
            if importance in GRADIENT_IMPORTANCES:
                _score_gradients(pruned, pruner, importance, samples)
            pruner.step()
        pruned.zero_grad(set_to_none=True)
        _update_head_counts(pruned)
        _check_output(pruned, model)
        if between_steps is not None and step < steps - 1:
            between_steps(pruned, step)
    history = [[name, bool(out), [int(i) for i in _plain(idxs)]]
               for name, out, idxs in pruner.pruning_history()]
    if not history and (ratio or recipe.effective_ratio):
        raise PruningError(f"Nothing of {model.backbone} was pruned with importance={importance!r}"
                           + (" (it has no batch-norm layers to score)" if importance == "bn_scale" else "")
                           + ": try importance='l2'.")
    setattr(pruned, RECORD, {"recipe": asdict(recipe), "history": history})
    return pruned


@contextmanager
def _plain_errors(model: Classifier) -> Iterator[None]:
    """Torch-Pruning fails in many ways on graphs it cannot map: turn its errors into one plain ``PruningError``."""
    try:
        yield
    except (PruningError, MissingDependencyError):
        raise
    except Exception as error:
        raise PruningError(f"Torch-Pruning could not prune {model.backbone} ({type(error).__name__}: "
                           f"{error}). Pick another backbone, or report the architecture.") from error


def pruning_record(model: Classifier) -> dict[str, Any]:
    """How a model was pruned: ``{"recipe": PruneRecipe's fields, "history": [[layer, out?, indices]]}``, plus
    ``"dropped_blocks"`` (names) for ``scope="whole_blocks"``."""
    record = getattr(model, RECORD, None)
    if record is None:
        raise PruningError("This model was not made by prune_classifier or load_pruned; an unpruned model "
                           "saves with zoo.save_classifier.")
    return dict(record)


def _plain(idxs: list[Any]) -> list[int]:
    to_plain_idxs = lazy_import("torch_pruning._helpers", "train", "Pruning").to_plain_idxs

    return to_plain_idxs(idxs)


def _check_output(pruned: Classifier, original: Classifier) -> None:
    """The pruned model must still run and still give one score per class."""
    try:
        with torch.inference_mode():
            shape = tuple(pruned(example_input(pruned, batch_size=2)).shape)
    except RuntimeError as error:
        raise PruningError(f"Pruning broke {original.backbone}'s forward pass ({error}); the course cannot "
                           "prune this architecture correctly. Pick another backbone.") from error
    if shape != (2, len(original.classes)):
        raise PruningError(f"Pruning changed {original.backbone}'s output shape to {shape}; expected "
                           f"(2, {len(original.classes)}). Pick another backbone.")


def save_pruned(model: Classifier, path: Path) -> Path:
    """Save a pruned classifier as plain data (registry name, classes, recipe, history, weights)."""
    payload = {"format": FORMAT, "backbone": model.backbone, "classes": model.classes,
               "weights_source": model.weights, "pruning": pruning_record(model),
               "state_dict": model.state_dict()}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_pruned(path: str | Path) -> Classifier:
    """Rebuild a classifier saved by ``save_pruned``: original architecture, blocks dropped and pruning replayed,
    weights loaded.

    The file is read with ``weights_only=True`` (tensors and plain data only), so loading it runs no code.
    """
    tp = lazy_import("torch_pruning", "train", "Pruning")

    from course_utils.vision.zoo import load

    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise PruningError(f"{path} is not a pruned model saved by the course; unpruned models load with "
                           "zoo.load_classifier.")
    model = load(payload["backbone"], payload["classes"], pretrained=False)
    recipe = PruneRecipe(**payload["pruning"]["recipe"])
    drop_blocks(model, payload["pruning"].get("dropped_blocks", []))
    if payload["pruning"]["history"]:
        _attention_heads(model)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
            graph = tp.DependencyGraph().build_dependency(model, example_input(model, recipe.input_size))
        graph.load_pruning_history(payload["pruning"]["history"])
        _update_head_counts(model)
    model.load_state_dict(payload["state_dict"])
    model.weights = payload["weights_source"]
    setattr(model, RECORD, payload["pruning"])
    return model.eval()


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output channels (or features) of every convolution and linear layer, by name."""
    return {name: module.out_channels if isinstance(module, nn.modules.conv._ConvNd) else module.out_features
            for name, module in model.named_modules()
            if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear))}


def width_changes(original: nn.Module, pruned: nn.Module) -> list[tuple[str, int, int]]:
    """``(layer, channels before, channels after)`` for every layer that pruning narrowed."""
    after = layer_widths(pruned)
    return [(name, width, after[name]) for name, width in layer_widths(original).items()
            if after[name] != width]


def coupled_layers(model: Classifier, layer: str) -> list[tuple[str, str]]:
    """``(layer, "outputs" | "inputs")`` for every layer that loses channels with ``layer``'s outputs.

    This is Torch-Pruning's dependency group: what must shrink together so the network stays consistent.
    """
    tp = lazy_import("torch_pruning", "train", "Pruning")

    traced = copy.deepcopy(model).eval()
    _attention_heads(traced)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        graph = tp.DependencyGraph().build_dependency(traced, example_input(traced))
    module = traced.get_submodule(layer)
    group = graph.get_pruning_group(module, graph.get_pruner_of_module(module).prune_out_channels, [0])
    names = {id(m): name for name, m in traced.named_modules()}
    coupled = [(names[id(dep.target.module)],
                "outputs" if graph.is_out_channel_pruning_fn(dep.handler) else "inputs")
               for dep, _ in group if id(dep.target.module) in names]
    return list(dict.fromkeys(coupled))


def macs_and_params(model: Classifier) -> tuple[int, int]:
    """Multiply-accumulates of one image's forward pass, and the parameter count (Torch-Pruning's counter)."""
    tp = lazy_import("torch_pruning", "train", "Counting MACs")

    macs, params = tp.utils.count_ops_and_params(model, example_input(model))
    return int(macs), int(params)


def fingerprint(model: nn.Module) -> str:
    """A short hash of a model's weights: the cache key of everything computed from them."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def retrain_config(config: CourseConfig, epochs: int | None = None) -> CourseConfig:
    """Fine-tuning settings for retraining: all layers trained, ``prune.retrain_epochs`` (or ``epochs``) at
    ``retrain_lr``."""
    retrain = config.model_copy(deep=True)
    retrain.train = config.train.model_copy(update={
        "epochs_head": 0, "epochs_finetune": config.prune.retrain_epochs if epochs is None else epochs,
        "unfreeze": "all", "lr_finetune": config.prune.retrain_lr})
    return retrain


def without_distillation(config: CourseConfig) -> CourseConfig:
    """``config`` with ``prune.distill`` off: retraining from the labels alone, to compare against."""
    return config.model_copy(update={"prune": config.prune.model_copy(update={"distill": False})})


class DistillationLoss:
    """Knowledge distillation (Hinton et al., 2015): the pruned student learns the unpruned teacher's soft targets.

    ``alpha * KL(softmax(teacher / T) || softmax(student / T)) * T² + (1 - alpha) * CE(student, labels)``; the
    T² keeps the soft part's gradients on the scale of the hard part's. The cross-entropy is the label-smoothed
    one ``finetune.fit`` trains with, so ``alpha`` 0 is plain retraining. The teacher runs in evaluation mode
    without gradients: only the student learns. An instance is ``fit``'s ``loss_fn``.
    """

    def __init__(self, teacher: nn.Module, alpha: float = 0.7, temperature: float = 4.0) -> None:
        if not 0.0 <= alpha <= 1.0 or temperature <= 0:
            raise PruningError(f"Distillation needs 0 <= alpha <= 1 and temperature > 0, got alpha={alpha}, "
                               f"temperature={temperature} (e.g. alpha 0.7, temperature 4).")
        self.teacher, self.alpha, self.temperature = teacher, alpha, temperature

    def __call__(self, logits: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss of the student's ``logits`` on ``images`` (the teacher sees the same augmented batch)."""
        self.teacher.eval()
        with torch.no_grad():
            teacher_logits = self.teacher.to(images.device)(images)
        return self.combine(logits, teacher_logits, labels)

    def combine(self, logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The distillation loss given both models' logits."""
        from course_utils.vision.finetune import LABEL_SMOOTHING

        hard = nn.functional.cross_entropy(logits, labels, label_smoothing=LABEL_SMOOTHING)
        if self.alpha == 0.0:
            return hard
        t = self.temperature
        soft = nn.functional.kl_div(nn.functional.log_softmax(logits.float() / t, dim=-1),
                                    nn.functional.log_softmax(teacher_logits.detach().float() / t, dim=-1),
                                    reduction="batchmean", log_target=True) * t * t
        return self.alpha * soft + (1 - self.alpha) * hard


@dataclass
class PrunedRun:
    """One pruned-and-retrained model and what it measures (``ratio`` 0.0: the unpruned model itself).

    ``val_*`` figures are on the validation split, scored once; ``dev_top1_after_retrain`` is on the dev part
    of the training images that retraining picked its best epoch on (None when nothing was retrained).
    """

    ratio: float | None
    threshold: float | None
    effective_ratio: float | None
    params: int
    macs: int
    file_mb: float
    latency_ms_b1: float
    latency_ms_b8: float
    val_top1_before_retrain: float
    val_top1_after_retrain: float
    retrain_seconds: float
    model_path: str
    dev_top1_after_retrain: float | None = None
    distilled: bool = False


def _retrains(config: CourseConfig, ratio: float | None) -> bool:
    return ratio != 0.0 and (config.prune.retrain_epochs > 0 or config.prune.steps > 1)


def _run_key(model: Classifier, dataset: ImageFolderDataset, config: CourseConfig,
             request: dict[str, Any]) -> str:
    settings: dict[str, Any] = {"model": fingerprint(model), "request": request,
                                "val": [str(p) for p, _ in dataset.samples["val"]],
                                "torch_pruning": package_version("torch_pruning"),
                                "retraining": "keeps the better of the pruned weights and its best epoch"}
    if request.get("ratio") != 0.0:  # the unpruned model is the same whatever the pruning settings
        settings.update(
            importance=config.prune.importance, scope=config.prune.scope, granularity=config.prune.granularity,
            min_channels=config.prune.min_channels, retrain=retrain_config(config).train.model_dump(),
            seed=config.seed, samples=[str(p) for p, _ in dataset.samples["train"]],
            schedule=config.prune.model_dump(include={"steps", "step_epochs", "dev_fraction", "distill"}))
        if config.prune.scope == "whole_blocks":
            settings["blocks"] = "the cheapest covering set"  # earlier runs sorted by cost per MAC
        if config.prune.distill:
            settings["distillation"] = [config.prune.distill_alpha, config.prune.distill_temperature]
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def prune_and_retrain(model: Classifier, dataset: ImageFolderDataset, config: CourseConfig,
                      ratio: float | None = None, threshold: float | None = None) -> PrunedRun:
    """Prune ``model`` (by ``ratio`` or ``threshold``), evaluate, retrain with ``finetune.fit``, measure.

    Retraining trains on the training images minus a dev part (``prune.dev_fraction``, ``data.dev_split``)
    and keeps its best epoch on that dev part, or the pruned weights if they score better there; the
    validation split is scored once, before and after.
    ``prune.steps`` > 1 prunes iteratively with ``prune.step_epochs`` of retraining between the steps;
    ``prune.distill`` distils from ``model`` (``DistillationLoss``) in every retrain.
    Results live in ``<workspace>/prune/<key>`` (key: weights, request, settings, data, library version):
    a rerun reuses them, and an interrupted retraining resumes. Params, MACs and latencies are measured once
    and kept in ``measured.json``, remeasured only when ``config.benchmark``'s warmup, iterations or threads
    change. Ratio 0.0 measures the unpruned model.
    """
    from course_utils.vision.data import dev_split
    from course_utils.vision.finetune import evaluate, fit

    key = _run_key(model, dataset, config, {"ratio": ratio, "threshold": threshold})
    folder = config.workspace / "prune" / key
    model_file, result_file = folder / "pruned.pt", folder / "accuracy.json"
    measured_file = folder / "measured.json"
    settings = config.prune
    pruned: Classifier | None = None
    if model_file.exists() and result_file.exists():
        accuracy = json.loads(result_file.read_text())
    else:
        measured_file.unlink(missing_ok=True)  # figures measured on an earlier model of this folder
        retrains = _retrains(config, ratio)
        split = dev_split(dataset, settings.dev_fraction, config.seed) if retrains else dataset
        loss = DistillationLoss(model, settings.distill_alpha, settings.distill_temperature) \
            if settings.distill and retrains else None

        spent: list[float] = []  # retraining seconds, the steps' and the final one's

        def retrain_step(student: Classifier, step: int) -> None:
            spent.append(fit(student, split, retrain_config(config, settings.step_epochs),
                             run_dir=folder / f"step{step + 1}", loss_fn=loss).train_seconds)

        pruned = prune_classifier(model, ratio, threshold, settings.importance, settings.granularity,
                                  settings.min_channels, samples=split.samples["train"], steps=settings.steps,
                                  between_steps=retrain_step if settings.step_epochs > 0 else None,
                                  scope=settings.scope)
        before = evaluate(pruned, dataset.samples["val"], config.train.batch_size).top1
        accuracy = {"before": before, "after": before, "dev": None, "distilled": loss is not None}
        record = pruning_record(pruned)
        if (record["history"] or record.get("dropped_blocks")) and settings.retrain_epochs > 0:
            # Retraining may also lose accuracy (a light cut, a high learning rate): it keeps whichever is
            # better on the dev part, the pruned weights as they were or its best epoch.
            start = evaluate(pruned, split.samples["val"], config.train.batch_size).top1
            weights = copy.deepcopy(pruned.state_dict())
            result = fit(pruned, split, retrain_config(config), run_dir=folder / "retrain", loss_fn=loss)
            spent.append(result.train_seconds)
            if result.best_val_top1 < start:
                pruned.load_state_dict(weights)
            accuracy.update(after=evaluate(pruned, dataset.samples["val"], config.train.batch_size).top1,
                            dev=max(start, result.best_val_top1))
        accuracy["seconds"] = round(sum(spent), 1)
        save_pruned(pruned.cpu(), model_file)  # measured and saved on the CPU, wherever it was retrained
        write_json_atomic(result_file, accuracy)
    measured = _cached_measurement(config, measured_file)
    if measured is None:
        measured = _measure(pruned if pruned is not None else load_pruned(model_file), config, measured_file)
    return PrunedRun(
        ratio=ratio, threshold=threshold, effective_ratio=measured["effective_ratio"], params=measured["params"],
        macs=measured["macs"], file_mb=round(model_file.stat().st_size / 2**20, 2),
        latency_ms_b1=measured["latency_ms_b1"], latency_ms_b8=measured["latency_ms_b8"],
        val_top1_before_retrain=accuracy["before"], val_top1_after_retrain=accuracy["after"],
        retrain_seconds=accuracy["seconds"], model_path=str(model_file),
        dev_top1_after_retrain=accuracy.get("dev"), distilled=accuracy.get("distilled", False),
    )


def _benchmark_settings(config: CourseConfig) -> dict[str, int]:
    """The ``benchmark`` settings that the cached latencies were timed with."""
    return {"warmup": config.benchmark.warmup, "iterations": config.benchmark.iterations,
            "threads": config.benchmark.threads}


def _cached_measurement(config: CourseConfig, measured_file: Path) -> dict[str, Any] | None:
    """The figures in ``measured_file`` when they were timed with today's ``benchmark`` settings, else None."""
    try:
        measured = json.loads(measured_file.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(measured, dict) and measured.get("benchmark") == _benchmark_settings(config):
        return measured
    return None


def _measure(pruned: Classifier, config: CourseConfig, measured_file: Path) -> dict[str, Any]:
    """Params, MACs and CPU latencies (batch 1 and 8) of ``pruned``, stored in ``measured_file``.

    ``prune_and_retrain`` measures once per ``benchmark`` settings, so every later call (the notebook's
    sweep, the stage's ``run``) reports the same figures instead of timing the model again.
    """
    macs, params = macs_and_params(pruned)
    size, settings = pruned.preprocessing.input_size, _benchmark_settings(config)
    measured = {
        "benchmark": settings, "effective_ratio": pruning_record(pruned)["recipe"]["effective_ratio"],
        "params": params, "macs": macs,
        **{f"latency_ms_b{batch}": round(cpu_latency_ms(pruned, size, batch=batch, **settings), 2)
           for batch in (1, 8)},
    }
    write_json_atomic(measured_file, measured)
    return measured


def sweep(model: Classifier, dataset: ImageFolderDataset, config: CourseConfig,
          ratios: list[float] | None = None) -> list[PrunedRun]:
    """``prune_and_retrain`` at every ratio of ``config.prune.sweep`` (or ``ratios``)."""
    return [prune_and_retrain(model, dataset, config, ratio=ratio) for ratio in ratios or config.prune.sweep]


def kept_run(model: Classifier, dataset: ImageFolderDataset, config: CourseConfig) -> PrunedRun:
    """The configured pruning: ``prune.threshold`` when set, else ``prune.ratio`` (reused from the sweep)."""
    if config.prune.threshold is not None:
        return prune_and_retrain(model, dataset, config, threshold=config.prune.threshold)
    return prune_and_retrain(model, dataset, config, ratio=config.prune.ratio)


def keep(run: PrunedRun, config: CourseConfig) -> Path:
    """Copy the chosen pruned model to ``<workspace>/models/pruned.pt``, the file the pruning record names.

    Later stages find it through that record (``core.ledger.deployed_model``), and ship it only when it met
    its target.
    """
    from course_utils.vision.finetune import models_dir

    target = models_dir(config) / "pruned.pt"
    with atomic_path(target) as tmp:
        shutil.copyfile(run.model_path, tmp)
    return target


def sweep_rows(runs: list[PrunedRun]) -> list[dict[str, Any]]:
    """The sweep as table rows (for ``report.markdown_table``): size, cost, speed, accuracy (split named)."""
    return [{"ratio": run.ratio if run.ratio is not None else f"threshold {run.threshold}",
             "distilled": "yes" if run.distilled else "no",
             "params (M)": run.params / 1e6, "MACs (M)": run.macs / 1e6, "file (MB)": run.file_mb,
             "CPU ms, batch 1": run.latency_ms_b1, "CPU ms, batch 8": run.latency_ms_b8,
             "val top-1 pruned": run.val_top1_before_retrain, "val top-1 retrained": run.val_top1_after_retrain,
             "dev top-1 retrained": "" if run.dev_top1_after_retrain is None else run.dev_top1_after_retrain,
             "retrain s": run.retrain_seconds} for run in runs]


def frontier(model: Classifier, dataset: ImageFolderDataset, config: CourseConfig,
             ratios: list[float] | None = None) -> dict[str, list[PrunedRun]]:
    """Accuracy against MACs with and without distillation: the sweep under both, ``{"distilled", "labels only"}``.

    The unpruned model (ratio 0.0) is measured once and shared by both.
    """
    distilled = config.model_copy(update={"prune": config.prune.model_copy(update={"distill": True})})
    return {"distilled": sweep(model, dataset, distilled, ratios),
            "labels only": sweep(model, dataset, without_distillation(config), ratios)}


def accuracy_vs_macs(runs: list[PrunedRun], title: str = "",
                     compare: dict[str, list[PrunedRun]] | None = None) -> Figure:
    """Validation top-1 against MACs, before and after retraining, one point per pruning ratio.

    ``compare`` adds other retrained runs by label (e.g. ``{"without distillation": [run]}``).
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4))
    axis = figure.add_subplot()
    macs = [run.macs / 1e6 for run in runs]
    axis.plot(macs, [run.val_top1_before_retrain for run in runs], "o--", mfc="none",
              label="pruned, not retrained")
    distilled = any(run.distilled for run in runs)
    axis.plot(macs, [run.val_top1_after_retrain for run in runs], "o-",
              label="retrained with distillation" if distilled else "after retraining")
    for label, others in (compare or {}).items():
        axis.plot([run.macs / 1e6 for run in others], [run.val_top1_after_retrain for run in others], "s:",
                  label=label)
    for run, x in zip(runs, macs, strict=True):
        axis.annotate(f"{run.ratio if run.ratio is not None else run.effective_ratio:g}",
                      (x, run.val_top1_after_retrain), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axis.set_xlabel("MACs per image (millions)")
    axis.set_ylabel("validation top-1")
    axis.set_title(title or "Accuracy against compute (labels: pruning ratio)")
    axis.legend()
    figure.tight_layout()
    return figure


def _sweep_entry(run: PrunedRun) -> dict[str, Any]:
    return {"params": run.params, "macs": run.macs, "file_mb": run.file_mb,
            "latency_ms_b1": run.latency_ms_b1, "latency_ms_b8": run.latency_ms_b8,
            "val_top1_before_retrain": run.val_top1_before_retrain,
            "val_top1_after_retrain": run.val_top1_after_retrain}


def meets_target(macs_reduction: float, top1_drop: float, config: CourseConfig) -> bool:
    """Whether a pruned model earns its place: enough MACs removed, little enough top-1 lost (``prune`` targets)."""
    from course_utils.core.artifacts import pruning_pays

    return pruning_pays(macs_reduction, top1_drop, config.prune)


def target_words(config: CourseConfig) -> str:
    """The pruning target in words, for the ledger and the notebook."""
    from course_utils.core.artifacts import target_words as words

    return words(config.prune)


def _reduction_and_drop(unpruned: PrunedRun, kept: PrunedRun) -> tuple[float, float]:
    """The fraction of MACs the kept model removed, and the top-1 it lost against the unpruned model."""
    return 1 - kept.macs / unpruned.macs, unpruned.val_top1_before_retrain - kept.val_top1_after_retrain


def stage_metrics(unpruned: PrunedRun, kept: PrunedRun, runs: list[PrunedRun],
                  config: CourseConfig) -> dict[str, Any]:
    """What the ledger records under ``prune``: the kept model against the unpruned one, plus the sweep."""
    reduction, _ = _reduction_and_drop(unpruned, kept)
    return {
        "ratio": kept.ratio if kept.ratio is not None else kept.effective_ratio, "threshold": kept.threshold,
        "importance": config.prune.importance, "scope": config.prune.scope,
        "granularity": config.prune.granularity, "retrain_epochs": config.prune.retrain_epochs, "steps": config.prune.steps,
        "step_epochs": config.prune.step_epochs, "distilled": kept.distilled,
        "params_before": unpruned.params, "params_after": kept.params,
        "macs_before": unpruned.macs, "macs_after": kept.macs, "macs_reduction": round(reduction, 4),
        "file_mb_before": unpruned.file_mb, "file_mb_after": kept.file_mb,
        "val_top1_unpruned": unpruned.val_top1_before_retrain,
        "val_top1_before_retrain": kept.val_top1_before_retrain,
        "val_top1_after_retrain": kept.val_top1_after_retrain,
        "dev_top1_after_retrain": kept.dev_top1_after_retrain,
        "latency_ms_b1_before": unpruned.latency_ms_b1, "latency_ms_b1_after": kept.latency_ms_b1,
        "latency_ms_b8_before": unpruned.latency_ms_b8, "latency_ms_b8_after": kept.latency_ms_b8,
        "sweep": {f"ratio_{run.ratio:g}": _sweep_entry(run) for run in runs},
    }


@dataclass
class PruneResult:
    """The pruning stage's outcome: the sweep, the unpruned and kept runs, the record and which model ships."""

    runs: list[PrunedRun]
    unpruned: PrunedRun
    kept: PrunedRun
    record: PruneRecord
    deployed: DeployedModel


def run(config: CourseConfig, dataset: ImageFolderDataset | None = None) -> PruneResult:
    """The pruning stage: sweep, keep the configured pruning as ``models/pruned.pt``, record it, decide what ships.

    Notebook 03 and ``python -m course_utils prune`` call this; every pruned run is cached, so after the
    notebook's own sweep it returns at once. Needs the fine-tuning stage's record (else it says to run it).
    """
    from course_utils.core.artifacts import FileRef, PruneRecord
    from course_utils.core.ledger import Ledger, deployed_model, finetuned_model
    from course_utils.vision.data import resolve_dataset
    from course_utils.vision.zoo import load_classifier

    ledger = Ledger(config.workspace)
    finetuned = finetuned_model(ledger, config)  # stale when the spec names another backbone than it was made of
    model, dataset = load_classifier(finetuned.checkpoint.resolve(config.workspace)), dataset or resolve_dataset(config)
    runs = sweep(model, dataset, config)
    by_ratio = {run.ratio: run for run in runs}  # the sweep's runs, reused rather than fetched again
    unpruned = by_ratio[0.0] if 0.0 in by_ratio else prune_and_retrain(model, dataset, config, ratio=0.0)
    if config.prune.threshold is None and config.prune.ratio in by_ratio:
        kept = by_ratio[config.prune.ratio]
    else:
        kept = kept_run(model, dataset, config)
    path = keep(kept, config)
    reduction, drop = _reduction_and_drop(unpruned, kept)
    record = ledger.save(PruneRecord(
        model=FileRef.of(path, config.workspace), meets_target=meets_target(reduction, drop, config),
        target=target_words(config), macs_reduction=round(reduction, 4), top1_drop=round(drop, 4),
        made_from={"finetuned": finetuned.checkpoint.sha256},
        settings={"prune": config.prune.model_dump()}, tools={"torch_pruning": package_version("torch_pruning")},
        metrics=stage_metrics(unpruned, kept, runs, config)))
    return PruneResult(runs, unpruned, kept, record, deployed_model(ledger, config))
