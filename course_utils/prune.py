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
"""

from __future__ import annotations

import copy
import hashlib
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from course_utils.atomic import atomic_path, write_json_atomic
from course_utils.config import CourseConfig
from course_utils.exercises import ExerciseResult, check_value
from course_utils.zoo import Classifier

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from course_utils.data import ImageFolderDataset
    from course_utils.finetune import Sample

Importance = Literal["l1", "l2", "bn_scale", "taylor"]
IMPORTANCES: tuple[str, ...] = ("l1", "l2", "bn_scale", "taylor")
FORMAT = "course-pruned/1"
MAX_LAYER_RATIO = 0.9  # never remove more than 90% of one layer's channels (TAO keeps min_num_filters likewise)
TAYLOR_BATCHES = 4

# Registry backbones the course refuses to prune, with the reason (see benchmarks/prune_registry.py).
UNPRUNABLE: dict[str, str] = {}


class PruningError(ValueError):
    """A pruning request the course cannot carry out; the message says why and what to do instead."""


@dataclass(frozen=True)
class PruneRecipe:
    """How a model was pruned: by ``ratio`` (fraction of channels removed in every layer) or by ``threshold``.

    ``threshold`` is TAO's rule: a channel goes when its importance, divided by the largest importance in
    its layer, is below the threshold. ``granularity`` rounds kept channel counts to multiples of it
    (TAO's ``pruning_granularity``: tensor cores like multiples of 8). ``input_size`` is the example input
    the dependency graph was traced with; ``effective_ratio`` is the fraction of channels a threshold removed.
    """

    importance: str
    granularity: int
    input_size: int
    ratio: float | None = None
    threshold: float | None = None
    effective_ratio: float | None = None


def check_request(model: Classifier, ratio: float | None, threshold: float | None, importance: str) -> None:
    """Raise ``PruningError`` for an out-of-range ratio or threshold, an unknown criterion or a refused backbone."""
    if (ratio is None) == (threshold is None):
        raise PruningError("Give exactly one of `ratio` (fraction of channels to remove) or `threshold` "
                           "(TAO-style normalised-magnitude threshold).")
    if ratio is not None and not 0.0 <= ratio <= MAX_LAYER_RATIO:
        raise PruningError(f"ratio={ratio} is out of range: it is the fraction of each layer's channels to remove, "
                           f"from 0.0 (nothing) to {MAX_LAYER_RATIO} (keep one channel in ten), e.g. 0.5.")
    if threshold is not None and not 0.0 < threshold < 1.0:
        raise PruningError(f"threshold={threshold} is out of range: importances are divided by their layer's "
                           "largest, so the threshold must lie strictly between 0 and 1 (TAO uses 0.1-0.7).")
    if importance not in IMPORTANCES:
        raise PruningError(f"Unknown importance {importance!r}: choose one of {', '.join(IMPORTANCES)}.")
    if model.backbone in UNPRUNABLE:
        raise PruningError(f"{model.backbone} cannot be pruned by the course: {UNPRUNABLE[model.backbone]}. "
                           "Pick another backbone (efficientnet-lite0, resnet50, mobilenet-v2, deit-tiny…).")


def example_input(model: Classifier, input_size: int | None = None, batch_size: int = 1) -> torch.Tensor:
    """A zero batch of the model's input shape (what tracing, MAC counting and timing feed it)."""
    size = input_size or model.preprocessing.input_size
    return torch.zeros(batch_size, 3, size, size)


def _importance(name: str, normalizer: str | None) -> Any:
    import torch_pruning as tp

    if name == "bn_scale":
        return tp.importance.BNScaleImportance(normalizer=normalizer)
    if name == "taylor":
        return tp.importance.GroupTaylorImportance(normalizer=normalizer)
    return tp.importance.GroupMagnitudeImportance(p=1 if name == "l1" else 2, normalizer=normalizer)


def head_modules(model: Classifier) -> list[nn.Module]:
    """The classifier head's layers: their outputs are the classes, so they are never pruned."""
    names = model.head_parameter_names()
    return [module for module in model.modules()
            if (params := [n for n, _ in module.named_parameters(recurse=False)])
            and all(f"{_module_name(model, module)}.{n}" in names for n in params)]


def _module_name(model: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if module is target)


def _attention_heads(model: Classifier) -> dict[nn.Module, int]:
    """``{qkv layer: head count}`` for the attention layers pruned as whole heads (after the tracing fix)."""
    from course_utils.compat import fix_mmpretrain_attention

    return {attention.qkv: attention.num_heads for attention in fix_mmpretrain_attention(model)}


def _update_head_counts(model: Classifier) -> None:
    """After heads went, each attention layer's head count follows from its qkv width (head size is kept)."""
    from course_utils.compat import fix_mmpretrain_attention

    for attention in fix_mmpretrain_attention(model):
        attention.num_heads = attention.qkv.out_features // (3 * attention.head_dims)
        attention.embed_dims = attention.num_heads * attention.head_dims


def _taylor_gradients(model: Classifier, samples: list[Sample] | None, batch_size: int) -> None:
    """Taylor importance is |weight x gradient|: accumulate the loss gradient over a few training batches."""
    from course_utils.finetune import ImageSamples

    if not samples:
        raise PruningError("importance='taylor' needs data to compute loss gradients: pass `samples` "
                           "(e.g. dataset.samples['train']), or choose l1, l2 or bn_scale.")
    loader = torch.utils.data.DataLoader(ImageSamples(samples, model.preprocessing.eval_transform()),
                                         batch_size=batch_size, shuffle=False)
    model.zero_grad()
    for index, (images, labels) in enumerate(loader):
        if index == TAYLOR_BATCHES:
            break
        nn.functional.cross_entropy(model(images), labels).backward()


def _pruner(model: Classifier, recipe: PruneRecipe, ratio: float, global_pruning: bool) -> Any:
    import torch_pruning as tp

    heads = _attention_heads(model)
    return tp.pruner.BasePruner(
        model, example_input(model, recipe.input_size),
        importance=_importance(recipe.importance, "max" if global_pruning else "mean"),
        global_pruning=global_pruning, pruning_ratio=ratio, max_pruning_ratio=MAX_LAYER_RATIO,
        ignored_layers=head_modules(model), round_to=recipe.granularity,
        num_heads=heads, prune_num_heads=bool(heads), prune_head_dims=False, head_pruning_ratio=ratio,
    )


def _threshold_ratio(pruner: Any, threshold: float) -> float:
    """The fraction of all prunable channels whose max-normalised importance is below ``threshold``."""
    scores = [imp for group in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                                        root_module_types=pruner.root_module_types)
              if (imp := pruner.estimate_importance(group)) is not None]
    if not scores:
        return 0.0
    joined = torch.cat(scores)
    return float((joined < threshold).float().mean())


def prune_classifier(
    model: Classifier,
    ratio: float | None = None,
    threshold: float | None = None,
    importance: str = "l2",
    granularity: int = 8,
    samples: list[Sample] | None = None,
    input_size: int | None = None,
) -> Classifier:
    """A structurally pruned copy of ``model`` (the original is left as it was).

    ``ratio`` removes that fraction of channels from every prunable layer (and of heads from every attention
    layer); ``threshold`` removes, TAO-style, the channels whose importance divided by the largest in their
    layer is below it (ranked model-wide). ``importance`` is ``l1``/``l2`` (weight magnitude), ``bn_scale``
    (batch-norm scale, "network slimming") or ``taylor`` (|weight x gradient|, needs training ``samples``).
    The copy carries ``.pruning`` (recipe and history), which ``save_pruned`` stores.
    """
    check_request(model, ratio, threshold, importance)
    recipe = PruneRecipe(importance, granularity, input_size or model.preprocessing.input_size, ratio, threshold)
    pruned = copy.deepcopy(model).eval().requires_grad_(True)
    if ratio == 0.0:
        pruned.pruning = {"recipe": asdict(recipe), "history": []}
        return pruned
    pruner = _pruner(pruned, recipe, ratio or 0.0, global_pruning=threshold is not None)
    if importance == "taylor":
        _taylor_gradients(pruned, samples, batch_size=8)
    if threshold is not None:
        effective = _threshold_ratio(pruner, threshold)
        recipe = PruneRecipe(**{**asdict(recipe), "effective_ratio": round(effective, 4)})
        pruner = _pruner(pruned, recipe, effective, global_pruning=True)
    before = sum(p.numel() for p in pruned.parameters())
    pruner.step()
    pruned.zero_grad(set_to_none=True)
    _update_head_counts(pruned)
    if sum(p.numel() for p in pruned.parameters()) == before and (ratio or recipe.effective_ratio):
        raise PruningError(f"Nothing of {model.backbone} could be pruned with importance={importance!r}"
                           + (" (it has no batch-norm layers to score)" if importance == "bn_scale" else "")
                           + ": try importance='l2'.")
    history = [[name, bool(out), [int(i) for i in _plain(idxs)]] for name, out, idxs in pruner.pruning_history()]
    pruned.pruning = {"recipe": asdict(recipe), "history": history}
    _check_output(pruned, model)
    return pruned


def _plain(idxs: list[Any]) -> list[int]:
    from torch_pruning._helpers import to_plain_idxs

    return to_plain_idxs(idxs)


def _check_output(pruned: Classifier, original: Classifier) -> None:
    """The pruned model must still run and still give one score per class."""
    batch = example_input(pruned, batch_size=2)
    try:
        with torch.inference_mode():
            shape = tuple(pruned(batch).shape)
    except RuntimeError as error:
        raise PruningError(f"Pruning broke {original.backbone}'s forward pass ({error}); the course cannot "
                           "prune this architecture correctly. Pick another backbone.") from error
    if shape != (2, len(original.classes)):
        raise PruningError(f"Pruning changed {original.backbone}'s output shape to {shape}; expected "
                           f"(2, {len(original.classes)}). Pick another backbone.")


def save_pruned(model: Classifier, path: Path, extra: dict[str, Any] | None = None) -> Path:
    """Save a pruned classifier as plain data (registry name, classes, recipe, history, weights), atomically."""
    if not hasattr(model, "pruning"):
        raise PruningError("This model was not made by prune_classifier: save it with zoo.save_classifier.")
    payload = {"format": FORMAT, "backbone": model.backbone, "classes": model.classes,
               "weights_source": model.weights, "pruning": model.pruning, "state_dict": model.state_dict(),
               **(extra or {})}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_pruned(path: Path) -> Classifier:
    """Rebuild a classifier saved by ``save_pruned``: original architecture, pruning replayed, weights loaded.

    The file is read with ``weights_only=True`` (tensors and plain data only), so loading it runs no code.
    """
    import torch_pruning as tp

    from course_utils.zoo import load

    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    if payload.get("format") != FORMAT:
        raise PruningError(f"{path} is not a pruned model saved by the course (format {payload.get('format')!r}); "
                           "unpruned models load with zoo.load_classifier.")
    model = load(payload["backbone"], payload["classes"], pretrained=False)
    recipe = PruneRecipe(**payload["pruning"]["recipe"])
    if payload["pruning"]["history"]:
        _attention_heads(model)
        graph = tp.DependencyGraph().build_dependency(model, example_input(model, recipe.input_size), verbose=False)
        graph.load_pruning_history(payload["pruning"]["history"])
        _update_head_counts(model)
    model.load_state_dict(payload["state_dict"])
    model.weights = payload["weights_source"]
    model.pruning = payload["pruning"]
    return model.eval()
