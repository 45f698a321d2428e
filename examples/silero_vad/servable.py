"""silero-vad's TorchScript model behind an operator-written servable (custom preprocessing).

Producers send a whole clip of 16 kHz mono audio as 16-bit PCM (``pcm``: int16 ``[n]``, the
bytes a microphone or a WAV file gives) and get one speech probability per 512-sample
chunk (``speech_prob``: float32 ``[ceil(n / 512)]``, at the clip's own length).

Why an operator servable and not the generic torch backend: the TorchScript module is
stateful (it keeps its RNN state and audio context between calls) and its ``forward`` takes
the sample rate as a Python ``int``. This class owns both: it turns PCM into float audio,
pads the clips of a batch to one length, runs silero's own ``audio_forward`` (which resets
the state and walks the chunks) on the whole batch, and cuts each clip's probabilities back
to its own chunk count. Padding at the end never changes earlier chunks (the model is causal).

Add and serve (see examples/silero_vad/README.md)::

    headrace models add vad-clip "$(python -c 'import silero_vad, pathlib; print(pathlib.Path(silero_vad.__file__).parent / "data" / "silero_vad.jit")')" \\
        --servable examples.silero_vad.servable:SileroClipVAD
    headrace worker --model vad-clip --servable examples.silero_vad.servable:SileroClipVAD
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from headrace.workers.backends import CustomServable, TensorSpec

SAMPLE_RATE = 16_000
CHUNK = 512  # samples per probability at 16 kHz


class SileroClipVAD(CustomServable):
    """Speech probability per 512-sample chunk of a 16 kHz int16 PCM clip."""

    inputs = (TensorSpec("pcm", "int16", (-1,)),)
    outputs = (TensorSpec("speech_prob", "float32", (-1,)),)
    thread_safe = False  # the module keeps RNN state between calls
    max_batch = 32

    def load(self) -> None:
        import torch

        assert self.folder is not None and self.manifest is not None, "add the .jit file with headrace models add"
        torch.set_num_threads(1)
        self.model = torch.jit.load(str(self.folder / self.manifest.model_file), map_location="cpu")
        self.model.eval()

    def preprocess(self, request: Any) -> dict[str, Any]:
        pcm = np.asarray(request.inputs["pcm"], dtype=np.int16)
        return {"audio": pcm.astype(np.float32) / 32768.0, "chunks": max(1, math.ceil(len(pcm) / CHUNK))}

    def infer_batch(self, batch: Sequence[dict[str, Any]]) -> list[dict[str, np.ndarray[Any, Any]]]:
        import torch

        width = max(s["chunks"] for s in batch) * CHUNK
        audio = np.zeros((len(batch), width), np.float32)
        for i, s in enumerate(batch):
            audio[i, :len(s["audio"])] = s["audio"]
        with torch.inference_mode():
            probs = self.model.audio_forward(torch.from_numpy(audio), SAMPLE_RATE).numpy()
        return [{"speech_prob": probs[i, :s["chunks"]].astype(np.float32)} for i, s in enumerate(batch)]
