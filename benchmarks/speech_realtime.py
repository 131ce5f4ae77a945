"""Speech speed and accuracy on the CPU: Piper TTS and faster-whisper ASR, by thread count and beam size.

Synthesizes the course's test sentences plus the sample story with Piper (noise 0 as the course's default,
or seeded voice noise; either way every ASR setting hears the same audio), then recognizes them with Whisper tiny.en. Prints one Markdown table: real-time factor
(processing time / audio time, below 1 is faster than real time) and pooled word error rate.

    .venv/bin/python benchmarks/speech_realtime.py [--threads 1 2] [--beams 1 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from course_utils.core.report import markdown_table
from course_utils.genai import speech


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--noise", type=float, default=0.0, help="Piper's VITS noise (the course default: 0)")
    parser.add_argument("--voice-noise", action="store_true", help="use the voice's own noise instead")
    args = parser.parse_args()

    texts = [*speech.EVAL_SENTENCES, *speech.split_sentences(speech.SAMPLE_STORY)]
    folder = Path(tempfile.mkdtemp(prefix="speech-bench-"))
    rows = []
    audios: list[speech.PreparedAudio] = []
    for threads in args.threads:
        tts = speech.PiperSynthesizer(speech.default_piper_voice(), threads, args.seed,
                                      None if args.voice_noise else args.noise)
        tts.synthesize("Warm up.")
        seconds = audio_s = 0.0
        for index, text in enumerate(texts):
            started = time.perf_counter()
            samples = tts.synthesize(text)
            seconds += time.perf_counter() - started
            audio_s += len(samples) / tts.sample_rate
            if threads == args.threads[0]:
                audios.append(speech.prepare_audio(speech.write_wav(folder / f"{index}.wav", samples, tts.sample_rate)))
        rows.append({"direction": "TTS", "engine": tts.name, "threads": threads, "beam": "",
                     "audio_s": audio_s, "rtf": seconds / audio_s, "wer": ""})
    total_audio = sum(a.duration_s for a in audios)
    for threads in args.threads:
        for beam in args.beams:
            asr = speech.WhisperRecognizer(speech.default_whisper_model(), "int8", threads, beam)
            asr.transcribe(audios[0])
            started = time.perf_counter()
            heard = [asr.transcribe(audio) for audio in audios]
            seconds = time.perf_counter() - started
            rows.append({"direction": "ASR", "engine": asr.name, "threads": threads, "beam": beam,
                         "audio_s": total_audio, "rtf": seconds / total_audio,
                         "wer": speech.word_error_rate(texts, heard)})
    print(f"{len(texts)} sentences, {total_audio:.0f} s of speech\n")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
