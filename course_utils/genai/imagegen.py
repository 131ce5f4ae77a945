"""Story to image with diffusers: the model, the memory options, the schedulers, and the round trip.

``config.imagegen.model`` names a text-to-image pipeline: a Hugging Face id or a local folder in the
diffusers layout. The online default is **SD-Turbo** (``stabilityai/sd-turbo``): Stable Diffusion 2.1
distilled by Adversarial Diffusion Distillation to draw a 512 px picture in 1-4 steps with no
classifier-free guidance, so one image costs 1-4 UNet passes instead of 2 x 25. In float16 its weights
take about 2.5 GB (UNet 1.7, OpenCLIP text encoder 0.7, VAE 0.2), which leaves room on an 8 GB Jetson
Orin Nano for the classifier and the LLM. Its licence is Stability AI's non-commercial community
licence: check it before a commercial demo (an LCM-LoRA'd SD 1.5 is the open-licence alternative).

Offline, no text-to-image weights exist in this workplace. With ``offline_fallback: tiny-random`` the
course builds a tiny **random-weight** Stable Diffusion pipeline from configs into the workspace. It runs
the same code path (text encoder, UNet, scheduler, VAE) in a fraction of a second, and its pictures are
noise: everything that reports on it says so (``real_weights: false``).
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from course_utils.core.atomic import atomic_directory
from course_utils.core.config import CourseConfig, ImageGenConfig
from course_utils.core.errors import CourseError
from course_utils.core.lazy import lazy_import

if TYPE_CHECKING:
    from PIL.Image import Image

    from course_utils.vision.zoo import Classifier

LOG = logging.getLogger(__name__)
TINY_MARKER = "course_tiny_random.json"
TINY_PROMPT_TOKENS = 512
TINY_RECIPE = 3  # bump when build_tiny_pipeline changes, so cached tiny pipelines are rebuilt
NOISE_NOTE = ("The picture is NOISE: this is a tiny pipeline with RANDOM weights, built because no text-to-image "
              "weights are available offline. It proves the code path, not the picture. For a real picture, go "
              "online once (the default {model} downloads into the Hugging Face cache) or set imagegen.model to "
              "a local folder holding a diffusers text-to-image pipeline.")
SCHEDULERS = {"ddim": "DDIMScheduler", "euler_a": "EulerAncestralDiscreteScheduler", "lcm": "LCMScheduler"}
# Style presets: what is appended to the story's image prompt, and what the picture should avoid.
STYLE_PRESETS: dict[str, tuple[str, str]] = {
    "storybook": ("children's storybook illustration, soft colours, warm light, detailed",
                  "text, watermark, blurry, frightening"),
    "watercolor": ("watercolor painting, loose brush strokes, paper texture", "text, watermark, photo"),
    "photo": ("photograph, natural light, 35 mm, sharp focus", "text, watermark, drawing, cartoon"),
    "comic": ("comic book panel, bold ink outlines, flat colours", "text, watermark, speech bubble, photo"),
    "pixel-art": ("pixel art, 16-bit video game style, limited palette", "text, watermark, blurry, photo"),
    "none": ("", ""),
}


class ImageGenError(CourseError, RuntimeError):
    """Image generation cannot run as configured; the message says what to change."""


class BlockedStoryError(ImageGenError):
    """A story the guardrails blocked was handed to image generation: it never reaches the picture step."""


class GenerationCancelled(ImageGenError):
    """The user cancelled a generation between two denoising steps."""


class StoryLike(Protocol):
    """What image generation reads from a story result (``course_utils.genai.story.StoryResult`` has it)."""

    text: str
    image_prompt: str | None
    blocked: bool
    blocked_by: Any


# --- Where the model comes from ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """The pipeline to load: what the ledger calls it, where from, and whether its weights are real."""

    name: str
    location: str
    real_weights: bool
    local_files_only: bool
    note: str = ""


def tiny_pipeline_dir(config: CourseConfig) -> Path:
    """Where the tiny random-weight pipeline is built: ``<workspace>/imagegen/tiny-random-sd``."""
    return config.workspace / "imagegen" / "tiny-random-sd"


def _tiny_fingerprint(seed: int) -> dict[str, Any]:
    diffusers = lazy_import("diffusers", "imagegen", "Image generation")
    transformers = lazy_import("transformers", "imagegen", "Image generation")

    return {"recipe": TINY_RECIPE, "seed": seed, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "real_weights": False}


def _write_clip_vocab(folder: Path) -> None:
    """A character-level CLIP BPE vocabulary: enough for the tokenizer to run, not to understand.

    CLIP's byte-to-unicode table maps printable ASCII to itself, so each character (and its
    end-of-word form) is one token; with no merges every word splits into characters.
    """
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for code in range(33, 127):
        vocab[chr(code)] = len(vocab)
        vocab[f"{chr(code)}</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")


def _tiny_components(vocab_dir: Path, seed: int) -> dict[str, Any]:
    import torch

    lazy_import("diffusers", "imagegen", "Image generation")
    lazy_import("transformers", "imagegen", "Image generation")
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    # Sizes follow diffusers' own tiny test pipelines: a two-block UNet of 32/64 channels, a 32-wide text encoder.
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), norm_num_groups=32)
    # Four VAE blocks, as in Stable Diffusion: latents are 1/8 of the picture's side (two would make them 1/2,
    # and a 512 px picture would cost the UNet 16 times more).
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 64, 64), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64)
    _write_clip_vocab(vocab_dir)
    # Characters are far more numerous than CLIP's word pieces: 512 positions hold what 77 hold in real CLIP.
    tokenizer = CLIPTokenizer.from_pretrained(vocab_dir, model_max_length=TINY_PROMPT_TOKENS,
                                              unk_token="<|endoftext|>", pad_token="<|endoftext|>",
                                              local_files_only=True)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=TINY_PROMPT_TOKENS, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    # SD-Turbo's own scheduler settings, so "default" behaves as it does with the real model.
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="trailing")
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": text_encoder.eval(), "tokenizer": tokenizer,
            "scheduler": scheduler}


def build_tiny_pipeline(folder: Path, seed: int = 0) -> Path:
    """Build (or reuse) a tiny random-weight ``StableDiffusionPipeline`` saved in diffusers layout at ``folder``.

    Reused while its marker file matches this recipe, seed and library versions; otherwise rebuilt
    in a temporary folder and moved into place, so a crash never leaves half a pipeline.
    """
    StableDiffusionPipeline = lazy_import("diffusers", "imagegen", "Image generation").StableDiffusionPipeline

    fingerprint = _tiny_fingerprint(seed)
    marker = folder / TINY_MARKER
    if marker.exists() and json.loads(marker.read_text(encoding="utf-8")).get("fingerprint") == fingerprint:
        return folder
    with atomic_directory(folder) as staging, \
            tempfile.TemporaryDirectory(prefix=f".{folder.name}.vocab.", dir=folder.parent) as vocab_dir:
        pipe = StableDiffusionPipeline(**_tiny_components(Path(vocab_dir), seed), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(staging)
        (staging / TINY_MARKER).write_text(json.dumps(
            {"fingerprint": fingerprint, "note": NOISE_NOTE.format(model=ImageGenConfig().model)}, indent=2),
            encoding="utf-8")
    return folder


def is_tiny_random(folder: Path) -> bool:
    """True for a folder built by ``build_tiny_pipeline`` (its weights are random)."""
    return (Path(folder) / TINY_MARKER).exists()


def _hub_snapshot(model_id: str) -> Path | None:
    """The cached Hugging Face snapshot of ``model_id`` on this machine, without touching the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model_id, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError):
        return None


def resolve_model(config: CourseConfig, online: bool | None = None) -> ModelSource:
    """Where this machine gets ``imagegen.model``: a local folder, the HF cache, a download, or the tiny fallback.

    ``online=None`` probes the network (``config.offline``, which ``COURSE_OFFLINE=1`` sets, skips the probe).
    """
    settings = config.imagegen
    local = Path(settings.model).expanduser()
    if local.is_dir():
        if is_tiny_random(local):
            return ModelSource("tiny-random-sd", str(local), False, True, NOISE_NOTE.format(model=settings.model))
        return ModelSource(settings.model, str(local), True, True, f"local folder {local}")
    if (snapshot := _hub_snapshot(settings.model)) is not None:
        return ModelSource(settings.model, str(snapshot), True, True, "from the Hugging Face cache")
    if online is None:
        from course_utils.core.environment import check_online

        online = check_online(offline=config.offline)[0]
    if online:
        return ModelSource(settings.model, settings.model, True, False, "downloading into the Hugging Face cache")
    if settings.offline_fallback == "tiny-random":
        folder = build_tiny_pipeline(tiny_pipeline_dir(config), config.seed)
        return ModelSource("tiny-random-sd", str(folder), False, True, NOISE_NOTE.format(model=settings.model))
    raise ImageGenError(
        f"No weights for imagegen.model={settings.model!r}: offline, not in the Hugging Face cache and not a local "
        "folder. Go online once, set imagegen.model to a local diffusers folder, or set "
        "imagegen.offline_fallback: tiny-random to run the code path with a random (noise) pipeline.")


# --- Memory options from the device --------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceInfo:
    """The accelerator image generation would use: ``cpu``, ``cuda`` (a discrete GPU) or ``jetson``."""

    kind: Literal["cpu", "cuda", "jetson"]
    memory_gb: float | None = None
    name: str = "CPU"


def detect_device() -> DeviceInfo:
    """This machine's device: a Jetson (GPU sharing RAM with the CPU), a discrete CUDA GPU, or the CPU."""
    import torch

    from course_utils.core.environment import detect_jetson

    if not torch.cuda.is_available():
        return DeviceInfo("cpu")
    properties = torch.cuda.get_device_properties(0)
    kind: Literal["cuda", "jetson"] = "jetson" if detect_jetson() is not None else "cuda"
    return DeviceInfo(kind, round(properties.total_memory / 2**30, 1), properties.name)


@dataclass(frozen=True)
class MemoryPlan:
    """How the pipeline is placed: device, dtype, attention slicing, VAE tiling, CPU offload, and why."""

    device: Literal["cpu", "cuda"]
    dtype: Literal["float16", "float32"]
    attention_slicing: bool
    vae_tiling: bool
    cpu_offload: Literal["none", "model", "sequential"]
    reason: str


def memory_plan(device: DeviceInfo, settings: ImageGenConfig) -> MemoryPlan:
    """Memory options for ``device``; every ``imagegen`` setting that is not ``auto``/null overrides the choice.

    * CPU: float32 (float16 kernels are slow or missing there), nothing else.
    * Jetson: float16; with <= 8 GB, attention slicing and VAE tiling. Never CPU offload: the GPU shares
      the CPU's RAM, so "offloading" moves bytes within the same memory and only costs time.
    * Discrete GPU: float16; < 10 GB adds slicing, tiling and model offload (whole models move to the GPU
      in turn), < 6 GB sequential offload (layer by layer: slowest, smallest).
    """
    if settings.device == "cpu" or (settings.device == "auto" and device.kind == "cpu"):
        auto = MemoryPlan("cpu", "float32", False, False, "none", "CPU: float32, no offload")
    elif settings.device == "cuda" and device.kind == "cpu":
        raise ImageGenError("imagegen.device is 'cuda' but PyTorch sees no CUDA GPU: set imagegen.device: auto.")
    elif device.kind == "jetson":
        small = device.memory_gb is None or device.memory_gb <= 8.5
        auto = MemoryPlan("cuda", "float16", small, small, "none",
                          f"Jetson ({device.memory_gb} GB shared with the CPU): float16"
                          + (", attention slicing, VAE tiling" if small else "") + "; no offload on shared memory")
    else:
        memory = device.memory_gb or 0.0
        offload: Literal["none", "model", "sequential"] = (
            "sequential" if memory < 6 else "model" if memory < 10 else "none")
        small = memory < 10
        auto = MemoryPlan("cuda", "float16", small, small, offload,
                          f"{device.name} ({memory} GB): float16" + (f", slicing, tiling, {offload} offload"
                                                                     if small else ""))
    overrides = {
        "dtype": None if settings.dtype == "auto" else settings.dtype,
        "attention_slicing": settings.attention_slicing,
        "vae_tiling": settings.vae_tiling,
        "cpu_offload": None if settings.cpu_offload == "auto" else settings.cpu_offload,
    }
    chosen = {key: value for key, value in overrides.items() if value is not None}
    if chosen.get("cpu_offload", "none") != "none" and auto.device == "cpu":
        raise ImageGenError("imagegen.cpu_offload needs a CUDA GPU: set it to auto or none on this machine.")
    if not chosen:
        return auto
    note = ", ".join(f"{key}={value}" for key, value in chosen.items())
    return MemoryPlan(**{**asdict(auto), **chosen, "reason": f"{auto.reason}; overridden: {note}"})


# --- The generator -------------------------------------------------------------------------------------------


@dataclass
class Generation:
    """One generated picture and everything needed to reproduce and judge it."""

    image: Image
    prompt: str
    negative_prompt: str
    model: str
    real_weights: bool
    scheduler: str
    steps: int
    guidance_scale: float
    seed: int
    size: int
    seconds: float
    unet_rows: int  # latent rows the UNet processed: steps, or 2 x steps with classifier-free guidance


@dataclass
class ImageGenerator:
    """A loaded pipeline with its source and memory plan; ``generate`` draws, ``use_scheduler`` switches."""

    pipe: Any
    source: ModelSource
    plan: MemoryPlan
    default_scheduler: Any = field(repr=False, default=None)
    scheduler_name: str = "default"

    def use_scheduler(self, name: str) -> None:
        """Switch the scheduler: ``default`` (the model's own), ``ddim``, ``euler_a`` or ``lcm``.

        The new scheduler is built from the model's scheduler config, so its noise schedule matches the
        weights. LCM sampling only gives good pictures with an LCM-distilled model or LCM-LoRA.
        """
        diffusers = lazy_import("diffusers", "imagegen", "Image generation")

        if name == "default":
            self.pipe.scheduler = self.default_scheduler
        elif name in SCHEDULERS:
            cls = getattr(diffusers, SCHEDULERS[name])
            self.pipe.scheduler = cls.from_config(self.default_scheduler.config)
        else:
            raise ImageGenError(f"Unknown scheduler {name!r}: choose default, {', '.join(SCHEDULERS)}.")
        self.scheduler_name = name

    def generate(self, prompt: str, negative_prompt: str = "", steps: int = 2, guidance_scale: float = 0.0,
                 seed: int = 0, size: int = 512, on_step: Callable[[int, int], None] | None = None,
                 cancel: Callable[[], bool] | None = None) -> Generation:
        """Draw one ``size`` x ``size`` picture; ``on_step(done, total)`` reports progress and ``cancel()``
        returning True stops between steps with ``GenerationCancelled``."""
        import torch

        if size % 8:
            raise ImageGenError(f"imagegen.size must be a multiple of 8 (the VAE downsamples by 8), got {size}.")
        rows: list[int] = []
        hook = self.pipe.unet.register_forward_pre_hook(
            lambda module, args, kwargs: rows.append(int((args[0] if args else kwargs["sample"]).shape[0])),
            with_kwargs=True)

        def step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if cancel is not None and cancel():
                raise GenerationCancelled("Picture cancelled.")
            if on_step is not None:
                on_step(step + 1, steps)
            return tensors

        generator = torch.Generator(device="cpu").manual_seed(seed)
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                image = self.pipe(prompt, negative_prompt=negative_prompt or None, num_inference_steps=steps,
                                  guidance_scale=guidance_scale, height=size, width=size, generator=generator,
                                  callback_on_step_end=step_end).images[0]
        finally:
            hook.remove()
        return Generation(image, prompt, negative_prompt, self.source.name, self.source.real_weights,
                          self.scheduler_name, steps, guidance_scale, seed, size,
                          time.perf_counter() - started, sum(rows))


def _load_pipeline(source: ModelSource, dtype: Any) -> Any:
    diffusers = lazy_import("diffusers", "imagegen", "Image generation")
    AutoPipelineForText2Image = diffusers.AutoPipelineForText2Image

    options = {"dtype": dtype, "local_files_only": source.local_files_only}
    if source.real_weights and str(dtype) == "torch.float16":
        try:  # half-size downloads where the repository publishes them (SD-Turbo does)
            return AutoPipelineForText2Image.from_pretrained(source.location, variant="fp16", **options)
        except (OSError, ValueError):
            LOG.info("no fp16 variant of %s; loading the default weights in float16", source.name)
    return AutoPipelineForText2Image.from_pretrained(source.location, **options)


def load_generator(config: CourseConfig, source: ModelSource | None = None, device: DeviceInfo | None = None,
                   online: bool | None = None) -> ImageGenerator:
    """Load the configured pipeline with the memory plan for this device and the configured scheduler."""
    import torch

    source = source or resolve_model(config, online)
    plan = memory_plan(device or detect_device(), config.imagegen)
    try:
        pipe = _load_pipeline(source, getattr(torch, plan.dtype))
    except OSError as error:
        raise ImageGenError(f"Cannot load the text-to-image pipeline {source.name!r} from {source.location}: "
                            f"{error}. Check imagegen.model (a diffusers folder or a Hugging Face id).") from None
    if plan.cpu_offload == "sequential":
        pipe.enable_sequential_cpu_offload()
    elif plan.cpu_offload == "model":
        pipe.enable_model_cpu_offload()
    else:
        pipe.to(plan.device)
    if plan.attention_slicing:
        pipe.enable_attention_slicing()
    if plan.vae_tiling:
        pipe.vae.enable_tiling()
    pipe.set_progress_bar_config(disable=True)
    generator = ImageGenerator(pipe, source, plan, pipe.scheduler)
    generator.use_scheduler(config.imagegen.scheduler)
    return generator


# --- From the story to the picture, and back to the classifier ----------------------------------------------


def styled_prompt(prompt: str, style: str) -> tuple[str, str]:
    """The prompt with a style preset appended, and the preset's negative prompt."""
    if style not in STYLE_PRESETS:
        raise ImageGenError(f"Unknown style {style!r}: choose one of {', '.join(STYLE_PRESETS)}.")
    suffix, negative = STYLE_PRESETS[style]
    prompt = " ".join(prompt.split())
    return (f"{prompt}, {suffix}" if suffix else prompt), negative


def prompt_for_story(story: StoryLike, style: str) -> tuple[str, str]:
    """The picture's prompt and negative prompt for a story; a blocked story raises ``BlockedStoryError``.

    Uses the story step's distilled ``image_prompt``; without one, the story's first sentence.
    """
    if story.blocked:
        raise BlockedStoryError(f"The story was blocked by the guardrails ({story.blocked_by}): no picture is drawn "
                                "for a blocked story. Change the labels or the prompt and write a new story.")
    base = (story.image_prompt or "").strip() or re.split(r"(?<=[.!?])\s", story.text.strip(), maxsplit=1)[0]
    if not base:
        raise ImageGenError("The story has neither an image prompt nor any text to draw.")
    return styled_prompt(base, style)


def picture_for_story(generator: ImageGenerator, story: StoryLike, settings: ImageGenConfig,
                      on_step: Callable[[int, int], None] | None = None,
                      cancel: Callable[[], bool] | None = None) -> Generation:
    """Draw the picture of an unblocked story with the configured style, steps, guidance, seed and size."""
    prompt, negative = prompt_for_story(story, settings.style)
    return generator.generate(prompt, negative, settings.steps, settings.guidance_scale, settings.seed,
                              settings.size, on_step, cancel)


@dataclass(frozen=True)
class RoundTrip:
    """Did the story's subject survive text -> picture -> classifier?"""

    subject: str
    predictions: list[tuple[str, float]]
    survived: bool
    chance: float
    real_weights: bool

    @property
    def verdict(self) -> str:
        """One honest sentence about the round trip."""
        top = self.predictions[0][0] if self.predictions else "nothing"
        outcome = (f"the subject survived: the classifier sees {top!r} in the picture" if self.survived
                   else f"the subject was lost: the classifier sees {top!r}, not {self.subject!r}")
        if not self.real_weights:
            return (f"{outcome}. The picture is noise from a random-weight pipeline, so this outcome is chance "
                    f"(1 in {round(1 / self.chance)} with {round(1 / self.chance)} classes), not a result.")
        return f"{outcome}."


def judge_round_trip(subject: str, predictions: list[tuple[str, float]], num_classes: int,
                     real_weights: bool) -> RoundTrip:
    """The round trip's verdict from the picture's top-k predictions: survived when top-1 is the subject."""
    return RoundTrip(subject, predictions, bool(predictions) and predictions[0][0] == subject, 1 / num_classes,
                     real_weights)


def round_trip(classifier: Classifier, generation: Generation, subject: str, k: int = 5) -> RoundTrip:
    """Classify the generated picture with ``classifier`` and check whether its top-1 is the story's subject."""
    from course_utils.vision.zoo import predict

    return judge_round_trip(subject, predict(classifier, [generation.image], k)[0], len(classifier.classes),
                            generation.real_weights)


def stage_metrics(generation: Generation, generator: ImageGenerator, trip: RoundTrip | None = None) -> dict[str, Any]:
    """The ledger's ``imagegen`` figures for one generation (and its round trip)."""
    metrics: dict[str, Any] = {
        "model": generation.model, "real_weights": generation.real_weights, "steps": generation.steps,
        "seconds_per_image": round(generation.seconds, 3), "size": generation.size,
        "scheduler": generation.scheduler, "guidance_scale": generation.guidance_scale,
        "device": generator.plan.device, "dtype": generator.plan.dtype, "memory_plan": generator.plan.reason,
        "note": generator.source.note,
    }
    if trip is not None:
        metrics |= {"round_trip_subject": trip.subject, "round_trip_top1": trip.predictions[0][0],
                    "subject_survived": trip.survived}
    return metrics
