"""A hand-written Qwen2 decoder that reads and writes Hugging Face checkpoints unchanged, and with it the
Llama-3 and Qwen3 families, which differ from Qwen2 only in a few config fields (see `FAMILIES`).

Module and parameter names are exactly Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, ...), so
safetensors keys load with no rename table and our saved checkpoints load in `transformers`, vLLM and
lighteval. One forward serves three uses:

    logits = model(input_ids)                                  # (B, T, vocab), plain causal batch
    hidden = model(input_ids, position_ids=pos, return_hidden=True)  # packed rows, for chunked losses
    logits = model(next_ids, cache=cache)                      # incremental decoding from a KV cache

Public API: `Qwen2Config` (any of `FAMILIES`), `Qwen2ForCausalLM`, `build_model`, `load_pretrained`, `save_pretrained`,
`save_state_dict`, `KVCache`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

# -----------------------------------------------------------------------------
# Config

# Keys of config.json that this file interprets; everything else is kept verbatim and written back on save.
_MANAGED_KEYS = {
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
    "rope_parameters", "rope_scaling", "max_position_embeddings", "tie_word_embeddings", "torch_dtype",
    "dtype", "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "hidden_act",
    "attention_dropout", "use_sliding_window", "layer_types", "transformers_version", "attention_bias", "mlp_bias",
}
# The model_types computed exactly: (the architecture they are saved as, whether their q/k/v projections carry
# biases, whether each head's q and k are RMS-normalized before RoPE). Qwen2 always has the biases; Llama and Qwen3
# read `attention_bias` from config.json (default false), and for them it biases o_proj too.
FAMILIES = {"qwen2": ("Qwen2ForCausalLM", True, False),
            "llama": ("LlamaForCausalLM", False, False),
            "qwen3": ("Qwen3ForCausalLM", False, True)}
# Llama 3.1's RoPE frequency scaling (rope_type "llama3"): the keys of its parameters.
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConfigError(ValueError):
    """A config.json we cannot represent exactly: we refuse it rather than compute different math."""


class CheckpointError(ValueError):
    """A checkpoint directory that is incomplete, inconsistent with its config, or corrupt."""


@dataclasses.dataclass
class Qwen2Config:
    """The fields of a Hugging Face Qwen2 config.json that determine the math. Defaults are HF's."""

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: same as num_attention_heads (multi-head attention)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    torch_dtype: str = "float32"  # dtype of the weights on disk; what save_pretrained writes by default
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    model_type: str = "qwen2"  # a key of FAMILIES
    attention_bias: bool | None = None  # None: the family's default
    rope_scaling: dict[str, float] | None = None  # llama3 RoPE scaling (LLAMA3_ROPE_KEYS), None: plain RoPE
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # unmanaged keys, preserved on save

    def __post_init__(self) -> None:
        if self.model_type not in FAMILIES:
            raise ConfigError(f"model_type must be one of {sorted(FAMILIES)}, got {self.model_type!r}")
        if self.attention_bias is None:
            self.attention_bias = FAMILIES[self.model_type][1]
        if self.model_type == "qwen2" and not self.attention_bias:
            raise ConfigError("Qwen2 always has q/k/v biases (attention_bias cannot be false)")
        if self.rope_scaling is not None:
            if sorted(self.rope_scaling) != sorted(LLAMA3_ROPE_KEYS):
                raise ConfigError(f"rope_scaling must have exactly the llama3 keys {LLAMA3_ROPE_KEYS}, "
                                  f"got {self.rope_scaling!r}")
            s = self.rope_scaling
            if not (s["factor"] > 0 and s["original_max_position_embeddings"] > 0
                    and s["high_freq_factor"] > s["low_freq_factor"] > 0):
                raise ConfigError(f"llama3 rope_scaling needs positive factors and high_freq_factor > "
                                  f"low_freq_factor, got {s!r}")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by "
                                  f"num_attention_heads {self.num_attention_heads}")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads {self.num_key_value_heads}")
        if not self.rope_theta > 0 or not self.rms_norm_eps > 0:
            raise ConfigError(f"rope_theta and rms_norm_eps must be positive, got "
                              f"{self.rope_theta!r} and {self.rms_norm_eps!r}")
        if self.torch_dtype not in _DTYPES:
            raise ConfigError(f"torch_dtype {self.torch_dtype!r} is not one of {sorted(_DTYPES)}")

    @property
    def qk_norm(self) -> bool:
        """Whether each attention head's q and k are RMS-normalized before RoPE (Qwen3)."""
        return FAMILIES[self.model_type][2]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Qwen2Config:
        """Validate a Hugging Face config dict (v4 or v5 layout) and keep only what is supported."""
        model_type = d.get("model_type")
        if model_type not in FAMILIES:
            raise ConfigError(f"model_type must be one of {sorted(FAMILIES)}, got {model_type!r}")
        arch = FAMILIES[model_type][0]
        archs = d.get("architectures") or [arch]
        if archs != [arch]:
            raise ConfigError(f"architectures must be [{arch!r}] for model_type {model_type!r}, got {archs!r}")
        if d.get("use_sliding_window"):
            raise ConfigError("use_sliding_window: true is not supported (full attention only)")
        if any(t != "full_attention" for t in d.get("layer_types") or []):
            raise ConfigError(f"layer_types other than full_attention are not supported: {d['layer_types']!r}")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act must be 'silu', got {d['hidden_act']!r}")
        if d.get("attention_dropout", 0.0):
            raise ConfigError(f"attention_dropout must be 0, got {d['attention_dropout']!r}")
        for key in ("quantization_config", "use_mrope", "mlp_bias"):
            if d.get(key):
                raise ConfigError(f"{key} is not supported, got {d[key]!r}")

        # RoPE: v4 writes rope_theta and rope_scaling, v5 rope_parameters (theta and scaling in one); both must agree.
        theta, scaling = d.get("rope_theta"), None
        for key in ("rope_scaling", "rope_parameters"):
            rope = d.get(key)
            if rope is None:
                continue
            params = {k: v for k, v in rope.items() if k not in ("rope_type", "type", "rope_theta")}
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if not (rope_type == "default" and not params) and \
                    not (rope_type == "llama3" and sorted(params) == sorted(LLAMA3_ROPE_KEYS)):
                raise ConfigError(f"{key} other than default or llama3 RoPE is not supported: {rope!r}")
            if theta is not None and rope.get("rope_theta", theta) != theta:
                raise ConfigError(f"rope_theta {theta!r} disagrees with {key} {rope!r}")
            theta = rope.get("rope_theta", theta)
            params = params or None
            if scaling is not None and params != scaling:
                raise ConfigError(f"rope_scaling {d['rope_scaling']!r} disagrees with rope_parameters {rope!r}")
            scaling = params

        kwargs = {k: d[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                     "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                                     "max_position_embeddings", "tie_word_embeddings", "bos_token_id",
                                     "eos_token_id", "pad_token_id", "initializer_range")
                  if d.get(k) is not None}
        if theta is not None:
            kwargs["rope_theta"] = float(theta)
        if scaling is not None:
            kwargs["rope_scaling"] = {k: scaling[k] for k in LLAMA3_ROPE_KEYS}
        if model_type != "qwen2":
            kwargs["attention_bias"] = bool(d.get("attention_bias", False))
        dtype = d.get("dtype") or d.get("torch_dtype")  # v5 writes `dtype`, and prefers it when both exist
        if dtype is not None:
            kwargs["torch_dtype"] = dtype
        extra = {k: v for k, v in d.items() if k not in _MANAGED_KEYS}
        return cls(**kwargs, model_type=model_type, extra=extra)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Qwen2Config:
        file = Path(path) / "config.json"
        try:
            d = json.loads(file.read_text())
        except (FileNotFoundError, NotADirectoryError):
            what = "no such path" if not Path(path).exists() else "no config.json in it"
            raise CheckpointError(f"{path}: not a checkpoint directory ({what})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{file}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise CheckpointError(f"{file}: expected a JSON object")
        try:
            return cls.from_dict(d)
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{file}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """config.json in a layout both transformers v4 (and vLLM) and v5 read identically."""
        rope = {"rope_type": "default"} if self.rope_scaling is None else {"rope_type": "llama3", **self.rope_scaling}
        d = {**self.extra,
             "architectures": [FAMILIES[self.model_type][0]], "model_type": self.model_type,
             "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
             "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
             "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
             "rms_norm_eps": self.rms_norm_eps, "max_position_embeddings": self.max_position_embeddings,
             "rope_theta": self.rope_theta,
             "rope_parameters": {**rope, "rope_theta": self.rope_theta},
             "tie_word_embeddings": self.tie_word_embeddings,
             "torch_dtype": self.torch_dtype, "dtype": self.torch_dtype,
             "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
             "pad_token_id": self.pad_token_id, "initializer_range": self.initializer_range,
             "hidden_act": "silu", "attention_dropout": 0.0, "use_sliding_window": False}
        if self.rope_scaling is not None:
            d["rope_scaling"] = rope  # where transformers v4 and vLLM read it
        if self.model_type != "qwen2":  # Llama's and Qwen3's own fields; Qwen3's head_dim defaults to 128, not ours
            d |= {"attention_bias": self.attention_bias, "mlp_bias": False, "head_dim": self.head_dim}
        if self.head_dim != self.hidden_size // self.num_attention_heads:
            d["head_dim"] = self.head_dim
        return d


# -----------------------------------------------------------------------------
# Attention masks: built once per forward, shared by every layer


@dataclasses.dataclass
class AttnMask:
    """How queries see keys in one forward.

    At most one representation is used: nothing (plain causal, the fused SDPA/flash path), a flex_attention
    BlockMask (packed documents on GPU: no T x T tensor ever exists), a document gather (packed documents on
    CPU: the documents are gathered into a padded batch for one causal SDPA, so the work is the documents'
    squared lengths, not T^2), document bounds known on the host (doc_attention: one causal call per
    document), or a dense boolean mask (padding, KV-cache decoding; True = may attend).
    """

    dense: Tensor | None = None  # (B, 1, T, S) bool
    block: BlockMask | None = None
    doc_index: Tensor | None = None  # (D, L) position in the flattened (B*T) tokens of document d's j-th token
    doc_valid: Tensor | None = None  # (D, L) whether j is within document d
    doc_bounds: Tensor | None = None  # (D+1,) int64 on the host: where each document starts, then T (doc_attention)


@functools.cache
def _compiled_flex_attention():
    # flex_attention is only fused (and memory-efficient) when compiled.
    return torch.compile(flex_attention)


@functools.cache
def _compiled_create_block_mask():
    # Uncompiled, create_block_mask evaluates the mask on the full (B, T, T) grid; compiled, it works blockwise.
    return torch.compile(create_block_mask)


def _flex_decode(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask,
                 kernel_options: dict[str, Any] | None = None) -> Tensor:
    """One query per row over a shared KV pool: q (B, H, 1, hd), k/v (1, Hkv, S, hd). Each KV head's group of
    H/Hkv query heads is passed as that head's H/Hkv queries, so the kernel reads every KV block once per KV
    head, not once per query head (flex_attention's own GQA support falls back to one block per query head
    when H/Hkv is not a power of two, as Qwen2.5-1.5B's 12/2). The mask must not depend on the query index."""
    B, H, _, hd = q.shape
    Hkv = k.shape[1]
    y = flex_attention(q.reshape(B, Hkv, H // Hkv, hd), k, v, block_mask=block_mask,
                       kernel_options=kernel_options)  # (B, Hkv, H/Hkv, hd)
    return y.reshape(B, H, 1, hd)


@functools.cache
def _compiled_flex_decode():
    # Compiled apart from the T x T uses (dynamo caches by code object: sharing one with prefill shapes would
    # make the query length dynamic), with static shapes: inductor uses its split-KV decoding kernel only for a
    # static batch, so each batch bucket of the sampler compiles once.
    return torch.compile(_flex_decode, dynamic=False)


# The fewest thread blocks per (row, KV head) of a decoding step's attention. Rows decoded together have
# ragged lengths (an evaluation's long tail), and the kernel gives each of a row's SPLIT_KV thread blocks an
# equal share of that row's blocks, so with few splits the longest row's share runs on alone after the others
# end. An H100, one layer, 256 rows at the long tail's in-flight lengths (mean 5,940, longest 32,581;
# bench/gpu.py --sections decode, 2026-11-27): 1,066 us with SPLIT_KV 2, 817 with 4, 718 with 8, 675 with 16.
MIN_SPLIT_KV = 16


def decode_split_kv(batch: int, kv_heads: int, sms: int, least: int = MIN_SPLIT_KV) -> int:
    """Thread blocks per (row, KV head) in a decoding step's attention: flex_attention's SPLIT_KV. Enough for
    about four per SM, since each streams its keys with little memory-level parallelism of its own (inductor's
    default, 2 * SMs // (batch * kv_heads), is 1 from batch 67 on with 2 KV heads on 132 SMs), and at least
    `least` (MIN_SPLIT_KV, for ragged rows; 1: the rule before it); at most 64."""
    return max(least, min(64, -(-4 * sms // max(1, batch * kv_heads))))


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_kernel_options(batch: int, kv_heads: int, sms: int, split: int | None = None) -> dict:
    """flex_attention's decoding-kernel options for a step of `batch` rows: SPLIT_KV (`split`, by default
    decode_split_kv) and, while the grid holds fewer than 6 thread blocks per SM, 4 warps and 3 pipeline
    stages instead of inductor's 2 and 1 on sm_90, so each thread block keeps more key loads in flight. Fitted
    to an H100's one-layer timings (bench/gpu.py --sections decode, 2026-11-26): 274 us against 347 at 64 x 8k
    context (4.8 thread blocks per SM), 851 against 812 at 256 x 8k (7.8 per SM, already at the copy
    bandwidth); on 2026-11-27, 193 us against 256 at 64 x 8k with SPLIT_KV 5, before MIN_SPLIT_KV (which puts
    15.5 thread blocks per SM there: not yet timed at uniform lengths)."""
    split = split or decode_split_kv(batch, kv_heads, sms)
    options: dict = {"SPLIT_KV": split}
    if batch * kv_heads * split < 6 * sms:
        options |= {"num_warps": 4, "num_stages": 3}
    return options


def _decode_attention(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask) -> Tensor:
    """_flex_decode compiled for CUDA, with decode_kernel_options."""
    options = decode_kernel_options(q.shape[0], k.shape[1], _sm_count(q.device))
    # One static compile per batch bucket: 9 for 256 slots, above dynamo's default limit of 8 compiles per
    # function, past which it would run the 9th bucket's attention uncompiled (the whole pool's scores).
    limit = max(64, torch._dynamo.config.recompile_limit)
    with torch._dynamo.config.patch(recompile_limit=limit):
        return _compiled_flex_decode()(q, k, v, block_mask, options)


# SDPA backends allowed on CUDA. cuDNN, which torch 2.11 picks first on Hopper, builds a graph for every new
# sequence length (287 ms per new length on an H200, bench/gpu.py's attention section), and training rows and
# prompts have ragged lengths; flash (GQA-capable, no per-shape setup) is chosen instead, and the
# memory-efficient and math kernels remain for what flash cannot run (fp32, masks).
_CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _sdpa(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)
    with sdpa_kernel(_CUDA_SDPA_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)


# -----------------------------------------------------------------------------
# Attention one document at a time (train.py --attention per-document)

# On CUDA each document is zero-padded to a multiple of this many tokens: cuDNN builds an execution graph for
# every new sequence length (382 ms each on an H100), so a run meets at most max_len / 128 lengths.
CUDNN_LENGTH_GRID = 128


def padded_length(length: int) -> int:
    """A document's length rounded up to CUDNN_LENGTH_GRID: the shape cuDNN sees for it."""
    return -(-length // CUDNN_LENGTH_GRID) * CUDNN_LENGTH_GRID


def _spans(bounds: Tensor, n_tokens: int) -> list[tuple[int, int, int]]:
    """(start, end, padded length) of each document of bounds (D+1,), which must tile the n_tokens."""
    edges = bounds.tolist()
    spans = [(s, e, padded_length(e - s)) for s, e in zip(edges[:-1], edges[1:])]
    if not spans or edges[0] != 0 or edges[-1] != n_tokens or any(e <= s for s, e, _ in spans):
        raise ValueError(f"document bounds must rise from 0 to the {n_tokens} tokens, got {edges}")
    return spans


def _padded(x: Tensor, s: int, e: int, n: int) -> Tensor:
    """Tokens s..e-1 of x (N, heads, hd) as one batch row (1, heads, n, hd), zeros after them."""
    return F.pad(x[s:e].transpose(0, 1), (0, 0, 0, n - (e - s)))[None]


def _causal_probs(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One document's causal attention in fp32, heads first: q (L, H, hd), k/v (L, Hkv, hd) -> q, k, v as
    (H, L, hd) (k and v repeated per query head), probabilities P (H, L, L) and logsumexp (H, L) of the
    scores S = q k^T / sqrt(hd)."""
    L, H, hd = q.shape
    qh = q.transpose(0, 1).float()
    kh, vh = (x.transpose(0, 1).float().repeat_interleave(H // k.shape[1], 0) for x in (k, v))
    scores = (qh @ kh.transpose(1, 2)) * hd**-0.5  # (H, L, L)
    scores = scores.masked_fill(~torch.ones(L, L, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    lse = scores.logsumexp(-1)  # (H, L)
    return qh, kh, vh, (scores - lse[..., None]).exp(), lse


def _causal_with_lse(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Causal attention of one document, the reference (and the CPU path): O = P V, output (L, H, hd) in q's
    dtype and logsumexp (H, L)."""
    _, _, vh, probs, lse = _causal_probs(q, k, v)
    return (probs @ vh).transpose(0, 1).to(q.dtype), lse


def _causal_grads(grad: Tensor, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The reference backward of one document (FlashAttention-2's equations): with dO the output gradient,
    dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O)), dQ = dS K / sqrt(hd), dK = dS^T Q / sqrt(hd);
    dK and dV summed over the query heads sharing each KV head."""
    L, H, hd = q.shape
    Hkv = k.shape[1]
    qh, kh, vh, probs, _ = _causal_probs(q, k, v)
    do = grad.transpose(0, 1).float()  # (H, L, hd)
    dp = do @ vh.transpose(1, 2)  # (H, L, L)
    ds = probs * (dp - (do * (probs @ vh)).sum(-1, keepdim=True))  # (H, L, L)
    per_kv = lambda x: x.view(Hkv, H // Hkv, L, hd).sum(1).transpose(0, 1)  # noqa: E731  (H, L, hd) -> (L, Hkv, hd)
    dq = (ds @ kh).transpose(0, 1) * hd**-0.5
    return dq.to(q.dtype), per_kv(ds.transpose(1, 2) @ qh * hd**-0.5).to(k.dtype), \
        per_kv(probs.transpose(1, 2) @ do).to(v.dtype)


@torch.library.custom_op("redi::doc_attention", mutates_args=())
def doc_attention(q: Tensor, k: Tensor, v: Tensor, bounds: Tensor) -> tuple[Tensor, Tensor]:
    """Causal attention within each packed document, one call per document: q (N, H, hd), k/v (N, Hkv, hd)
    token-major, bounds (D+1,) int64 on the host (document d is tokens bounds[d] .. bounds[d+1]-1) ->
    output (N, H, hd) and logsumexp (H, N) fp32 (kept for the backward).

    On CUDA each call is cuDNN's fused attention (GQA native) on the document zero-padded to
    CUDNN_LENGTH_GRID: causal, so a real query never sees the padding, and padding queries, whose output is
    dropped, send no gradient back. A custom op, so torch.compile treats it as one opaque call and the
    document loop, a host loop over lengths the host already knows, never syncs or recompiles."""
    out = torch.empty_like(q)
    lse = q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)
    for s, e, n in _spans(bounds, q.shape[0]):
        if q.is_cuda:
            out[s:e], lse[:, s:e] = _cudnn_document(q, k, v, s, e, n)
        else:
            out[s:e], lse[:, s:e] = _causal_with_lse(q[s:e], k[s:e], v[s:e])
    return out, lse


def _cudnn_document(q: Tensor, k: Tensor, v: Tensor, s: int, e: int, n: int) -> tuple[Tensor, Tensor]:
    """Document s..e-1 through cuDNN's fused attention, padded to n: output (e-s, H, hd), logsumexp (H, e-s)."""
    o, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        _padded(q, s, e, n), _padded(k, s, e, n), _padded(v, s, e, n), None, True, 0.0, True, False)[:2]
    return o[0, :, :e - s].transpose(0, 1), lse.reshape(q.shape[1], n)[:, :e - s]  # o (1, H, n, hd), lse (1, H, n, 1)


def _cudnn_document_grads(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, s: int, e: int,
                          n: int) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of document s..e-1 for q, k, v from cuDNN's backward, padded to n like its forward."""
    pad = lambda x: _padded(x, s, e, n)  # noqa: E731
    no_dropout = torch.zeros((), dtype=torch.long, device=q.device)  # philox seed and offset, unread
    grads = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        pad(grad), pad(q), pad(k), pad(v), pad(out), F.pad(lse[:, s:e], (0, n - (e - s)))[None, ..., None],
        no_dropout, no_dropout, None, None, None, n, n, 0.0, True)
    return tuple(g[0, :, :e - s].transpose(0, 1) for g in grads)


@doc_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, bounds: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty_like(q), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)


@torch.library.custom_op("redi::doc_attention_backward", mutates_args=())
def doc_attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                           bounds: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of doc_attention's output for q, k, v, document by document: cuDNN's backward from the saved
    output and logsumexp on CUDA (padding rows: zero output gradient and zero logsumexp, so they add nothing),
    the reference equations (_causal_grads) on CPU."""
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    for s, e, n in _spans(bounds, q.shape[0]):
        if q.is_cuda:
            dq[s:e], dk[s:e], dv[s:e] = _cudnn_document_grads(grad, q, k, v, out, lse, s, e, n)
        else:
            dq[s:e], dk[s:e], dv[s:e] = _causal_grads(grad[s:e], q[s:e], k[s:e], v[s:e])
    return dq, dk, dv


@doc_attention_backward.register_fake
def _(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
      bounds: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _doc_attention_setup(ctx, inputs, output) -> None:
    q, k, v, bounds = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bounds)


def _doc_attention_grad(ctx, grad: Tensor, grad_lse: Tensor | None):
    q, k, v, out, lse, bounds = ctx.saved_tensors
    return *doc_attention_backward(grad, q, k, v, out, lse, bounds), None


doc_attention.register_autograd(_doc_attention_grad, setup_context=_doc_attention_setup)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: AttnMask) -> Tensor:
    """Scaled dot-product attention with grouped-query heads. q (B, H, T, hd), k/v (B, Hkv, S, hd); with a
    BlockMask, k/v may also be (1, Hkv, S, hd), shared by every row (the sampler's paged KV pool)."""
    if mask.doc_bounds is not None:
        B, H, T, hd = q.shape
        tokens = lambda x: x.transpose(1, 2).reshape(B * T, x.shape[1], hd)  # noqa: E731  (B*T, heads, hd)
        y, _ = doc_attention(tokens(q), tokens(k), tokens(v), mask.doc_bounds)
        return y.view(B, T, H, hd).transpose(1, 2)
    if mask.block is not None:
        if q.shape[2] == 1 and k.shape[0] == 1:  # the sampler's paged decoding
            return (_decode_attention if q.is_cuda else _flex_decode)(q, k, v, mask.block)
        # inside a compiled block (train.py --compile) the block's own compile fuses it
        fn = _compiled_flex_attention() if q.is_cuda and not torch.compiler.is_compiling() else flex_attention
        return fn(q, k, v, block_mask=mask.block, enable_gqa=True)
    if mask.doc_index is not None:
        B, H, T, hd = q.shape
        docs = [x.transpose(0, 1).reshape(x.shape[1], B * T, hd)[:, mask.doc_index].transpose(0, 1)
                for x in (q, k, v)]  # (D, H or Hkv, L, hd)
        y = _sdpa(*docs, is_causal=True)  # (D, H, L, hd)
        # documents tile the rows in order, so their valid positions, document after document, are the tokens
        return y.transpose(0, 1)[:, mask.doc_valid].reshape(H, B, T, hd).transpose(0, 1)
    if mask.dense is None:
        return _sdpa(q, k, v, is_causal=True)
    return _sdpa(q, k, v, attn_mask=mask.dense)


def document_ids(position_ids: Tensor) -> Tensor:
    """Index of the packed document each token belongs to: a new one starts wherever the position does not
    continue the previous one (typically where it restarts at 0). (B, T) -> (B, T) int."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts.cumsum(dim=1)


def build_mask(position_ids: Tensor | None, attention_mask: Tensor | None, use_flex: bool) -> AttnMask:
    """Causal attention restricted to each token's own document (from position_ids) and to non-padding keys
    (from attention_mask, 1 = real token). Padding queries attend to themselves so no softmax row is empty."""
    docs = None
    if position_ids is not None:
        docs = document_ids(position_ids)
        if not bool((docs[:, -1] > 1).any()):  # one document per row: plain causal
            docs = None
    if docs is None and attention_mask is None:
        return AttnMask()
    B, T = (docs if docs is not None else attention_mask).shape
    if use_flex and attention_mask is None:
        def same_doc_causal(b, h, q_idx, kv_idx):
            return (docs[b, q_idx] == docs[b, kv_idx]) & (kv_idx <= q_idx)
        make = _compiled_create_block_mask() if docs.is_cuda else create_block_mask
        return AttnMask(block=make(same_doc_causal, B, None, T, T, device=docs.device))
    if attention_mask is None:
        flat = (docs + (docs[:, -1:].cumsum(0) - docs[:, -1:]))  # (B, T) document ids unique across rows
        starts = torch.nonzero(torch.diff(flat.flatten(), prepend=flat.new_zeros(1))).flatten()  # (D,)
        lengths = torch.diff(starts, append=starts.new_tensor([B * T]))  # (D,)
        j = torch.arange(int(lengths.max()), device=docs.device)  # (L,)
        valid = j < lengths[:, None]  # (D, L)
        index = starts[:, None] + torch.minimum(j, lengths[:, None] - 1)  # (D, L), padding repeats the last token
        return AttnMask(doc_index=index, doc_valid=valid)
    idx = torch.arange(T, device=(docs if docs is not None else attention_mask).device)
    dense = idx[None, :, None] >= idx[None, None, :]  # (1, T, T) causal
    if docs is not None:
        dense = dense & (docs[:, :, None] == docs[:, None, :])  # (B, T, T)
    if attention_mask is not None:
        dense = dense & attention_mask.bool()[:, None, :] | torch.eye(T, dtype=torch.bool, device=idx.device)
    return AttnMask(dense=dense[:, None])


# -----------------------------------------------------------------------------
# KV cache


class KVCache:
    """Pre-allocated keys and values for incremental decoding, one slot per batch row.

    A row's cache holds its positions 0 .. lengths[b]-1 at the same slot indices, so rows may be at different
    lengths (continuous batching) and a finished row is reused by setting its length back to 0.
    """

    def __init__(self, config: Qwen2Config, batch_size: int, max_len: int, *,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, Hkv, S, hd)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)
        self.max_len = max_len

    def slot(self, index: int) -> KVCache:
        """A one-row view sharing this cache's storage: prefill a new sequence into slot `index` of a running
        batch with `model(prompt[None], cache=cache.slot(index))`."""
        view = copy.copy(self)
        view.k, view.v = self.k[:, index:index + 1], self.v[:, index:index + 1]
        view.lengths = self.lengths[index:index + 1]
        return view

    def begin(self, position_ids: Tensor) -> AttnMask:
        """Start a forward writing `position_ids` (B, T): what its queries attend to. A prefill of empty rows
        attends causally over its own keys; otherwise each query sees the cached positions up to its own."""
        kv_len = int(position_ids.max()) + 1
        if kv_len > self.max_len:
            raise ValueError(f"KV cache overflow: position {kv_len - 1} >= cache length {self.max_len}")
        self._positions, self._kv_len = position_ids, kv_len
        if kv_len == position_ids.shape[1]:
            return AttnMask()
        slots = torch.arange(kv_len, device=position_ids.device)
        return AttnMask(dense=(slots <= position_ids[:, :, None])[:, None])  # (B, 1, T, kv_len)

    def advance(self, position_ids: Tensor) -> None:
        self.lengths.copy_(position_ids[:, -1] + 1)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write the new keys/values (B, Hkv, T, hd) at their positions; return the cache prefix to attend to."""
        rows = torch.arange(k.shape[0], device=k.device)[:, None]  # (B, 1)
        self.k[layer][rows, :, self._positions] = k.transpose(1, 2)  # index (B, T) -> values (B, T, Hkv, hd)
        self.v[layer][rows, :, self._positions] = v.transpose(1, 2)
        if self._kv_len == k.shape[2]:
            return k, v
        return self.k[layer][:, :, :self._kv_len], self.v[layer][:, :, :self._kv_len]


# -----------------------------------------------------------------------------
# Model


class Qwen2RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: Tensor) -> Tensor:
        # Normalize in fp32, cast back, then scale: the order of Hugging Face's Qwen2, so bf16 matches too.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * xf.to(x.dtype)


@functools.lru_cache(maxsize=16)
def _inv_freq(head_dim: int, theta: float, llama3: tuple[float, float, float, int] | None,
              device: torch.device) -> Tensor:
    # Computed on the CPU as Hugging Face does: a GPU pow may differ in the last bit, which position 32k amplifies.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))  # (hd/2,)
    if llama3 is not None:
        # Llama 3.1: wavelengths longer than the original context / low_freq_factor are stretched by `factor`,
        # shorter than original / high_freq_factor kept, and those between interpolated (transformers' order).
        factor, low, high, original = llama3
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < original / high) * ~(wavelen > original / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq.to(device)


def rope_cos_sin(position_ids: Tensor, head_dim: int, theta: float,
                 llama3: dict[str, float] | None = None) -> tuple[Tensor, Tensor]:
    """Rotary angles in fp32 for (B, T) positions -> cos, sin of shape (B, 1, T, head_dim). `llama3`: the
    config's rope_scaling, if any."""
    scaling = tuple(llama3[k] for k in LLAMA3_ROPE_KEYS) if llama3 is not None else None
    freqs = position_ids[..., None].float() * _inv_freq(head_dim, theta, scaling, position_ids.device)  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE (HF layout: first half of head_dim pairs with second half), computed in fp32."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class Qwen2Attention(nn.Module):
    def __init__(self, config: Qwen2Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, config.hidden_size,
                                bias=bias and config.model_type != "qwen2")  # Qwen2 biases q/k/v only
        self.qk_norm = config.qk_norm
        if self.qk_norm:  # Qwen3: RMSNorm over each head's dim, shared by all heads
            self.q_norm = Qwen2RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = Qwen2RMSNorm(self.head_dim, config.rms_norm_eps)

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor,
            fused: tuple[Tensor, Tensor | None] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values of x (B, T, hidden), RoPE applied: (B, H, T, hd), (B, Hkv, T, hd) x 2.
        fused: q_proj, k_proj and v_proj's weights (and biases) stacked (fused_qkv), for one matmul instead of
        three (a decoding step at small batches reads each small weight with a kernel of its own)."""
        B, T, _ = x.shape
        if fused is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            q, k, v = F.linear(x, *fused).split([self.n_head * self.head_dim] + [self.n_kv * self.head_dim] * 2, -1)
        q = q.view(B, T, self.n_head, self.head_dim)  # (B, T, H, hd)
        k = k.view(B, T, self.n_kv, self.head_dim)  # (B, T, Hkv, hd)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, hd), (B, Hkv, T, hd)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def fused_qkv(self) -> tuple[Tensor, Tensor | None]:
        """A copy of q_proj, k_proj and v_proj's weights ((H + 2 Hkv) hd, hidden) and biases stacked, for qkv."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        bias = torch.cat([m.bias for m in projections]) if self.q_proj.bias is not None else None
        return torch.cat([m.weight for m in projections]), bias


class Qwen2MLP(nn.Module):
    def __init__(self, config: Qwen2Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, config: Qwen2Config, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Qwen2Attention(config, layer_idx)
        self.mlp = Qwen2MLP(config)
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = Qwen2RMSNorm(config.hidden_size, config.rms_norm_eps)

    def attention_inputs(self, x: Tensor, cos: Tensor, sin: Tensor,
                         fused: tuple[Tensor, Tensor | None] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The block up to attention: q, k, v of the normed input x (B, T, hidden)."""
        return self.self_attn.qkv(self.input_layernorm(x), cos, sin, fused)

    def after_attention(self, x: Tensor, y: Tensor) -> Tensor:
        """The block after attention, from its input x (B, T, hidden) and attention's output y (B, H, T, hd)."""
        x = x + self.self_attn.o_proj(y.transpose(1, 2).flatten(2))
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: AttnMask, cache: KVCache | None = None) -> Tensor:
        fused = getattr(cache, "qkv_weights", None)  # a cache may hold each layer's fused_qkv
        q, k, v = self.attention_inputs(x, cos, sin, fused[self.self_attn.layer_idx] if fused else None)
        if cache is not None:
            k, v = cache.update(self.self_attn.layer_idx, k, v)  # what the mask indexes: (B or 1, Hkv, S, hd)
        return self.after_attention(x, attend(q, k, v, mask))


def write_rows(k_pool: Tensor, v_pool: Tensor, rows: Tensor, k: Tensor, v: Tensor) -> None:
    """Write keys and values k, v (B, Hkv, T, hd) into pools (Hkv, S, hd) at pool rows (B * T,), row-major."""
    Hkv, hd = k.shape[1], k.shape[3]
    k_pool.index_copy_(1, rows, k.transpose(0, 1).reshape(Hkv, -1, hd))
    v_pool.index_copy_(1, rows, v.transpose(0, 1).reshape(Hkv, -1, hd))


def _inputs_written(layer: Qwen2DecoderLayer, x: Tensor, cos: Tensor, sin: Tensor,
                    fused: tuple[Tensor, Tensor | None] | None, k_pool: Tensor, v_pool: Tensor,
                    rows: Tensor) -> Tensor:
    """A layer up to attention, its keys and values written to the pool: the queries."""
    q, k, v = layer.attention_inputs(x, cos, sin, fused)
    write_rows(k_pool, v_pool, rows, k, v)
    return q


def _between_attentions(layer: Qwen2DecoderLayer, following: Qwen2DecoderLayer, x: Tensor, y: Tensor, cos: Tensor,
                        sin: Tensor, fused: tuple[Tensor, Tensor | None] | None, k_pool: Tensor, v_pool: Tensor,
                        rows: Tensor) -> tuple[Tensor, Tensor]:
    """From one layer's attention output y to the next layer's queries, its keys and values written: the
    residual stream x and the queries."""
    x = layer.after_attention(x, y)
    return x, _inputs_written(following, x, cos, sin, fused, k_pool, v_pool, rows)


def _after_last_attention(layer: Qwen2DecoderLayer, norm: Qwen2RMSNorm, x: Tensor, y: Tensor) -> Tensor:
    return norm(layer.after_attention(x, y))


@functools.cache
def _compiled_regions():
    # A decoding step's elementwise work (fp32 RMSNorm and RoPE, biases, residuals, SwiGLU, the cache write)
    # is ~40 small kernels per layer uncompiled, and at small batches their launches, not the weight reads,
    # set the pace even inside a CUDA graph. Compiled from one attention to the next, each becomes a few
    # fused kernels around the matmuls: a layer's last residual add fuses with the next layer's RMSNorm, and
    # the cache write with RoPE. Attention itself has its own compiled kernel. The functions take the layers
    # as arguments, so all layers share one graph; the batch is dynamic.
    return tuple(torch.compile(f, dynamic=True) for f in (_inputs_written, _between_attentions, _after_last_attention))


def decode_layers(model: Qwen2Model, x: Tensor, cos: Tensor, sin: Tensor, mask: AttnMask, cache) -> Tensor:
    """The layers and final norm of a decoding forward, compiled between attentions (_compiled_regions), on a
    cache that hands out each layer's pools and write rows (`write_target`) and what attention reads after
    the write (`read`)."""
    first, between, last = _compiled_regions()
    layers, fused = model.layers, getattr(cache, "qkv_weights", None) or [None] * len(model.layers)
    q = first(layers[0], x, cos, sin, fused[0], *cache.write_target(0))
    for i, layer in enumerate(layers):
        y = attend(q, *cache.read(i), mask)
        if i + 1 < len(layers):
            x, q = between(layer, layers[i + 1], x, y, cos, sin, fused[i + 1], *cache.write_target(i + 1))
    return last(layers[-1], model.norm, x, y)


class Qwen2Model(nn.Module):
    def __init__(self, config: Qwen2Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Qwen2RMSNorm(config.hidden_size, config.rms_norm_eps)


class Qwen2ForCausalLM(nn.Module):
    def __init__(self, config: Qwen2Config) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the output head when the config says so (again after `to_empty`)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Hugging Face's initialization: N(0, initializer_range) matrices, zero biases, unit norms."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=generator)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.zero_()
            if isinstance(module, Qwen2RMSNorm):
                module.weight.fill_(1.0)
        if self.config.pad_token_id is not None:
            self.model.embed_tokens.weight[self.config.pad_token_id].zero_()

    def forward(self, input_ids: Tensor, *, position_ids: Tensor | None = None,
                attention_mask: Tensor | None = None, cache: KVCache | None = None,
                doc_lengths: Sequence[int] | None = None, return_hidden: bool = False) -> Tensor:
        """input_ids (B, T) -> logits (B, T, vocab), or final hidden states (B, T, hidden) with return_hidden.

        position_ids (B, T): positions restarting at 0 at each packed document; attention is causal within a
            document and blocked across documents. Default 0..T-1 (from attention_mask when given).
        attention_mask (B, T): 1 for real tokens, 0 for padding (left or right).
        cache: decode with a KV cache (KVCache, or any object with its begin/update/advance methods, like the
            sampler's paged cache); positions default to continuing each row's cached length. A cache whose
            `compiled_regions` is true has the layers run compiled between attentions (decode_layers).
        doc_lengths: the lengths of the documents packed in a single row, known on the host (with
            position_ids): attention then runs one document at a time (doc_attention, cuDNN on CUDA) instead
            of through a document mask.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if cache is not None:
            if attention_mask is not None:
                raise ValueError("attention_mask is not supported with a KV cache: give each row its own slot")
            if position_ids is None:
                position_ids = cache.lengths[:, None] + torch.arange(T, device=input_ids.device)
            mask = cache.begin(position_ids)
        else:
            packed = position_ids is not None
            if position_ids is None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0) if attention_mask is not None \
                    else torch.arange(T, device=input_ids.device)[None]
            position_ids = position_ids.expand(B, T)
            if doc_lengths is not None:
                if B != 1 or attention_mask is not None or sum(doc_lengths) != T or min(doc_lengths, default=0) < 1:
                    raise ValueError(f"doc_lengths must be the positive lengths of one row's documents, summing to "
                                     f"its {T} tokens, without attention_mask; got {B} rows and {list(doc_lengths)}")
                mask = AttnMask(doc_bounds=torch.tensor([0, *itertools.accumulate(doc_lengths)]))
            else:
                mask = build_mask(position_ids if packed else None, attention_mask, use_flex=input_ids.is_cuda)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, self.config.rope_scaling)

        x = self.model.embed_tokens(input_ids)  # (B, T, hidden)
        if getattr(cache, "compiled_regions", False):
            x = decode_layers(self.model, x, cos, sin, mask, cache)
        else:
            for layer in self.model.layers:
                x = layer(x, cos, sin, mask, cache)
            x = self.model.norm(x)
        if cache is not None:
            cache.advance(position_ids)
        return x if return_hidden else self.lm_head(x)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() counts a tied weight once


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def build_model(config: Qwen2Config, *, device: torch.device | str = "cpu",
                dtype: torch.dtype | str = torch.float32, seed: int | None = 0) -> Qwen2ForCausalLM:
    """A randomly initialized model (toy models, tests). seed=None leaves the weights uninitialized (fast,
    for a model that will be loaded into); device="meta" builds shapes only."""
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    model = model.to(dtype=_as_dtype(dtype))
    if torch.device(device).type == "meta":
        return model
    model.to_empty(device=device)
    model.tie_weights()  # to_empty replaces parameters one by one, which unties them
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
        model.init_weights(generator)
    return model


# -----------------------------------------------------------------------------
# Checkpoints in Hugging Face layout

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                    "generation_config.json")
_SINGLE_FILE, _INDEX_FILE = "model.safetensors", "model.safetensors.index.json"


def checkpoint_keys(model: Qwen2ForCausalLM) -> list[str]:
    """The keys a Hugging Face checkpoint of this model holds: a tied lm_head is stored only as the embedding."""
    keys = list(model.state_dict().keys())
    return [k for k in keys if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]


def _weight_map(path: Path) -> dict[str, Path]:
    """Map each tensor key of a checkpoint directory to the safetensors file holding it."""
    if (path / _SINGLE_FILE).exists():
        files = [path / _SINGLE_FILE]
    elif (path / _INDEX_FILE).exists():
        index_file = path / _INDEX_FILE
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index_file}: not a valid safetensors index ({e})") from None
        for name in sorted(set(weight_map.values())):
            if not (path / name).is_file():
                raise CheckpointError(f"{path / name}: shard listed in {_INDEX_FILE} is missing")
        files = [path / name for name in sorted(set(weight_map.values()))]
    else:
        raise CheckpointError(f"{path}: no {_SINGLE_FILE} or {_INDEX_FILE} (only safetensors are supported)")
    found: dict[str, Path] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                keys = list(f.keys())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: not a readable safetensors file (truncated or corrupt?): {e}") from None
        for key in keys:
            if key in found:
                raise CheckpointError(f"{file}: tensor {key} is also in {found[key]}")
            found[key] = file
    return found


def load_pretrained(path: str | os.PathLike, device: torch.device | str = "cpu",
                    dtype: torch.dtype | str = torch.float32) -> Qwen2ForCausalLM:
    """Load a Hugging Face Qwen2, Llama-3 or Qwen3 checkpoint directory (single file or sharded safetensors).

    The model is built on the meta device and each tensor is read from its (memory-mapped) file, cast and
    copied into place, so memory peaks at the model in `dtype` plus one tensor.
    """
    path = Path(path)
    config = Qwen2Config.from_pretrained(path)
    weight_map = _weight_map(path)
    model = build_model(config, device="meta", dtype=dtype)
    expected = checkpoint_keys(model)
    # Ignored if present: a tied head saved anyway, RoPE buffers some old exports contain.
    ignorable = {k for k in weight_map if k.endswith("rotary_emb.inv_freq")
                 or (k == "lm_head.weight" and config.tie_word_embeddings)}
    missing = [k for k in expected if k not in weight_map]
    unexpected = sorted(set(weight_map) - set(expected) - ignorable)
    if missing or unexpected:
        raise CheckpointError(f"{path}: checkpoint does not match config.json: missing keys {missing[:5]}"
                              f"{' ...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                              f"{' ...' if len(unexpected) > 5 else ''}")

    model.to_empty(device=device)
    model.tie_weights()
    params = model.state_dict(keep_vars=True)
    by_file: dict[Path, list[str]] = {}
    for key in expected:
        by_file.setdefault(weight_map[key], []).append(key)
    with torch.no_grad():
        for file, keys in by_file.items():
            with safe_open(file, framework="pt", device="cpu") as f:
                for key in keys:
                    shape = list(f.get_slice(key).get_shape())
                    if shape != list(params[key].shape):
                        raise CheckpointError(f"{file}: {key} has shape {shape}, config.json implies "
                                              f"{list(params[key].shape)}")
                    tensor = f.get_tensor(key)
                    if not tensor.is_floating_point():
                        raise CheckpointError(f"{file}: {key} has non-float dtype {tensor.dtype}")
                    if not bool(torch.isfinite(tensor).all()):
                        raise CheckpointError(f"{file}: {key} contains NaN or inf")
                    params[key].copy_(tensor)
    model.source_dir = path  # save_pretrained copies the tokenizer files from here
    return model


def save_pretrained(model: Qwen2ForCausalLM, path: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
                    max_shard_bytes: int = 5 * 2**30, tokenizer_from: str | os.PathLike | None = None) -> None:
    """Write `model` as a Hugging Face checkpoint directory (see `save_state_dict`)."""
    state = model.state_dict()
    state = {k: state[k] for k in checkpoint_keys(model)}
    source = tokenizer_from if tokenizer_from is not None else getattr(model, "source_dir", None)
    save_state_dict(state, model.config, path, dtype=dtype, max_shard_bytes=max_shard_bytes, tokenizer_from=source)


def save_state_dict(state: dict[str, Tensor], config: Qwen2Config, path: str | os.PathLike, *,
                    dtype: torch.dtype | str | None = None, max_shard_bytes: int = 5 * 2**30,
                    tokenizer_from: str | os.PathLike | None = None) -> None:
    """Write a full state dict in Hugging Face layout: config.json, safetensors (sharded with an index past
    `max_shard_bytes`), and the tokenizer files of `tokenizer_from` when it has them.

    Tensors are stored in `dtype` (default: the config's torch_dtype). The directory is assembled next to
    `path` and renamed into place, so a crash never leaves a partial checkpoint at `path`.
    """
    path = Path(path)
    check_replaceable(path, "config.json")
    dtype = _as_dtype(dtype if dtype is not None else config.torch_dtype)
    config = dataclasses.replace(config, torch_dtype=str(dtype).removeprefix("torch."))
    if config.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}

    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * dtype.itemsize
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(key)
        shard_bytes += nbytes

    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    umask = os.umask(0)
    os.umask(umask)
    try:
        names = [_SINGLE_FILE] if len(shards) == 1 else \
            [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for name, keys in zip(names, shards):
            tensors = {k: state[k].detach().to(device="cpu", dtype=dtype).contiguous() for k in keys}
            save_file(tensors, tmp / name, metadata={"format": "pt"})
            os.chmod(tmp / name, 0o666 & ~umask)  # safetensors writes 0600; others (e.g. a server) must read it
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(state[k].numel() * dtype.itemsize for k in state)},
                     "weight_map": {k: name for name, keys in zip(names, shards) for k in keys}}
            (tmp / _INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        if tokenizer_from is not None:
            for name in _TOKENIZER_FILES:
                if (Path(tokenizer_from) / name).is_file():
                    shutil.copyfile(Path(tokenizer_from) / name, tmp / name)
            _add_chat_template(tmp, config.model_type)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    replace_dir(tmp, path)


def _add_chat_template(path: Path, model_type: str) -> None:
    """Give a checkpoint whose tokenizer came without a chat template our family's (data.tokenizer_config), so
    that transformers, vLLM and lighteval prompt it as we trained it. A template of its own is left alone."""
    import data  # data.py imports this module: import it only when it is needed

    config_file = path / "tokenizer_config.json"
    if model_type not in data.CHAT_TOKENS or not (path / "tokenizer.json").is_file() \
            or (path / "chat_template.jinja").is_file():
        return
    own = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if "chat_template" not in own:
        config_file.write_text(json.dumps(data.tokenizer_config(model_type) | own, indent=2) + "\n")


def check_replaceable(path: str | os.PathLike, marker: str, hint: str = "choose another path") -> None:
    """The one rule of every tool that writes a directory: write only into one that is absent, empty, or holds
    `marker` (a file the tool itself leaves there), so nothing a user put there is ever overwritten. `hint`
    says what to do instead (which flag to use)."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / marker).exists())):
        raise CheckpointError(f"{path}: exists and is not a directory we wrote (no {marker}); refusing to "
                              f"write into it: {hint}")


def claim_dir(path: str | os.PathLike, marker: str, note: str) -> None:
    """Create `path` (after check_replaceable) and mark it as ours with `marker`, before writing anything else,
    so that a rerun recognizes it, even after a crash."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if not (path / marker).exists():
        (path / marker).write_text(note + "\n")


def replace_dir(tmp: Path, path: Path) -> None:
    """Move a finished directory into place. The old one is renamed aside and removed only once the new one is
    there, so `path` never holds a partial write (a crash between the two renames leaves the old copy aside)."""
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    """`python model.py init --config <dir> --out <dir>`: a randomly initialized checkpoint from a config.json
    (a toy model, or a from-scratch run); tokenizer files next to the config are copied along."""
    import argparse
    import sys

    p = argparse.ArgumentParser(description="Qwen2, Llama-3 and Qwen3 checkpoints")
    sub = p.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="write a randomly initialized checkpoint for a config.json")
    init.add_argument("--config", required=True, help="directory holding config.json (and tokenizer files)")
    init.add_argument("--out", required=True, help="checkpoint directory to write")
    init.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        config = Qwen2Config.from_pretrained(args.config)
        save_pretrained(build_model(config, seed=args.seed), args.out, tokenizer_from=args.config)
    except (ConfigError, CheckpointError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote a randomly initialized {config.num_hidden_layers}-layer model to {args.out}")


if __name__ == "__main__":
    main()
