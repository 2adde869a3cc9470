"""A Llama-style decoder written from scratch, with the two hooks SpecAttn needs.

This file is the base the rest of specattn stands on, and it works copied alone
(torch, safetensors and tiktoken only):

* `ModelArgs`   - one config dataclass, built from a Hugging Face `config.json`.
* `Transformer` - RMSNorm, RoPE (Hugging Face half-split layout, so HF weights load
                  as they are), grouped-query attention, SwiGLU MLP, tied or untied head;
                  q|k|v and gate|up each one matrix (a decode step reads each weight once);
                  its matmuls are `Linear`s, which on a CPU write a decode step's few-row
                  products in whichever of two forms this CPU's BLAS runs faster. Each
                  residual add is made by the norm and matmul that read it (`norm_linear`),
                  so that a fused kernel can do all three in one launch (`use_decode_linear`).
* `KVCache`     - fixed K/V buffers per layer plus each batch row's length (a device
                  tensor), with explicit `rewind` / `rewind_rows` for speculative decoding
                  (and `place_sink` for a model with `sink_distance`, such as the demo draft).
* `load_model`  - reads an HF-layout directory (single or sharded safetensors) and
                  checks every tensor; `layers=` keeps a subset of decoder layers;
                  `hf_state_dict` gives the tensors back under their HF names.
* `Tokenizer`   - tiktoken over a Llama-3 `tokenizer.model` or a byte-level BPE
                  `tokenizer.json` (GPT-2 / SmolLM2 / Qwen2 style).

The two SpecAttn hooks live in `Transformer.forward`:

1. `return_attn=True` returns, per layer, the attention probabilities of the new
   queries over every key. The draft model uses this: its attention says which
   past tokens matter.
2. `select=fn` lets a caller choose, per layer, which *cached* positions each KV
   head may read (see SelectFn; or a dict of fixed selections per layer). The target
   model uses this for sparse verification. The new block always attends to itself
   causally. `specattn.py` builds the selections from the draft's attention;
   `eval_pg19.py` builds a hook for every method it compares.

The attention itself sits in one slot, `Transformer.attend` (see AttentionFn). The
default, `cache_attention`, is plain PyTorch for caches whose rows hold the same number
of positions (evaluation, calibration, prefill). Generation puts `kernels.attention_slot`
there: per-row cache lengths read on the device and the Triton kernels (their PyTorch
references on a CPU). `Attention.forward` applies RoPE and writes the new block's keys
and values into the cache (`KVCache.write`) before attending, unless the slot does both
in its own launch (`kernels.attention_slot` does).
"""

from __future__ import annotations

import base64
import json
import math
import os
import platform
import shutil
import struct
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------------------
# Config


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int = 128
    hidden_dim: int = 14336  # SwiGLU inner width ("intermediate_size")
    vocab_size: int = 128256
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: Optional[dict] = None  # {"rope_type": "llama3", "factor": ..., ...} or None
    max_seq_len: int = 8192
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2; Llama's attention_bias)
    output_bias: bool = False  # the attention's output projection too (Llama's attention_bias; not Qwen2)
    mlp_bias: bool = False  # gate/up/down projections carry a bias (Llama's mlp_bias)
    # Mistral-style sliding-window attention: max_seq_len is capped at the window, the
    # longest context at which it equals the full causal attention this model computes.
    sliding_window: Optional[int] = None
    # Which original decoder layers this model holds (None: all). Set by load_model(layers=...).
    layer_ids: Optional[list] = field(default=None)
    # The attention sink at a fixed distance (0: off, as every ordinary checkpoint runs). A
    # model trained on short windows has seen its first position, where attention collects
    # (the "attention sink"), at most a window back; RoPE makes a score depend on the
    # query-key distance, so 8k tokens into a text the sink is farther back than the model
    # ever saw it. With sink_distance = d, every forward past position 0 reads position 0's
    # key rotated as if it sat d positions before the forward's first token
    # (KVCache.place_sink), or at its own position if that is nearer. Drafts saved by
    # train_draft.py set it to their training window (see calibrate.load_draft).
    sink_distance: int = 0

    SUPPORTED_TYPES = ("llama", "qwen2", "mistral")

    def max_positions_text(self) -> str:
        """"max positions N", and why N when a sliding window sets it (for error messages)."""
        window = (", the checkpoint's sliding window: attention past it is not implemented"
                  if self.sliding_window else "")
        return f"max positions {self.max_seq_len}{window}"

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        """Build from a Hugging Face config.json dict (transformers 4.x or 5.x layout)."""
        model_type = cfg.get("model_type")
        if model_type not in cls.SUPPORTED_TYPES:
            raise ValueError(f"config.json field 'model_type'={model_type!r} is not supported; "
                             f"expected one of {cls.SUPPORTED_TYPES} (a Llama-style decoder)")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json field 'hidden_act'={cfg['hidden_act']!r} is not supported "
                             f"(only 'silu')")
        # Mistral applies its window whenever "sliding_window" is set; Qwen2 only with use_sliding_window.
        windowed = model_type == "mistral" or cfg.get("use_sliding_window")
        window = cfg.get("sliding_window") if windowed else None
        # transformers 5 nests theta and scaling in "rope_parameters"; 4.x has "rope_theta" + "rope_scaling".
        rope = dict(cfg.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = rope or cfg.get("rope_scaling") or None
        if scaling is not None:
            rope_type = scaling.get("rope_type", scaling.get("type", "default"))
            if rope_type == "default":
                scaling = None
            elif rope_type != "llama3":
                raise ValueError(f"config.json field 'rope_scaling' has type {rope_type!r}; only 'llama3' is "
                                 f"supported")
            else:
                scaling = {"rope_type": "llama3", **{k: scaling[k] for k in (
                    "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}}
        try:
            n_heads = cfg["num_attention_heads"]
            max_positions = cfg.get("max_position_embeddings", 2048)
            return cls(
                dim=cfg["hidden_size"],
                n_layers=cfg["num_hidden_layers"],
                n_heads=n_heads,
                n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
                head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
                hidden_dim=cfg["intermediate_size"],
                vocab_size=cfg["vocab_size"],
                norm_eps=cfg.get("rms_norm_eps", 1e-6),
                rope_theta=float(theta),
                rope_scaling=scaling,
                max_seq_len=min(max_positions, window) if window else max_positions,
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                # Qwen2 always has q/k/v biases (never on o_proj) and does not write the field;
                # Llama's attention_bias puts one on q, k, v and o_proj.
                attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
                output_bias=bool(cfg.get("attention_bias", False)) and model_type != "qwen2",
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                sliding_window=window if window and window < max_positions else None,
            )
        except KeyError as e:
            raise ValueError(f"config.json lacks the required field {e.args[0]!r}") from None


# ----------------------------------------------------------------------------------------
# Rotary position embedding


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies [head_dim/2], with Llama-3.1 long-context scaling when configured."""
    exponents = torch.arange(0, args.head_dim, 2, dtype=torch.float64) / args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** exponents)
    s = args.rope_scaling
    if s is None:
        return inv_freq.float()
    # Llama 3.1: long wavelengths (low frequencies) are slowed by `factor`, short ones kept,
    # and the band between is interpolated smoothly.
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = old_len / s["low_freq_factor"]
    high_freq_wavelen = old_len / s["high_freq_factor"]
    smooth = (old_len / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    interpolated = (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s["factor"], interpolated)
    return torch.where(wavelen < high_freq_wavelen, inv_freq, scaled).float()


def rope_cos_sin(args: ModelArgs, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_seq_len, head_dim], in the HF half-split layout (freqs repeated twice)."""
    inv_freq = rope_frequencies(args).to(device)
    angles = torch.outer(torch.arange(args.max_seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # [S, D]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., T, D] rotated by the angles of its positions, cos and sin [T, D]; or x
    [..., T, H, D] with cos and sin [T, 1, D]."""
    # HF layout: the head vector is split into halves (x1, x2), and the pair (x1[i], x2[i])
    # is rotated by angle i. Meta's checkpoints interleave the pairs instead; HF's converter
    # permuted q/k rows once, so HF weights need this layout and no permutation here.
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).type_as(x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()  # the mean square in fp32, as the HF reference does
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """A residual add and the RMSNorm that reads its result: (h + delta, rms_norm(h + delta)).
    Together so that compile_pointwise() makes them one kernel with two outputs."""
    h = h + delta
    return h, rms_norm(h, weight, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def placed_sink(sink_k: torch.Tensor, lengths: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                distance: int) -> torch.Tensor:
    """sink_k [L, B, Hkv, D] (position 0's keys, unrotated) rotated to sit `distance`
    positions before each row's next token, lengths[b] (at 0 if the row is shorter); cos
    and sin: the RoPE tables [max_seq_len, D]. See ModelArgs.sink_distance."""
    at = (lengths.long() - distance).clamp(min=0)  # [B]
    return apply_rope(sink_k, cos[at][None, :, None], sin[at][None, :, None])


def place_sink(k: torch.Tensor, sink_k: torch.Tensor, lengths: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               distance: int) -> None:
    """placed_sink written into position 0 of every layer's and row's keys, k [L, B, Hkv, S, D].
    In place, so that compiled it is one kernel that rotates and stores (assigning a returned
    tensor to the strided slice would add a copy)."""
    k[:, :, :, 0] = placed_sink(sink_k, lengths, cos, sin, distance)


class Pointwise:
    """The pointwise work between the matmuls, looked up here at call time so that
    `compile_pointwise()` can swap in fused versions of the same functions."""
    rope = staticmethod(apply_rope)
    rms_norm = staticmethod(rms_norm)
    add_rms_norm = staticmethod(add_rms_norm)
    swiglu = staticmethod(swiglu)
    place_sink = staticmethod(place_sink)
    # A decode step's matmul with the add, norm or SwiGLU before it in one launch, and where it
    # beats the separate kernels (see use_decode_linear); None: separate kernels everywhere.
    decode_linear: Optional[Callable] = None
    decode_linear_suits: Optional[Callable[[torch.Tensor, torch.Tensor], bool]] = None


def compile_pointwise(enable: bool = True) -> None:
    """Fuse each pointwise function into one kernel with torch.compile (every model in this
    process; enable=False puts the eager ones back). In eager PyTorch, RMSNorm is ~6 kernel
    launches, RoPE ~8 per tensor, SwiGLU 2: in a decode step, where each moves a few KB,
    ~30 launches per layer cost more time than their bytes. Matmuls, attention (kernels.attention_slot
    also applies RoPE and writes the block to the cache) and the `select` hook stay as they are.
    On Hopper and newer GPUs the kernels use programmatic dependent launch: each may start
    while the kernel before it finishes, and waits for it only before reading its output."""
    import torch._inductor.config as inductor_config
    options = {"triton.enable_pdl": True} if hasattr(inductor_config.triton, "enable_pdl") else {}
    for name, fn in (("rope", apply_rope), ("rms_norm", rms_norm), ("add_rms_norm", add_rms_norm),
                     ("swiglu", swiglu), ("place_sink", place_sink)):
        setattr(Pointwise, name, staticmethod(torch.compile(fn, options=options) if enable else fn))


def use_decode_linear(kernel: Optional[Callable] = None, suits: Optional[Callable] = None) -> None:
    """Plug in a kernel that runs a matmul with the pointwise work before it in one launch
    (kernels.decode_linear, with the signature of kernels.decode_linear_reference), for the
    (input, weight) pairs suits() accepts (kernels.decode_linear_suits: a decode step's few
    rows on a GPU); every model in this process uses it. No kernel: separate kernels again."""
    Pointwise.decode_linear = staticmethod(kernel) if kernel else None
    Pointwise.decode_linear_suits = staticmethod(suits) if kernel else None


def _decode_linear_takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return Pointwise.decode_linear is not None and Pointwise.decode_linear_suits(x, weight)


def norm_linear(h: torch.Tensor, delta: Optional[torch.Tensor], norm: "RMSNorm", linear: "Linear"):
    """A residual add, the norm that reads its result and the matmul that reads the norm:
    (h + delta, linear(norm(h + delta))), or (h, linear(norm(h))) with delta None. One launch
    where a decode_linear kernel is plugged in and suits the shapes, else the norm (with the
    add: one kernel under compile_pointwise) and the matmul."""
    if _decode_linear_takes(h, linear.weight):
        got = Pointwise.decode_linear(h, linear.weight, linear.bias, delta, norm.weight, norm.eps)
        return (h, got) if delta is None else got
    h, x = (h, norm(h)) if delta is None else norm.add_and_norm(h, delta)
    return h, linear(x)


# ----------------------------------------------------------------------------------------
# KV cache


def block_positions(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """[B, T] (long): the positions of a T-token block in each row, lengths[b] + t."""
    return lengths[:, None].long() + torch.arange(T, device=lengths.device)


class KVCache:
    """Fixed K/V buffers for every layer, and how many positions each batch row holds.

    `lengths` (int32 [B], on the cache's device) is where each row's next token goes:
    forwarding T tokens writes row b's keys/values at [lengths[b], lengths[b] + T) and
    advances every row by T, all on the device, so a captured CUDA graph can replay the
    step as the rows grow. `length` is the host's bound on the rows (their common length
    while `uniform`, as in evaluation, where every row is fed the same number of tokens).
    Nothing is ever implicitly overwritten or dropped: speculative decoding calls
    `rewind(n)` (every row) or `rewind_rows(n)` (a count per row) to forget the newest
    positions (rejected draft tokens), and the next forward writes over them.
    """

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        if max_len > args.max_seq_len:
            raise ValueError(f"cache length {max_len} exceeds the model's {args.max_positions_text()}")
        shape = (args.n_layers, batch_size, args.n_kv_heads, max_len, args.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # [L, B, Hkv, S_max, D]
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch_size, device=device, dtype=torch.int32)  # [B]
        self.length = 0  # host: >= every row's length, equal to it while uniform
        self.uniform = True
        # With args.sink_distance: position 0's key as the forward that started the row wrote
        # it (unrotated: RoPE at position 0 is the identity), which place_sink rotates.
        self.sink_k = (torch.zeros(shape[:3] + shape[4:], device=device, dtype=dtype)  # [L, B, Hkv, D]
                       if args.sink_distance else None)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def advance(self, n: int) -> None:
        """Every row grew by n positions (the forward calls this after writing them)."""
        self.lengths += n
        self.length += n

    def rewind(self, n: int) -> None:
        """Forget the n most recent positions of every row (their slots are simply reused)."""
        if not 0 <= n <= self.length or not self.uniform:
            raise ValueError(f"cannot rewind {n} positions from a cache of length {self.length}"
                             f"{'' if self.uniform else ' whose rows differ (use rewind_rows)'}")
        self.advance(-n)

    def rewind_rows(self, n: torch.Tensor) -> None:
        """Forget n[b] (int [B], on the device) positions of row b; the host bound stays."""
        self.lengths -= n.to(torch.int32)
        self.uniform = False

    def set_lengths(self, lengths) -> None:
        """Row b now holds lengths[b] positions (a list of ints: the host learns them)."""
        self.lengths.copy_(torch.as_tensor(lengths, dtype=torch.int32))
        self.length, self.uniform = max(lengths), len(set(lengths)) == 1

    def keep_sink(self) -> None:
        """Remember position 0's key of every row (Transformer.forward calls this after a
        forward that started at position 0: a row must start with a uniform forward, as
        every prefill is)."""
        self.sink_k.copy_(self.k[:, :, :, 0])

    def place_sink(self, cos: torch.Tensor, sin: torch.Tensor, distance: int) -> None:
        """Rewrite position 0's key of every row as if it sat `distance` positions before the
        row's next token (or at 0, if the row is shorter): a query t tokens into the next
        block then scores it as `distance` + t positions back, whatever the row's length.
        cos, sin: the model's RoPE tables [max_seq_len, D]. Values are left as they are."""
        Pointwise.place_sink(self.k, self.sink_k, self.lengths, cos, sin, distance)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Put a block's keys and values k, v [B, Hkv, T, D] of `layer` at positions
        [lengths[b], lengths[b] + T) of row b (the forward advances the lengths once, after
        every layer has written)."""
        B, Hkv, T, D = k.shape
        index = block_positions(self.lengths, T)[:, None, :, None].expand(B, Hkv, T, D)
        self.k[layer].scatter_(2, index, k.to(self.k.dtype))
        self.v[layer].scatter_(2, index, v.to(self.v.dtype))

    def rows(self, start: int, stop: int) -> "KVCache":
        """Rows [start, stop) of this cache as a cache of their own (views: writes land here)."""
        part = KVCache.__new__(KVCache)
        part.k, part.v, part.lengths = self.k[:, start:stop], self.v[:, start:stop], self.lengths[start:stop]
        part.sink_k = None if self.sink_k is None else self.sink_k[:, start:stop]
        part.length, part.uniform = self.length, self.uniform
        return part

    def reset(self) -> None:
        """Empty every row (the buffers are kept and overwritten)."""
        self.lengths.zero_()
        self.length, self.uniform = 0, True


# ----------------------------------------------------------------------------------------
# Attention


def subset_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_len: int,
                     keep: Optional[torch.Tensor] = None, return_probs: bool = False):
    """Attention of T new queries over `past_len` cached keys plus their own block.

    q: [B, Hq, T, D]; k, v: [B, Hkv, past_len + T, D], Hq a multiple of Hkv (GQA: query
    head h reads KV head h // (Hq // Hkv)). keep: bool [B, Hkv, T or 1, past_len], which
    cached positions each KV head may read (None: all). The block's own keys are always
    read causally. Returns (out [B, Hq, T, D], probs [B, Hq, T, past_len + T] or None).
    """
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    # allowed[b, h, t, s]: may query t read key s? Past keys by `keep`, the block causally.
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    if keep is None:
        past = torch.ones(T, past_len, dtype=torch.bool, device=q.device)
        allowed = torch.cat([past, causal], -1)[None, None]
    else:
        allowed = torch.cat([keep.expand(B, Hkv, T, past_len), causal.expand(B, Hkv, T, T)], dim=-1)
        # [B, Hq, T, S]: query head h reads KV head h // group
        allowed = allowed.repeat_interleave(group, dim=1)
    if not return_probs:
        # enable_gqa lets SDPA map query heads to KV heads without copying K and V.
        if keep is None and past_len == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), None
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True), None
    # Explicit softmax, with the query heads of a group batched against their one KV head.
    # The matmuls run in the cache's dtype (fp32 accumulation) so K and V are never copied
    # to fp32; the softmax and the returned probabilities are fp32.
    S = k.shape[2]
    qg = q.reshape(B, Hkv, group * T, D)  # a group's G query heads x T tokens as rows
    scores = (qg @ k.transpose(-1, -2)).float().view(B, Hq, T, S) / math.sqrt(D)  # [B, Hq, T, S]
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    out = probs.view(B, Hkv, group * T, S).to(v.dtype) @ v  # [B, Hkv, G*T, D]
    return out.view(B, Hq, T, D), probs


def cache_attention(q, k_new, v_new, k_cache, v_cache, lengths, start, keep=None, return_probs=False):
    """The model's default attention slot, in PyTorch, for caches whose rows all hold
    `start` positions before this block (evaluation, calibration, prefill): the block is
    already in the cache (Attention.forward wrote it), so this is `subset_attention` over
    the first start + T positions. `kernels.attention_slot` fills the same slot with
    per-row lengths read on the device (generation)."""
    if start is None:
        raise ValueError("the PyTorch attention slot needs every cache row at the same length; "
                         "generation with ragged rows uses kernels.attention_slot")
    end = start + q.shape[2]
    return subset_attention(q, k_cache[:, :, :end], v_cache[:, :, :end], start, keep, return_probs)


# A `select` hook: (layer index, q [B, Hq, T, D], cached keys [B, Hkv, past_len, D], or the
# whole buffer when rows differ) -> what that layer's attention slot reads: for
# cache_attention a bool [B, Hkv, T or 1, past_len] of cached positions; for
# kernels.attention_slot a compacted (idx int32 [B, Hkv or 1, L], count int32 [B, Hkv or 1]);
# None for dense. q is after RoPE. A dict {layer: Selection} instead of a hook gives fixed
# selections (layers not in it read everything) and never needs q.
Selection = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]
SelectFn = Callable[[int, torch.Tensor, torch.Tensor], Optional[Selection]]
# An attention slot: (q, k_new, v_new, k_cache, v_cache, lengths, start, keep, return_probs)
# -> (out [B, Hq, T, D], probs or None); see cache_attention and kernels.attention_slot. A
# slot with `rotates_and_writes = True` gets q and k_new before RoPE and rope=(cos, sin), the
# tables of every position [max_seq_len, D] (row b's token t is at lengths[b] + t), and writes
# the block into the cache itself.
AttentionFn = Callable[..., tuple[torch.Tensor, Optional[torch.Tensor]]]


class Linear(nn.Linear):
    """nn.Linear, with the few-row products of a decode step written for the CPU at hand.

    A decode step multiplies a few rows by each weight: it is bound by reading the weights,
    so a product should stream its weight at the memory's speed whatever the rows. How fast
    a CPU's BLAS does that for so few rows depends on the machine: on 2 AMD EPYC cores MKL
    computes x · Wᵀ for one row as a matrix-vector product on one thread, and for 2-4 rows
    up to 4x slower than the same product written (W · xᵀ)ᵀ; on a 16-core host F.linear was
    the faster form (`python bench.py --parts cpu` times both on the demo pair). So products
    of at most FEW_ROWS rows take the form `cpu_few_rows_form` chose for this machine (timed
    once, remembered); larger products, and every product on a GPU, are F.linear's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _decode_linear_takes(x, self.weight):  # a GPU decode step's few rows: one launch, no cuBLAS
            return Pointwise.decode_linear(x, self.weight, self.bias)
        rows = x.numel() // x.shape[-1] if x.device.type == "cpu" else 0
        if not 0 < rows <= FEW_ROWS or not cpu_few_rows_form():  # a GPU, no rows, many rows
            return F.linear(x, self.weight, self.bias)
        y = few_rows_product(x.reshape(rows, -1), self.weight)  # [rows, out]
        y = y + self.bias if self.bias is not None else y
        return y.reshape(*x.shape[:-1], -1)


def few_rows_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [rows, in] · weightᵀ -> [rows, out], written (W · xᵀ)ᵀ with x contiguous (BLAS reads
    xᵀ as a view) and one row padded to two (a matrix-matrix product, not a matrix-vector one)."""
    rows = x.shape[0]
    x = x.expand(2, -1).contiguous() if rows == 1 else x.contiguous()
    return (weight @ x.T).T[:rows].contiguous()


FEW_ROWS = 8  # the most rows Linear may multiply as (W · xᵀ)ᵀ on a CPU
CPU_FEW_ROWS_FORM: Optional[bool] = None  # True/False: chosen (or set by hand); None: not yet


def cpu_few_rows_form() -> bool:
    """Whether this process's CPU products of a few rows use (W · xᵀ)ᵀ. The two forms round
    differently, so the choice is made once per machine and remembered, and every process
    on it (the ranks of a torchrun, a rerun of an evaluation) computes the same numbers:
    $SPECATTN_CPU_FEW_ROWS (1 or 0) if set; else the answer stored in
    $SPECATTN_CACHE/cpu_few_rows.json (default ~/.cache/specattn) for this CPU and torch;
    else a measurement, stored there (under a file lock, so processes starting together
    measure once): both forms timed on a 2-row product with a 50 MB weight (larger
    than most CPUs' caches), the median of 3 runs each, the few-row form kept only if 1.3x
    faster, so a machine where the two are close keeps F.linear."""
    global CPU_FEW_ROWS_FORM
    if CPU_FEW_ROWS_FORM is None:
        forced = os.environ.get("SPECATTN_CPU_FEW_ROWS")
        if forced is not None:
            if forced not in ("0", "1"):
                raise ValueError(f"SPECATTN_CPU_FEW_ROWS must be 1 or 0, got {forced!r}")
            CPU_FEW_ROWS_FORM = forced == "1"
        else:
            CPU_FEW_ROWS_FORM = _remembered(Path(os.environ.get("SPECATTN_CACHE", "~/.cache/specattn")).expanduser()
                                            / "cpu_few_rows.json", _cpu_key(), _time_few_rows_form)
    return CPU_FEW_ROWS_FORM


def _time_few_rows_form() -> bool:
    """The measurement of cpu_few_rows_form: True if (W · xᵀ)ᵀ is 1.3x faster than F.linear."""
    weight, x = torch.randn(12288, 1024), torch.randn(2, 1024)  # [out, in], [rows, in]
    forms = {False: lambda: F.linear(x, weight), True: lambda: few_rows_product(x, weight)}
    seconds = {}
    for form, fn in forms.items():
        fn()
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t0)
        seconds[form] = sorted(runs)[1]
    return seconds[True] * 1.3 < seconds[False]


def _cpu_key() -> str:
    """This machine's CPU model and torch version (not the thread count: a torchrun rank runs
    one thread, and must compute what a one-process run computes)."""
    model_name = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model_name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return f"{model_name or platform.processor() or platform.machine()}, torch {torch.__version__}"


def _remembered(path: Path, key: str, measure: Callable[[], bool]) -> bool:
    """path's answer for key, or measure()'s, then stored there. A file lock keeps processes
    that start together from measuring at once (where fcntl exists); an unwritable cache
    only means this process's answer is not kept."""
    def read() -> Optional[bool]:
        try:
            return json.loads(path.read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            return None
    if (known := read()) is not None:
        return known
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_name(path.name + ".lock"), "w")
    except OSError:
        return measure()
    with lock:
        try:
            import fcntl
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        except ImportError:
            pass
        if (known := read()) is not None:  # another process measured while this one waited
            return known
        answer = measure()
        try:
            stored = json.loads(path.read_text()) if path.exists() else {}
            write_atomic(path, json.dumps({**(stored if isinstance(stored, dict) else {}), key: answer}, indent=1))
        except (OSError, ValueError):
            pass
        return answer


def rotates_in_slot(attend, cache) -> bool:
    """Whether this attention slot rotates q and k (RoPE) and writes the cache in its own
    launch (`rotates_and_writes`; only with a cache), so the model does neither."""
    return cache is not None and getattr(attend, "rotates_and_writes", False)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        # q, k and v in one matrix: a decode step's matmul is a read of its weight, and the small
        # k and v matrices (1/4 of q's under GQA) alone are too short to reach full bandwidth.
        self.wqkv = Linear(args.dim, (args.n_heads + 2 * args.n_kv_heads) * args.head_dim,
                           bias=args.attention_bias)
        self.wo = Linear(args.n_heads * args.head_dim, args.dim, bias=args.output_bias)

    def forward(self, qkv, cos, sin, layer: int, cache: Optional[KVCache], lengths: torch.Tensor,
                start: Optional[int], select: Union[SelectFn, dict, None], return_probs: bool,
                attend: AttentionFn):
        """qkv = wqkv(attention_norm(h)), [B, T, (Hq + 2 Hkv) D] (the block computes it with the
        norm: see norm_linear) -> (wo(attention), the slot's probs)."""
        B, T, _ = qkv.shape
        Hq, Hkv = self.n_heads, self.n_kv_heads
        qkv = qkv.view(B, T, Hq + 2 * Hkv, self.head_dim)  # heads: Hq queries, Hkv keys, Hkv values
        v = qkv[:, :, Hq + Hkv:].transpose(1, 2)  # [B, Hkv, T, D]
        # kernels.attention_slot rotates q and k and writes the block to the cache in the launch
        # that attends (a decode step's layer then has no RoPE or cache-copy kernels); for any
        # other slot, RoPE here (q and k in one pass) and the cache write below.
        fused = rotates_in_slot(attend, cache)
        qk = qkv[:, :, :Hq + Hkv] if fused else Pointwise.rope(qkv[:, :, :Hq + Hkv], cos[:, :, None],
                                                                sin[:, :, None])
        q = qk[:, :, :Hq].transpose(1, 2)  # [B, Hq, T, D]
        k = qk[:, :, Hq:].transpose(1, 2)  # [B, Hkv, T, D]
        if cache is None:  # the block attends to itself alone
            out, probs = subset_attention(q, k, v, 0, None, return_probs)
        else:
            k_cache, v_cache = cache.k[layer], cache.v[layer]  # [B, Hkv, S_max, D]
            # The block's keys and values go to positions [lengths[b], lengths[b] + T) of row b,
            # and the attention reads them from there.
            if not fused:
                cache.write(layer, k, v)
            keep = None
            if isinstance(select, dict):  # fixed selections per layer
                keep = select.get(layer)
            elif select is not None:  # a hook: it sees the rotated queries, as the attention does
                cached_keys = k_cache[:, :, :start] if start is not None else k_cache  # all if rows differ
                if fused:  # cos, sin: every position's angles; the hook needs this block's
                    positions = block_positions(lengths, T)  # [B, T]
                    q_rotated = Pointwise.rope(q, cos[positions][:, None], sin[positions][:, None])
                else:
                    q_rotated = q
                keep = select(layer, q_rotated, cached_keys)
            rope = {"rope": (cos, sin)} if fused else {}
            out, probs = attend(q, k, v, k_cache, v_cache, lengths, start, keep, return_probs, **rope)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1)), probs


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w13 = Linear(args.dim, 2 * args.hidden_dim, bias=args.mlp_bias)  # gate | up, one read
        self.w2 = Linear(args.hidden_dim, args.dim, bias=args.mlp_bias)  # down

    def down(self, gate_up: torch.Tensor) -> torch.Tensor:
        """w2(silu(gate) * up) from w13's output gate | up: one launch where decode_linear suits."""
        if _decode_linear_takes(gate_up, self.w2.weight):
            return Pointwise.decode_linear(gate_up, self.w2.weight, self.w2.bias, swiglu=True)
        gate, up = gate_up.chunk(2, -1)
        return self.w2(Pointwise.swiglu(gate, up))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return Pointwise.rms_norm(x, self.weight, self.eps)

    def add_and_norm(self, h, delta):
        """(h + delta, this norm of it)."""
        return Pointwise.add_rms_norm(h, delta, self.weight, self.eps)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, h, delta, cos, sin, layer, cache, lengths, start, select, return_probs, attend):
        """Pre-norm block: h += attention(attention_norm(h)); h += feed_forward(ffn_norm(h)).
        Each residual add is made where its result is read, by the norm and the matmul after it
        (norm_linear: one launch for a decode step on a GPU). So the block takes the residual
        stream h [B, T, dim] and the previous block's output delta, not yet added (None for the
        first block), and returns (h, its own output delta, attention probs)."""
        h, qkv = norm_linear(h, delta, self.attention_norm, self.attention.wqkv)
        a, probs = self.attention(qkv, cos, sin, layer, cache, lengths, start, select, return_probs, attend)
        h, gate_up = norm_linear(h, a, self.ffn_norm, self.feed_forward.w13)
        return h, self.feed_forward.down(gate_up), probs


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # The attention slot (see AttentionFn); generation puts kernels.attention_slot here.
        self.attend: AttentionFn = cache_attention
        self.init_rope()

    def init_rope(self, device=None):
        """(Re)build the RoPE tables; load_model calls this after loading on `device`."""
        cos, sin = rope_cos_sin(self.args, device)
        self.register_buffer("rope_cos", cos, persistent=False)  # [max_seq_len, D]
        self.register_buffer("rope_sin", sin, persistent=False)

    def new_cache(self, batch_size: int = 1, max_len: Optional[int] = None) -> KVCache:
        w = self.output.weight
        max_len = max_len or self.args.max_seq_len
        return KVCache(self.args, batch_size, max_len, device=w.device, dtype=w.dtype)

    def forward(self, tokens: torch.Tensor, cache: Optional[KVCache] = None,
                select: Union[SelectFn, dict, None] = None, return_attn=False,
                logits_at: Optional[torch.Tensor] = None, attend: Optional[AttentionFn] = None,
                fp32_logits: bool = True, head: Optional["Linear"] = None):
        """tokens [B, T] -> logits [B, T, vocab] (fp32; in the model's dtype with
        fp32_logits=False, enough for an argmax, which a cast cannot change).

        With `cache`, row b's tokens sit at positions [cache.lengths[b], + T) and read
        every cached position of that row before them; the cache then grows by T.
        `select` chooses, per layer, the cached positions each KV head reads (see SelectFn).
        `return_attn=True` returns (logits, probs), probs a list with one entry per layer
        (a set of layer indices instead of True: only those layers' entries, None elsewhere):
        whatever the attention slot returns ([B, Hq, T, cache.length + T] fp32 from
        cache_attention; the last query's head-averaged row [B, S_max] from
        kernels.attention_slot). logits_at (int [B]): only the logits of position
        logits_at[b] of each row, [B, 1, vocab] (a prefill needs the last prompt token's).
        attend: the attention slot for this call (default: self.attend). head: the output layer
        for this call instead of self.output, e.g. some of its rows (a draft proposing from a
        vocabulary subset): logits [B, T, head's rows].
        """
        attend = attend or self.attend
        B, T = tokens.shape
        if cache is not None:
            start = cache.length if cache.uniform else None  # host-known common length, if any
            limit = min(self.args.max_seq_len, cache.max_len)
            if cache.length + T > limit:
                raise ValueError(f"positions up to {cache.length + T} exceed the limit of {limit} "
                                 f"(model {self.args.max_positions_text()}); use a shorter context")
            lengths = cache.lengths  # [B] int32, on the device
        else:
            start, lengths = 0, torch.zeros(B, dtype=torch.int32, device=tokens.device)
            if T > self.args.max_seq_len:
                raise ValueError(f"{T} positions exceed the model's {self.args.max_positions_text()}; "
                                 f"use a shorter context")
        if rotates_in_slot(attend, cache):
            # The attention launch finds each token's angles itself, at its row's cache length + t:
            # no position or gather kernels here.
            cos, sin = self.rope_cos, self.rope_sin  # [max_seq_len, D]
        else:
            positions = block_positions(lengths, T)  # [B, T]
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # [B, T, D]
        sink = self.args.sink_distance if cache is not None else 0
        if sink and start != 0:  # (start == 0: every row starts here; its sink is this block's)
            cache.place_sink(self.rope_cos, self.rope_sin, sink)
        h = self.tok_embeddings(tokens)  # [B, T, dim]: the residual stream
        delta = None  # the last block's output, added to h by the norm_linear that reads it
        probs_per_layer = []
        for i, layer in enumerate(self.layers):
            want_probs = return_attn if isinstance(return_attn, bool) else i in return_attn
            h, delta, probs = layer(h, delta, cos, sin, i, cache, lengths, start, select, want_probs, attend)
            probs_per_layer.append(probs)
        if sink and start == 0:
            cache.keep_sink()
        if cache is not None:
            cache.advance(T)
        if logits_at is not None:  # [B, 1, dim]: the rows whose logits are wanted
            rows = torch.arange(B, device=h.device), logits_at
            h, delta = h[rows][:, None], delta[rows][:, None] if delta is not None else None
        logits = norm_linear(h, delta, self.norm, head if head is not None else self.output)[1]
        logits = logits.float() if fp32_logits else logits
        return (logits, probs_per_layer) if return_attn is not False else logits


# ----------------------------------------------------------------------------------------
# Memory and files


def kv_cache_bytes(args: ModelArgs, batch_size: int, max_len: int, dtype=torch.bfloat16) -> int:
    """Bytes of a KVCache(args, batch_size, max_len): K and V for every layer."""
    elem = torch.empty(0, dtype=dtype).element_size()
    return 2 * args.n_layers * batch_size * args.n_kv_heads * max_len * args.head_dim * elem


def free_memory(device) -> Optional[int]:
    """Bytes free for new tensors on `device`: the GPU's free memory plus what torch's caching
    allocator holds unused (freed tensors' blocks, which new tensors reuse), or the host's
    MemAvailable on Linux; None where it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def format_bytes(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_memory(need: int, device, what: str, fix: str) -> None:
    """Refuse, in one line, a job whose estimated memory `need` exceeds 90% of what is free."""
    free = free_memory(device)
    if free is not None and need > 0.9 * free:
        raise MemoryError(f"{what} needs about {format_bytes(need)}, and {format_bytes(free)} is free on "
                          f"{torch.device(device)}; {fix}")


def write_atomic(path, data: Union[str, bytes]) -> None:
    """Write to a temporary name beside `path`, then rename it over `path`: a kill at any
    moment leaves the old file or the new one, never part of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_directory(out):
    """`with atomic_directory(out) as tmp:` fill `tmp`; it replaces `out` only once the block
    ends without error, so a half-written directory is never found at `out`."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        old = out.with_name(f".{out.name}.{os.getpid()}.old")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------
# Loading Hugging Face checkpoints


def hf_key_map(args: ModelArgs, hf_layer_ids: list[int]) -> dict[str, list[str]]:
    """Our parameter name -> the HF tensors it holds, stacked along dim 0 in that order
    (wqkv = q|k|v, w13 = gate|up; one tensor for the rest). Layer i of ours is HF layer
    hf_layer_ids[i]."""
    names = {"tok_embeddings.weight": ["model.embed_tokens.weight"], "norm.weight": ["model.norm.weight"]}
    if not args.tie_word_embeddings:
        names["output.weight"] = ["lm_head.weight"]
    qkv = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    gate_up = ["mlp.gate_proj", "mlp.up_proj"]
    per_layer = {"attention.wqkv.weight": [f"{n}.weight" for n in qkv],
                 "attention.wo.weight": ["self_attn.o_proj.weight"],
                 "feed_forward.w13.weight": [f"{n}.weight" for n in gate_up],
                 "feed_forward.w2.weight": ["mlp.down_proj.weight"],
                 "attention_norm.weight": ["input_layernorm.weight"],
                 "ffn_norm.weight": ["post_attention_layernorm.weight"]}
    if args.attention_bias:
        per_layer["attention.wqkv.bias"] = [f"{n}.bias" for n in qkv]
    if args.output_bias:
        per_layer["attention.wo.bias"] = ["self_attn.o_proj.bias"]
    if args.mlp_bias:
        per_layer["feed_forward.w13.bias"] = [f"{n}.bias" for n in gate_up]
        per_layer["feed_forward.w2.bias"] = ["mlp.down_proj.bias"]
    for i, hf_i in enumerate(hf_layer_ids):
        for ours, theirs in per_layer.items():
            names[f"layers.{i}.{ours}"] = [f"model.layers.{hf_i}.{t}" for t in theirs]
    return names


def _stack_rows(args: ModelArgs, name: str) -> list[int]:
    """How many rows each HF tensor fills in our parameter `name` (see hf_key_map; -1: all)."""
    D = args.head_dim
    if ".wqkv." in name:
        return [args.n_heads * D, args.n_kv_heads * D, args.n_kv_heads * D]
    if ".w13." in name:
        return [args.hidden_dim, args.hidden_dim]
    return [-1]


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """{HF tensor name: tensor} of `model`, the stacked parameters split again (views), its
    layers numbered from 0: a checkpoint in Hugging Face's layout that load_model reads back."""
    args = model.args
    state = model.state_dict()
    out = {}
    for ours, theirs in hf_key_map(args, list(range(args.n_layers))).items():
        parts = state[ours].split(_stack_rows(args, ours)) if len(theirs) > 1 else [state[ours]]
        out.update(zip(theirs, parts))
    return out


def _safetensors_files(path: Path) -> dict[str, Path]:
    """HF tensor name -> the file that holds it."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read {index} ({type(e).__name__}: {e}); the file is broken: "
                             f"fetch it again") from None
        files = {name: path / f for name, f in weight_map.items()}
        absent = sorted({f for f in files.values() if not f.exists()})
        if absent:
            raise FileNotFoundError(f"{index} names {absent[0].name}, which is missing; the checkpoint is "
                                    f"incomplete")
    elif single.exists():
        files = {}
    else:
        raise FileNotFoundError(f"{path} has neither model.safetensors nor model.safetensors.index.json; "
                                f"pass a Hugging Face checkpoint directory")
    if not files:
        try:
            with safe_open(str(single), framework="pt") as f:
                files = {name: single for name in f.keys()}
        except Exception as e:
            raise ValueError(f"cannot read {single} ({e}); the file is broken, fetch it again") from None
    return files


def load_model(path, device=None, dtype=None, layers=None, shared=None) -> Transformer:
    """Load an HF-layout checkpoint directory (config.json + safetensors) into a Transformer.

    `layers`: an iterable of HF decoder-layer indices to keep (embedding, final norm and
    head are always kept). `load_model(p, layers=range(12))` is a 12-layer early-exit
    model of the same checkpoint: the self-speculative draft the demo compares against.
    `shared`: {HF tensor name: tensor} for tensors the checkpoint leaves out because the
    model borrows them from another one (a trained draft borrows the target's embedding;
    see calibrate.load_draft). They are used as they are, not copied.
    Every tensor's shape is checked; a missing or left-over tensor is an error.
    """
    from safetensors import safe_open

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} not found; pass a Hugging Face checkpoint directory "
                                f"(config.json + model.safetensors)")
    try:
        cfg = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} is not valid JSON ({e})") from None
    args = ModelArgs.from_hf_config(cfg)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)

    all_layers = list(range(args.n_layers))
    hf_layer_ids = all_layers if layers is None else sorted(set(int(i) for i in layers))
    if not hf_layer_ids or any(i not in all_layers for i in hf_layer_ids):
        raise ValueError(f"layers={list(layers)} must be a non-empty subset of 0..{args.n_layers - 1}")
    args.n_layers = len(hf_layer_ids)
    args.layer_ids = hf_layer_ids if layers is not None else None

    with torch.device("meta"):
        model = Transformer(args)
    names = hf_key_map(args, hf_layer_ids)
    # The shape config.json implies for every HF tensor (a stacked parameter split by rows).
    expected = {}
    for ours, tensor in model.state_dict().items():
        shape = tensor.shape
        for theirs, rows in zip(names.get(ours, []), _stack_rows(args, ours)):
            expected[theirs] = (rows if rows > 0 else shape[0], *shape[1:])
    files = _safetensors_files(path)
    shared = shared or {}

    # Tensors of dropped layers are expected leftovers; so are tied heads saved twice and
    # the rotary inv_freq buffers some old checkpoints carry.
    wanted = set(expected)
    dropped = {f"model.layers.{i}." for i in all_layers if i not in hf_layer_ids}
    leftover = sorted(n for n in files if n not in wanted and not n.endswith("rotary_emb.inv_freq")
                      and not any(n.startswith(p) for p in dropped)
                      and not (args.tie_word_embeddings and n == "lm_head.weight"))
    if leftover:
        raise ValueError(f"{path}: tensors not used by a {cfg.get('model_type')} model: {leftover[:5]}"
                         f"{' ...' if len(leftover) > 5 else ''}; the checkpoint and config.json disagree")
    missing = sorted(n for n in wanted if n not in files and n not in shared)
    if missing:
        raise ValueError(f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                         f"the checkpoint is incomplete")

    hf = {}  # HF name -> tensor on `device` in `dtype` (shared tensors as they are)
    for theirs in sorted(wanted & set(shared)):
        if tuple(shared[theirs].shape) != tuple(expected[theirs]):
            raise ValueError(f"shared tensor {theirs} has shape {tuple(shared[theirs].shape)}, "
                             f"{config_file} implies {tuple(expected[theirs])}")
        hf[theirs] = shared[theirs]
    by_file: dict[Path, list[str]] = {}
    for theirs in sorted(wanted - set(shared)):
        by_file.setdefault(files[theirs], []).append(theirs)
    for file, file_names in by_file.items():
        try:
            with safe_open(str(file), framework="pt") as f:
                tensors = {theirs: f.get_tensor(theirs) for theirs in file_names}
        except Exception as e:  # safetensors' own errors: truncated, not a safetensors file, ...
            raise ValueError(f"cannot read {file} ({type(e).__name__}: {str(e)[:120]}); the file is "
                             f"broken or incomplete: fetch it again") from None
        for theirs, t in tensors.items():
            if tuple(t.shape) != tuple(expected[theirs]):
                raise ValueError(f"{file.name}: tensor {theirs} has shape {tuple(t.shape)}, "
                                 f"config.json implies {tuple(expected[theirs])}")
            hf[theirs] = t.to(device=device, dtype=dtype)
    state = {ours: hf[theirs[0]] if len(theirs) == 1 else torch.cat([hf[t] for t in theirs])
             for ours, theirs in names.items()}
    if args.tie_word_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if args.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.init_rope(device)
    return model.eval()


# ----------------------------------------------------------------------------------------
# Tokenizer


# Llama 3's pre-tokenizer pattern and GPT-2's (what a byte-level BPE with use_regex means).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# GPT-2's pattern after a Digits(individual_digits=True) pre-tokenizer (SmolLM2): every
# digit stands alone, and a whitespace run before a digit stays whole (the Digits split
# happened first, so the run never saw the digit as its lookahead).
GPT2_DIGITS_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character (what tokenizer.json vocabularies use)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _pattern_from_pre_tokenizer(pre: Optional[dict]) -> tuple[str, bool]:
    """(tiktoken pattern, add_prefix_space) for a tokenizer.json `pre_tokenizer` entry."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    split_pattern, digits, byte_level_regex, prefix = None, False, False, False
    for step in steps:
        kind = step.get("type")
        if kind == "Split":
            split_pattern = step["pattern"].get("Regex") or step["pattern"].get("String")
        elif kind == "Digits":
            digits = step.get("individual_digits", False)
            if not digits:
                raise ValueError("tokenizer.json: Digits(individual_digits=false) pre-tokenizer is not "
                                 "supported")
        elif kind == "ByteLevel":
            byte_level_regex = step.get("use_regex", True)
            prefix = step.get("add_prefix_space", False)
        else:
            raise ValueError(f"tokenizer.json: pre-tokenizer {kind!r} is not supported")
    if split_pattern and not (digits or byte_level_regex):
        return split_pattern, prefix
    if byte_level_regex and not split_pattern:
        return (GPT2_DIGITS_PATTERN if digits else GPT2_PATTERN), prefix
    kinds = [s.get("type") for s in steps]
    raise ValueError(f"tokenizer.json: unsupported pre-tokenizer combination {kinds}")


class Tokenizer:
    """tiktoken over a Llama-3 `tokenizer.model` or a byte-level BPE `tokenizer.json`
    (GPT-2 / SmolLM2 / Qwen2); `SentencePieceTokenizer` below reads the Llama-2 family's.

    Both are byte-pair encodings whose token ids are also their merge ranks, which is
    what tiktoken runs on: a rank table (bytes -> id), a pre-tokenizer regex, specials.
    `add_bos`: whether the checkpoint wants BOS in front of a text (encode's default).
    """

    # tiktoken recurses on long runs; pieces longer than this are split first.
    MAX_RUN = 25_000

    def __init__(self, ranks: dict[bytes, int], pattern: str, special: dict[str, int],
                 bos: Optional[str], eos: Optional[str], name: str = "specattn",
                 add_prefix_space: bool = False, add_bos: bool = False):
        import tiktoken

        # A byte-level BPE needs a token for every byte. Some vocabularies lack a few
        # (control bytes, bytes that never occur in UTF-8). Like HF `tokenizers` with no
        # unknown token, we drop such bytes: they get placeholder ranks past the vocabulary,
        # take part in no merge, and are filtered out of every encoding.
        self.vocab_size = max([*ranks.values(), *special.values()]) + 1
        missing = [bytes([b]) for b in range(256) if bytes([b]) not in ranks]
        self._dropped = set(range(self.vocab_size, self.vocab_size + len(missing)))
        ranks = {**ranks, **{b: self.vocab_size + i for i, b in enumerate(missing)}}
        self.enc = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks,
                                     special_tokens=special)
        self.special = special
        self.bos_id = special.get(bos) if bos else None
        self.eos_id = special.get(eos) if eos else None
        self.add_prefix_space = add_prefix_space
        self.add_bos = add_bos and self.bos_id is not None

    @classmethod
    def from_pretrained(cls, path) -> "Tokenizer":
        """The tokenizer of a checkpoint directory: tokenizer.json if there is one, else tokenizer.model."""
        path = Path(path)
        try:
            config = _tokenizer_config(path)
            if (path / "tokenizer.json").exists():
                tj = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
                if SentencePieceTokenizer.reads(tj):
                    return SentencePieceTokenizer.from_tokenizer_json(tj, config, name=path.name)
                return cls._from_tokenizer_json(tj, config, name=path.name)
            if (path / "tokenizer.model").exists():
                data = (path / "tokenizer.model").read_bytes()
                if _is_tiktoken_rank_file(data):
                    return cls._from_llama3_model(data, name=path.name)
                return SentencePieceTokenizer.from_sentencepiece_model(data, config, name=path.name)
        except (ValueError, KeyError, TypeError, IndexError, json.JSONDecodeError, UnicodeDecodeError,
                base64.binascii.Error) as e:
            raise ValueError(f"cannot read the tokenizer in {path}: {e}") from None
        raise FileNotFoundError(f"{path} has neither tokenizer.json nor tokenizer.model")

    @classmethod
    def _from_llama3_model(cls, data: bytes, name: str) -> "Tokenizer":
        ranks = {}
        for line in data.decode("ascii").splitlines():
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
        names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|reserved_special_token_2|>",
                 "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
                 "<|reserved_special_token_4|>", "<|eot_id|>"]
        names += [f"<|reserved_special_token_{i}|>" for i in range(5, 256 - 5)]
        special = {name: len(ranks) + i for i, name in enumerate(names)}  # 128000, 128001, ...
        # Llama 3's reference code puts BOS before every prompt.
        return cls(ranks, LLAMA3_PATTERN, special, "<|begin_of_text|>", "<|end_of_text|>", name=name,
                   add_bos=True)

    @classmethod
    def _from_tokenizer_json(cls, tj: dict, config: dict, name: str) -> "Tokenizer":
        model = tj["model"]
        if model.get("type") != "BPE":
            raise ValueError(f"model type {model.get('type')!r} is not a byte-pair encoding")
        decoder = {c: b for b, c in _bytes_to_unicode().items()}
        special = {t["content"]: t["id"] for t in tj.get("added_tokens", []) if t.get("special", True)}
        ranks = {}
        for token, idx in model["vocab"].items():
            if token in special:
                continue
            ranks[bytes(decoder[c] for c in token)] = idx
        pattern, prefix = _pattern_from_pre_tokenizer(tj.get("pre_tokenizer"))
        return cls(ranks, pattern, special, config.get("bos_token"), config.get("eos_token"), name=name,
                   add_prefix_space=prefix, add_bos=_wants_bos(tj, config))

    def encode(self, text: str, bos: Optional[bool] = None) -> list[int]:
        """Text -> ids, with BOS in front if `bos` (default: as the checkpoint says, `add_bos`).
        Special-token text is encoded as plain text, never as a special."""
        if self.add_prefix_space and not text.startswith(" "):
            text = " " + text
        ids = [self.bos_id] if (self.add_bos if bos is None else bos) and self.bos_id is not None else []
        for piece in self._split_long_runs(text):
            ids.extend(self.enc.encode(piece, disallowed_special=()))
        return [i for i in ids if i not in self._dropped] if self._dropped else ids

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids])

    @classmethod
    def _split_long_runs(cls, text: str):
        """Yield chunks of `text` cut only inside runs of > MAX_RUN all-space or all-non-space chars.

        No regex pre-token crosses a boundary between such a run's two halves in a way
        that matters in practice, and tiktoken would otherwise recurse too deep on them.
        """
        start, run_start, run_is_space = 0, 0, None
        for i, ch in enumerate(text):
            is_space = ch.isspace()
            if is_space != run_is_space:
                run_start, run_is_space = i, is_space
            elif i - run_start >= cls.MAX_RUN:
                yield text[start:i]
                start = run_start = i
        yield text[start:]


def _tokenizer_config(path: Path) -> dict:
    """tokenizer_config.json's BOS/EOS names and add_bos_token ({} without the file)."""
    file = path / "tokenizer_config.json"
    if not file.exists():
        return {}
    tc = json.loads(file.read_text(encoding="utf-8"))
    as_text = lambda t: t.get("content") if isinstance(t, dict) else t  # noqa: E731
    return {"bos_token": as_text(tc.get("bos_token")), "eos_token": as_text(tc.get("eos_token")),
            "add_bos_token": tc.get("add_bos_token")}


def _wants_bos(tj: dict, config: dict) -> bool:
    """Does the checkpoint put BOS before a text? tokenizer_config.json's add_bos_token
    if it says, else whether tokenizer.json's post-processor template starts with a special."""
    if config.get("add_bos_token") is not None:
        return bool(config["add_bos_token"])
    post = tj.get("post_processor") or {}
    steps = post.get("processors", []) if post.get("type") == "Sequence" else [post]
    return any(s.get("type") == "TemplateProcessing" and s.get("single") and "SpecialToken" in s["single"][0]
               for s in steps)


def _is_tiktoken_rank_file(data: bytes) -> bool:
    """Llama 3's tokenizer.model is text ("<base64> <rank>" lines); SentencePiece's is a protobuf."""
    first = data[:200].split(b"\n", 1)[0]
    return bool(first) and all(32 <= c < 127 for c in first) and len(first.split()) == 2


# ----------------------------------------------------------------------------------------
# SentencePiece-style BPE (Llama-2, TinyLlama, Mistral, Vicuna, CodeLlama)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece BPE vocabulary (pieces with a '▁' word marker, `<0xNN>` byte tokens)
    run by tiktoken, with the ids Hugging Face `tokenizers` gives.

    Three tricks map it onto tiktoken's byte-level BPE:
    * '▁' becomes the space byte, so a piece is the bytes of the text it stands for.
    * SentencePiece starts from whole characters; tiktoken from bytes. So the bytes of
      each multi-byte character in the vocabulary (and their prefixes) get the lowest
      ranks: they fuse into the character before any real merge. A character outside the
      vocabulary keeps its bytes, which are the `<0xNN>` tokens (byte fallback).
    * tiktoken ranks a merge by the merged token; Hugging Face by the merge's line in
      `merges`. Private ranks in merge order, mapped back to token ids, make them agree.
    Without a pre-tokenizer, SentencePiece treats a whole text as one word. tiktoken needs
    pieces, and cuts only where no vocabulary piece could span the cut (see _split_pattern),
    so the cut changes nothing and long texts stay linear.
    """

    def __init__(self, pieces: dict[str, int], merge_order: list[str], special: dict[str, int],
                 unk: Optional[str], bos: Optional[str], eos: Optional[str], prepend: str,
                 split_at_spaces: bool, strip_decoded: int, add_bos: bool, name: str = "specattn"):
        import tiktoken

        self.special = special
        self.vocab_size = max([*pieces.values(), *special.values()]) + 1
        self.bos_id = special.get(bos) if bos else None
        self.eos_id = special.get(eos) if eos else None
        self.add_bos = add_bos and self.bos_id is not None
        self.prepend = prepend  # "always", "unless-space" or "never"
        self.strip_decoded = strip_decoded
        text_of = lambda piece: piece.replace("\u2581", " ").encode("utf-8")  # noqa: E731
        byte_ids = {int(p[3:5], 16): i for p, i in pieces.items() if len(p) == 6 and p.startswith("<0x")
                    and p.endswith(">") and p not in special}
        normal = {p: i for p, i in pieces.items() if p not in special and i not in byte_ids.values()}
        unk_id = special.get(unk, pieces.get(unk)) if unk else None
        if len(byte_ids) < 256 and unk_id is None:
            raise ValueError(f"the vocabulary has {len(byte_ids)} of the 256 byte tokens <0x00>..<0xFF> "
                             f"and no unknown token; characters outside it cannot be encoded")

        # Private ranks: the 256 single bytes; then multi-byte characters and their byte
        # prefixes; then multi-character pieces in merge order. `ids_of_rank[r]`: the ids a
        # rank stands for (a prefix of an unknown character: its byte tokens).
        ranks: dict[bytes, int] = {}
        ids_of_rank: list[tuple[int, ...]] = []

        def add(data: bytes, ids: tuple[int, ...]):
            if data not in ranks:
                ranks[data] = len(ids_of_rank)
                ids_of_rank.append(ids)

        as_bytes = lambda data: tuple(byte_ids.get(b, unk_id) for b in data)  # noqa: E731
        one_byte = {text_of(p): i for p, i in normal.items() if len(text_of(p)) == 1}  # ASCII pieces, '▁'
        for b in range(256):
            add(bytes([b]), (one_byte.get(bytes([b]), byte_ids.get(b, unk_id)),))
        for piece, idx in normal.items():
            if len(piece) == 1 and len(text_of(piece)) > 1:
                data = text_of(piece)
                for n in range(2, len(data)):
                    add(data[:n], as_bytes(data[:n]))
                add(data, (idx,))
        for piece in merge_order:
            if len(piece) > 1 and piece in normal:
                add(text_of(piece), (normal[piece],))
        self._ids_of_rank = ids_of_rank
        self._bytes_of_id = {i: text_of(p) for p, i in normal.items()}
        self._bytes_of_id.update({i: bytes([b]) for b, i in byte_ids.items()})
        self._bytes_of_id.update({i: p.encode("utf-8") for p, i in special.items()})
        pattern = _split_pattern([p for p in merge_order if len(p) > 1 and p in normal], split_at_spaces)
        self.enc = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
        self.add_prefix_space, self._dropped = False, set()

    def encode(self, text: str, bos: Optional[bool] = None) -> list[int]:
        text = text.replace("\u2581", " ")  # a literal '▁' is a space to SentencePiece
        unless_space = self.prepend == "unless-space" and not text.startswith(" ")
        if text and (self.prepend == "always" or unless_space):
            text = " " + text
        ids = [self.bos_id] if (self.add_bos if bos is None else bos) and self.bos_id is not None else []
        # The split pattern has no look-around, so tiktoken takes texts of any length whole.
        for r in self.enc.encode_ordinary(text):
            ids.extend(self._ids_of_rank[r])
        return ids

    def decode(self, ids) -> str:
        text = b"".join(self._bytes_of_id.get(int(i), b"") for i in ids).decode("utf-8", errors="replace")
        n = self.strip_decoded
        return text[n:] if n and text.startswith(" " * n) else text

    @classmethod
    def reads(cls, tj: dict) -> bool:
        """Is this tokenizer.json SentencePiece-style ('▁' marker) rather than byte-level?"""
        model, pre, norm = tj.get("model", {}), tj.get("pre_tokenizer") or {}, tj.get("normalizer") or {}
        steps = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm]
        marks_spaces = any(s.get("type") == "Replace" and s.get("content") == "\u2581" for s in steps)
        return model.get("byte_fallback", False) or pre.get("type") == "Metaspace" or marks_spaces

    @classmethod
    def from_tokenizer_json(cls, tj: dict, config: dict, name: str) -> "SentencePieceTokenizer":
        """Hugging Face's two layouts of a SentencePiece BPE: the older one (normalizer
        Prepend('▁') + Replace(' ', '▁'), no pre-tokenizer) and the newer one (a Metaspace
        pre-tokenizer with prepend_scheme first/always/never)."""
        model = tj["model"]
        if model.get("type") != "BPE":
            raise ValueError(f"model type {model.get('type')!r} is not a byte-pair encoding")
        for name in ("continuing_subword_prefix", "end_of_word_suffix"):
            if model.get(name):
                raise ValueError(f"BPE field {name}={model[name]!r} is not supported")
        norm, pre = tj.get("normalizer") or {}, tj.get("pre_tokenizer") or {}
        prepend, split_at_spaces = "never", False
        for step in norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm] if norm else []:
            if step.get("type") == "Prepend" and step.get("prepend") == "\u2581":
                prepend = "always"
            elif not (step.get("type") == "Replace" and step.get("content") == "\u2581"
                      and step.get("pattern", {}).get("String") == " "):
                raise ValueError(f"normalizer {step.get('type')!r} {step} is not supported")
        if pre:
            if pre.get("type") != "Metaspace" or pre.get("replacement", "\u2581") != "\u2581":
                raise ValueError(f"pre-tokenizer {pre.get('type')!r} is not supported with a '▁' vocabulary")
            scheme = pre.get("prepend_scheme", "always" if pre.get("add_prefix_space", True) else "never")
            prepend = "never" if scheme == "never" else "unless-space"  # 'first' == 'always' for one text
            split_at_spaces = pre.get("split", True)
        dec = tj.get("decoder") or {}
        dec_steps = dec.get("decoders", []) if dec.get("type") == "Sequence" else [dec]
        strip = sum(s.get("start", 0) for s in dec_steps
                    if s.get("type") == "Strip" and s.get("content") == " ")
        if any(s.get("type") == "Metaspace" and s.get("prepend_scheme", "always") != "never"
               for s in dec_steps):
            strip = 1
        special = {t["content"]: t["id"] for t in tj.get("added_tokens", []) if t.get("special", True)}
        merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model.get("merges", [])]
        return cls(model["vocab"], [a + b for a, b in merges], special, model.get("unk_token"),
                   config.get("bos_token"), config.get("eos_token"), prepend, split_at_spaces, strip,
                   _wants_bos(tj, config), name=name)

    @classmethod
    def from_sentencepiece_model(cls, data: bytes, config: dict, name: str) -> "SentencePieceTokenizer":
        """A SentencePiece `tokenizer.model` (a protobuf), read as Hugging Face's LlamaConverter
        reads it: pieces in id order; a piece is formed in order of its score (SentencePiece
        BPE's merge order); CONTROL/UNKNOWN pieces are specials; BOS by default."""
        pieces, scores, types = [], [], []
        model_type, byte_fallback, add_dummy_prefix = 1, False, True  # the proto's defaults
        for number, value in _protobuf_fields(data):
            if number == 1:  # SentencePiece {string piece = 1; float score = 2; Type type = 3}
                entry = {f: v for f, v in _protobuf_fields(value)}
                pieces.append(entry.get(1, b"").decode("utf-8"))
                scores.append(struct.unpack("<f", entry[2])[0] if 2 in entry else 0.0)
                types.append(entry.get(3, 1))
            elif number == 2:  # TrainerSpec {ModelType model_type = 3; bool byte_fallback = 35}
                spec = {f: v for f, v in _protobuf_fields(value)}
                model_type, byte_fallback = spec.get(3, 1), bool(spec.get(35, 0))
            elif number == 3:  # NormalizerSpec {bool add_dummy_prefix = 3}
                add_dummy_prefix = bool({f: v for f, v in _protobuf_fields(value)}.get(3, 1))
        if model_type != 2:
            raise ValueError(f"tokenizer.model is a SentencePiece model of type {model_type} (only BPE, "
                             f"type 2, is supported); pass a tokenizer.json")
        if not pieces:
            raise ValueError("tokenizer.model holds no pieces")
        unknown, control, user_defined = 2, 3, 4
        if user_defined in types:
            raise ValueError("tokenizer.model has user-defined pieces; pass the checkpoint's tokenizer.json")
        special = {p: i for i, (p, t) in enumerate(zip(pieces, types)) if t in (unknown, control)}
        unk = next((p for p, t in zip(pieces, types) if t == unknown), None)
        order = sorted(range(len(pieces)), key=lambda i: (-scores[i], i))
        bos = config.get("bos_token") or ("<s>" if "<s>" in special else None)
        eos = config.get("eos_token") or ("</s>" if "</s>" in special else None)
        add_bos = config["add_bos_token"] if config.get("add_bos_token") is not None else True
        del byte_fallback  # the <0xNN> pieces themselves say whether bytes fall back
        return cls({p: i for i, p in enumerate(pieces)}, [pieces[i] for i in order], special, unk, bos, eos,
                   "always" if add_dummy_prefix else "never", False, 1 if add_dummy_prefix else 0, add_bos,
                   name=name)


def _split_pattern(multi_char_pieces: list[str], split_at_spaces: bool) -> str:
    """A tiktoken split regex that cuts a text only where no vocabulary piece can span the cut.

    Let C be the characters that occur in multi-character pieces (space for '▁' aside). A
    character outside C is never merged with a neighbour: it stands alone. A run of C
    characters (with the spaces in front of it) is one piece; so the cuts fall before each
    space that follows a non-space, which is safe when no piece has '▁' after another
    character (true of SentencePiece vocabularies trained with split_by_whitespace, the
    default). If one does, spaces join the runs instead. A Metaspace pre-tokenizer with
    split=True already cuts before every space, so every space starts a piece.
    """
    texts = [p.replace("\u2581", " ") for p in multi_char_pieces]
    word = _char_class({c for t in texts for c in t} - {" "})
    if split_at_spaces:
        return rf" ?{word}+| |[\s\S]"
    if any(a != " " and b == " " for t in texts for a, b in zip(t, t[1:])):
        return rf"(?:{word}| )+|[\s\S]"
    return rf" *{word}+| +|[\s\S]"


def _char_class(chars) -> str:
    """A regex character class of `chars`, written as code point ranges."""
    codes = sorted(ord(c) for c in chars)
    if not codes:
        return "(?!)"  # matches nothing
    ranges, first = [], codes[0]
    for prev, cur in zip(codes, codes[1:] + [None]):
        if cur != prev + 1 if cur is not None else True:
            ranges.append(f"\\x{{{first:x}}}" + (f"-\\x{{{prev:x}}}" if prev > first else ""))
            first = cur
    return "[" + "".join(ranges) + "]"


def _protobuf_fields(data: bytes):
    """Yield (field number, value) of a protobuf message: an int for varints, bytes otherwise."""
    def varint(i):
        value = shift = 0
        while True:
            b = data[i]
            value, shift, i = value | (b & 0x7F) << shift, shift + 7, i + 1
            if b < 0x80:
                return value, i

    i = 0
    while i < len(data):
        key, i = varint(i)
        wire = key & 7
        if wire == 0:
            value, i = varint(i)
        elif wire == 2:
            n, i = varint(i)
            value, i = data[i:i + n], i + n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, i = data[i:i + n], i + n
        else:
            raise ValueError(f"tokenizer.model is not a SentencePiece protobuf (wire type {wire})")
        yield key >> 3, value
