"""How :class:`~headrace.models.builtin.minilm.MiniLM`'s parameters are named in a Hugging
Face ``BertModel`` checkpoint (``model.safetensors`` of all-MiniLM-L6-v2), and the mapping
of such a checkpoint onto MiniLM's own names, keeping a chosen subset of its layers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

# Our parameter names -> HuggingFace BertModel names ("{i}" = layer index in the source).
_HF_GLOBAL = {
    "embeddings.word.weight": "embeddings.word_embeddings.weight",
    "embeddings.position.weight": "embeddings.position_embeddings.weight",
    "embeddings.token_type.weight": "embeddings.token_type_embeddings.weight",
    "embeddings.norm.weight": "embeddings.LayerNorm.weight",
    "embeddings.norm.bias": "embeddings.LayerNorm.bias",
}
_HF_LAYER = {
    "attention.q": "attention.self.query",
    "attention.k": "attention.self.key",
    "attention.v": "attention.self.value",
    "attention.out": "attention.output.dense",
    "attention.norm": "attention.output.LayerNorm",
    "ffn.inter": "intermediate.dense",
    "ffn.out": "output.dense",
    "ffn.norm": "output.LayerNorm",
}


def hf_to_state_dict(hf: Mapping[str, torch.Tensor], layers: Sequence[int]) -> dict[str, torch.Tensor]:
    """Map HuggingFace BERT tensors onto our names, keeping only ``layers`` (in that order)."""
    out = {ours: hf[theirs] for ours, theirs in _HF_GLOBAL.items()}
    for new_i, src_i in enumerate(layers):
        for ours, theirs in _HF_LAYER.items():
            for p in ("weight", "bias"):
                out[f"layers.{new_i}.{ours}.{p}"] = hf[f"encoder.layer.{src_i}.{theirs}.{p}"]
    return out
