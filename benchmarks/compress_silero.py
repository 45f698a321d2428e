"""silero-vad's ONNX file (from the ``silero-vad`` package) through ``headrace compress``.

The model is stateful: each call takes a 512-sample chunk at 16 kHz (plus 64 samples of
context, 576 in all), the LSTM ``state`` ``[2, batch, 128]`` (batch on axis 1) and the sample
rate ``sr`` (a scalar shared by the batch), and returns the speech probability and the next
state. Calibration and fidelity therefore use *recorded* states: every stream is run through
the fp32 model chunk by chunk and each chunk is stored with the state the fp32 model had
when it arrived, so a batch of chunks is a batch of independent one-step calls. A separate
closed-loop check then runs each artifact over whole held-out streams on its own states,
which is where quantization error could accumulate.

Audio: English speech synthesised offline by ``espeak-ng`` (Debian package) from corpus
sentences, mixed into noise at 5-30 dB SNR with silences between utterances; without
espeak-ng, harmonic tone bursts stand in (and the output says so).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import wave
from pathlib import Path
from typing import Any

import numpy as np

from headrace.models.repository.store import IOSpec, ModelRepository

RATE, CHUNK, CONTEXT = 16000, 512, 64


def _speech(text: str, rng: np.random.Generator) -> np.ndarray[Any, Any]:
    if shutil.which("espeak-ng") is None:
        t = np.arange(int(RATE * 1.2)) / RATE
        f0 = rng.uniform(100, 220)
        return sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 8)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "s.wav"
        voice = rng.choice(["en", "en-us", "en+f3", "en+m3"])
        subprocess.run(["espeak-ng", "-v", str(voice), "-s", str(int(rng.integers(130, 190))), "-w", str(wav), text],
                       check=True, capture_output=True)
        with wave.open(str(wav)) as w:
            sr, x = w.getframerate(), np.frombuffer(w.readframes(w.getnframes()), np.int16) / 32768.0
    return np.interp(np.arange(0, len(x) * RATE / sr) * sr / RATE, np.arange(len(x)), x)


def streams(n: int, seed: int) -> list[np.ndarray[Any, Any]]:
    from headrace.models.builtin.corpus import load_corpus, sample

    rng = np.random.default_rng(seed)
    texts = sample(load_corpus(["pydoc"]).held_out, 3 * n, seed=seed)
    out = []
    for i in range(n):
        parts = []
        for text in texts[3 * i:3 * i + 2]:
            parts += [np.zeros(int(RATE * rng.uniform(0.3, 1.2))), _speech(text, rng) * rng.uniform(0.2, 0.9)]
        x = np.concatenate([*parts, np.zeros(int(RATE * 0.5))])
        noise = rng.normal(size=len(x)) * np.sqrt(np.mean(x ** 2) / 10 ** (rng.uniform(5, 30) / 10))
        out.append((x + noise).astype(np.float32))
    return out


def record(onnx_path: Path, audio: list[np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
    """Chunks with the fp32 model's incoming state: input [n, 576], state [2, n, 128], sr."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    xs, states = [], []
    for a in audio:
        state, ctx = np.zeros((2, 1, 128), np.float32), np.zeros(CONTEXT, np.float32)
        for i in range(0, len(a) - CHUNK + 1, CHUNK):
            x = np.concatenate([ctx, a[i:i + CHUNK]])[None]
            xs.append(x[0])
            states.append(state[:, 0])
            _, state = sess.run(None, {"input": x, "state": state, "sr": np.array(RATE, np.int64)})
            ctx = x[0, -CONTEXT:]
    return {"input": np.stack(xs), "state": np.stack(states, axis=1), "sr": np.array(RATE, np.int64)}


def closed_loop(onnx_path: Path, audio: list[np.ndarray[Any, Any]]) -> np.ndarray[Any, Any]:
    """Speech probabilities of whole streams, each artifact on its own states."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    probs = []
    for a in audio:
        state, ctx = np.zeros((2, 1, 128), np.float32), np.zeros(CONTEXT, np.float32)
        for i in range(0, len(a) - CHUNK + 1, CHUNK):
            x = np.concatenate([ctx, a[i:i + CHUNK]])[None]
            p, state = sess.run(None, {"input": x, "state": state, "sr": np.array(RATE, np.int64)})
            probs.append(float(p.reshape(-1)[0]))
            ctx = x[0, -CONTEXT:]
    return np.asarray(probs)


def run(repo: ModelRepository, work: Path, threads: int, min_fidelity: float = 0.99) -> Any:
    import silero_vad

    from headrace.models.compress.anymodel import AnyModelOptions, run_any

    src = Path(silero_vad.__file__).parent / "data" / "silero_vad.onnx"
    if not repo.versions("silero-vad"):
        repo.add("silero-vad", {"model.onnx": src}, format="onnx",
                 inputs=[IOSpec("input", "float32", (CHUNK + CONTEXT,)), IOSpec("state", "float32", (2, 128)),
                         IOSpec("sr", "int64", ())],
                 outputs=[IOSpec("output", "float32", (1,)), IOSpec("stateN", "float32", (2, 128))],
                 source="silero-vad (PyPI) silero_vad/data/silero_vad.onnx",
                 extra={"state_layout": "[2, batch, 128]: the batch is axis 1 of state and stateN"},
                 description="Silero VAD v5/v6, 16 kHz chunks of 512 samples + 64 context")
    work.mkdir(parents=True, exist_ok=True)
    cal_audio, held_audio = streams(12, seed=1), streams(8, seed=2)
    if not (work / "silero-held.npz").is_file():
        np.savez(work / "silero-cal.npz", **record(src, cal_audio))
        np.savez(work / "silero-held.npz", **record(src, held_audio))
    res = run_any(AnyModelOptions("silero-vad", data=work / "silero-cal.npz", held_out=work / "silero-held.npz",
                                  repo=repo.root, work_dir=work, steps=("quantize-dynamic", "quantize-static"),
                                  min_fidelity=min_fidelity, threads=threads, output="output", publish="name"))
    ref = closed_loop(src, held_audio)
    print(f"\nclosed loop over {len(held_audio)} held-out streams ({len(ref)} chunks, speech share "
          f"{(ref > 0.5).mean():.2f} by fp32; audio: {'espeak-ng speech' if shutil.which('espeak-ng') else 'tones'}):")
    for name in res.published:
        m = repo.load_manifest(*name.split("/"))
        got = closed_loop(repo.file_path(m, m.model_file), held_audio)
        print(f"  {name}: decision agreement {((got > 0.5) == (ref > 0.5)).mean():.4f}, "
              f"max |p - p_fp32| {np.abs(got - ref).max():.4f}, mean {np.abs(got - ref).mean():.4f}")
    return res
