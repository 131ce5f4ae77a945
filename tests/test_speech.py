"""Speech: WER arithmetic, bad-input handling, and a real TTS -> ASR round trip with the offline defaults."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from course_utils.core.config import CourseConfig, SpeechConfig
from course_utils.genai import speech
from course_utils.lessons import exercises
from course_utils.lessons.checks import ExerciseFailed

offline_speech = pytest.mark.skipif(
    importlib.util.find_spec("piper") is None or importlib.util.find_spec("faster_whisper") is None,
    reason='needs the speech extra: pip install -e ".[speech]"',
)


def _tone(seconds: float, rate: int = 16_000, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


# --- WER -----------------------------------------------------------------------------------------------------------


def test_wer_counts_substitutions_deletions_and_insertions() -> None:
    assert speech.word_error_rate("the cat sat on the mat", "the cat sat on the mat") == 0.0
    assert speech.word_error_rate("the cat sat on the mat", "the bat sat on the mat") == pytest.approx(1 / 6)
    assert speech.word_error_rate("the cat sat on the mat", "the cat sat on mat") == pytest.approx(1 / 6)
    assert speech.word_error_rate("the cat sat", "oh the cat sat down") == pytest.approx(2 / 3)
    assert speech.word_error_rate("a b", "c d e f") == pytest.approx(2.0)  # WER is not capped at 1


def test_wer_ignores_case_and_punctuation_but_not_words() -> None:
    assert speech.word_error_rate("Pip, the bee!", "pip the bee") == 0.0
    assert speech.word_error_rate("It’s a keeper.", "it's a keep her") == pytest.approx(2 / 3)


def test_corpus_wer_pools_edits_over_reference_words() -> None:
    pooled = speech.word_error_rate(["one two three four", "five six"], ["one two three four", "five"])
    assert pooled == pytest.approx(1 / 6)  # not the mean of 0 and 1/2


def test_wer_refuses_undefined_or_unpaired_input() -> None:
    with pytest.raises(ValueError, match="no words"):
        speech.word_error_rate("...", "hello")
    with pytest.raises(ValueError, match="pair them"):
        speech.word_error_rate(["a", "b"], ["a"])


def test_check_wer_passes_the_right_answer_and_fails_a_wrong_one() -> None:
    reference, hypothesis = "the quick fox jumped over the lazy dog", "a fox jumped over the lazy dogs"
    assert exercises.check_wer(3 / 8, reference, hypothesis).passed
    assert not exercises.check_wer(2 / 8, reference, hypothesis).passed
    assert not exercises.check_wer(None, reference, hypothesis).passed
    with pytest.raises(ExerciseFailed):
        exercises.check_wer(3 / 7, reference, hypothesis, strict=True)


# --- text helpers and the story -------------------------------------------------------------------------------------


def test_first_words_keeps_whole_sentences() -> None:
    text = "One two three. Four five six. Seven eight nine."
    assert speech.first_words(text, 7) == "One two three. Four five six."
    assert speech.first_words(text, 2) == "One two"
    assert speech.first_words("A bee flew. An ant walked. The queen of", 20) == "A bee flew. An ant walked."
    assert speech.first_words('He said "hi." Then left', 20) == 'He said "hi."'


def _fake_story_stage(monkeypatch: pytest.MonkeyPatch, **result: object) -> list[dict]:
    calls: list[dict] = []

    def generate_story(config: CourseConfig, labels: list[str], **options: object) -> SimpleNamespace:
        calls.append({"labels": labels, **options})
        if "error" in result:
            raise result["error"]  # type: ignore[misc]
        return SimpleNamespace(endpoint="local smollm2", rails="deterministic", **result)

    monkeypatch.setitem(sys.modules, "course_utils.genai.story", SimpleNamespace(generate_story=generate_story))
    return calls


def test_story_for_passes_the_spoken_prompt_to_the_story_stage(config: CourseConfig,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    config.speech.max_story_words = 6
    calls = _fake_story_stage(monkeypatch, text="A bee met an ant. They talked all day long.", blocked=False)
    text, source = speech.story_for(config, "a story about friends")
    assert calls == [{"labels": ["bee", "ant"], "instruction": "a story about friends"}]
    assert text == "A bee met an ant." and source == "the story stage (local smollm2, deterministic rails)"


def test_story_for_falls_back_to_the_sample_when_blocked_or_unavailable(config: CourseConfig,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_story_stage(monkeypatch, text="", blocked=True, blocked_by="keyword check input")
    text, source = speech.story_for(config, "something violent")
    assert text.startswith("Once upon a time") and "blocked by keyword check input" in source
    _fake_story_stage(monkeypatch, error=RuntimeError("the local LLM server did not start"))
    text, source = speech.story_for(config, "anything")
    assert text.startswith("Once upon a time") and "did not start" in source


# --- bad input -------------------------------------------------------------------------------------------------------


def test_missing_empty_and_non_audio_files_get_clear_messages(tmp_path: Path) -> None:
    with pytest.raises(speech.AudioError, match="does not exist"):
        speech.prepare_audio(tmp_path / "nope.wav")
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(speech.AudioError, match="empty"):
        speech.prepare_audio(tmp_path / "empty.wav")
    (tmp_path / "notes.wav").write_text("not audio at all\n" * 20)
    with pytest.raises(speech.AudioError, match="not an audio file.*WAV, FLAC"):
        speech.prepare_audio(tmp_path / "notes.wav")


def test_silent_and_too_short_recordings_are_refused(tmp_path: Path) -> None:
    silent = speech.write_wav(tmp_path / "silent.wav", np.zeros(32_000), 16_000)
    with pytest.raises(speech.AudioError, match="silent.*microphone"):
        speech.prepare_audio(silent)
    short = speech.write_wav(tmp_path / "short.wav", _tone(0.2), 16_000)
    with pytest.raises(speech.AudioError, match="only 0.20 s long"):
        speech.prepare_audio(short)
    assert speech.prepare_audio(short, SpeechConfig(min_duration_s=0.1)).duration_s == pytest.approx(0.2)


def test_stereo_other_rates_and_flac_are_converted_with_notes(tmp_path: Path) -> None:
    files = speech.bad_input_examples(tmp_path, _tone(1.0), 16_000)
    stereo = speech.prepare_audio(files["44.1 kHz stereo"])
    assert stereo.sample_rate == 16_000 and stereo.samples.ndim == 1
    assert stereo.duration_s == pytest.approx(1.0, abs=0.01)
    assert "mixed 2 channels down to mono" in stereo.notes and "resampled 44100 Hz -> 16000 Hz" in stereo.notes
    phone = speech.prepare_audio(files["8 kHz telephone"])
    assert any("upsampling adds no detail" in note for note in phone.notes)
    flac = speech.prepare_audio(files["FLAC"])
    assert flac.notes == ("converted from flac (flac)",) and flac.level_dbfs == pytest.approx(-13.5, abs=0.5)
    for name in ("silence", "too short", "not audio"):
        with pytest.raises(speech.AudioError):
            speech.prepare_audio(files[name])


def test_write_wav_round_trips_through_the_decoder(tmp_path: Path) -> None:
    tone = _tone(0.6)
    audio = speech.prepare_audio(speech.write_wav(tmp_path / "tone.wav", tone, 16_000))
    assert audio.notes == () and np.allclose(audio.samples, tone, atol=2e-4)


def test_nothing_to_say_is_refused_before_loading_a_voice(config: CourseConfig) -> None:
    with pytest.raises(speech.SpeechError, match="no words"):
        speech.synthesize("  ...  ", config, config.workspace / "x.wav")


def test_asking_for_nemo_without_it_says_how_to_get_it(config: CourseConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(speech, "nemo_version", lambda: None)
    config.speech.asr = "nemo"
    with pytest.raises(speech.SpeechError, match=r"speech-nemo"):
        speech.asr_engine(config)
    with pytest.raises(speech.SpeechError, match="Unknown NeMo checkpoint"):
        speech.nemo_checkpoint("no-such-model", config, online=False)


# --- the real engines ------------------------------------------------------------------------------------------------


@offline_speech
def test_tts_makes_speech_of_plausible_length(config: CourseConfig) -> None:
    config.speech.tts = "piper"
    text = speech.EVAL_SENTENCES[0]
    clip = speech.synthesize(text, config, config.workspace / "said.wav")
    words_per_second = len(text.split()) / clip.duration_s
    assert 1.5 < words_per_second < 5, f"{clip.duration_s:.1f} s for {len(text.split())} words"
    assert clip.model == "piper/en_US-joe-medium" and clip.sample_rate == 22_050
    assert speech.prepare_audio(clip.path).level_dbfs > -30


@offline_speech
def test_round_trip_recognizes_a_synthesized_prompt(config: CourseConfig) -> None:
    config.speech.tts, config.speech.asr = "piper", "faster-whisper"
    trip = speech.round_trip(speech.EVAL_SENTENCES[3], config, config.workspace / "prompt.wav")
    assert trip.wer <= 0.10, trip.transcript.text
    assert trip.transcript.decoder == "attention" and trip.transcript.model.startswith("faster-whisper/tiny.en")
    assert trip.transcript.notes == ("resampled 22050 Hz -> 16000 Hz",)


@offline_speech
def test_speak_caches_the_wav_by_text_and_voice(config: CourseConfig) -> None:
    config.speech.tts = "piper"
    first = speech.speak("Hello, little bee.", config)
    stamp = first.stat().st_mtime_ns
    assert speech.speak("Hello, little bee.", config) == first and first.stat().st_mtime_ns == stamp
    assert speech.speak("Goodbye, little ant.", config) != first


@pytest.mark.skipif(importlib.util.find_spec("nemo") is None, reason='needs NeMo: pip install -e ".[speech-nemo]"')
def test_nemo_builds_saves_and_restores_a_model_offline(config: CourseConfig, tmp_path: Path) -> None:
    audio = speech.prepare_audio(speech.write_wav(tmp_path / "tone.wav", _tone(1.0), 16_000))
    demo = speech.nemo_offline_demo(config, audio)
    assert demo.restored_identical and demo.nemo_file.is_file() and demo.parameters > 10_000
    config.speech.asr, config.speech.nemo_asr_model = "nemo", str(demo.nemo_file)
    assert speech.asr_engine(config).decoder == "ctc"
