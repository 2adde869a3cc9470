"""Triton kernels for SpecAttn, each with a plain PyTorch reference beside it.

Works copied alone (torch + triton). Five pieces:

1. Top-p selection without sorting. `topp_mask(w, p)` keeps exactly {w >= θ}, where θ
   is the largest value whose "mass at or above" reaches p · rowsum. Instead of sorting
   the row, the kernels *search over values*: the fp32 bit pattern of a non-negative
   float orders the same way as the float, so θ is found by narrowing an interval of
   integer keys [lo, hi) while keeping the invariant

        mass(key >= lo) >= target > mass(key >= hi),      target = p · rowsum

   Every narrowing step counts mass at a few pivot keys, which is a streaming pass over
   the row: no sort, no scatter. When hi = lo + 1, lo is the bit pattern of a value
   that occurs in the row (its own mass is > 0), so θ is exact, ties included.
   `topp_select(w, p)` returns what the attention kernel consumes: per row, the kept
   indices compacted to the front in ascending order, and their count, made on the
   device, no host sync. Both take per-row lengths (a tensor on the device): a row is
   only its first lengths[r] entries. `union_select(masks)` lists, compacted the same way,
   what any of several masks keeps (SpecAttn's union of the γ draft rows' sets), and every
   position of a row shorter than `dense_below` (a short context read whole).

2. Sparse attention for verification. `sparse_attention(q, k_cache, v_cache, past_len,
   idx, count)`: the T new queries of each KV-head group read only the selected cached
   positions plus their own block (causally). Flash-decoding style: the selected
   positions are split across programs, each keeps a partial softmax (max, sum, acc),
   and the last program of each head to finish merges the partials (an atomic counter
   tells it), so one long row fills the GPU in a single launch. For a decode step's few
   rows (one or two queries) it merges over the real entries alone, several partials per
   round trip to L2 (SmolLM2, batch 1, 7.9k positions: 29% off a call). Given the block's keys
   and values (`new_kv`), the same launch also appends them to the cache, and given the
   RoPE tables (`rope`), it rotates the queries and those keys first.

3. The greedy choice: `argmax(logits)`, torch.argmax in one launch that splits each row
   over many programs (a draft step takes one per row, γ times a step; the verification one
   per block token); `ids=` maps the winner to a token id (a head over a vocabulary subset).

4. Proposals from the context: `context_lookup(hist, lengths, n, count)` finds where each
   row's newest n tokens occurred before and returns the count tokens that followed them
   (prompt lookup), in one launch; SpecEngine proposes them where a row finds one.

5. A decode step's matmuls: `decode_linear(x, weight, delta=, norm_weight=)` (or
   `swiglu=True`) runs a residual add and RMSNorm (or SwiGLU) and the matmul after them in
   one launch, for the few rows (at most 5) of a small model's decode or verification step,
   where every kernel costs its launch more than its bytes; on Hopper it is launched
   programmatically and reads its weights before the previous kernel finishes. model.py
   calls it through `model.use_decode_linear` (specattn.use_gpu_kernels plugs it in on a GPU).

`topp_mask_reference`, `topp_select_reference`, `union_select_reference`, `argmax_reference`,
`context_lookup_reference`, `sparse_attention_reference` and `decode_linear_reference` are the
definitions, used by the tests and as the CPU fallback (also where triton is not installed). On a
GPU, `python kernels.py --check` compares the kernels with them (bf16 included, which the CPU interpreter cannot run);
`python bench.py --parts kernels` checks, then times them.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # no triton (it installs on Linux only): the PyTorch references still work
    HAS_TRITON = False

    class triton:  # noqa: N801 - stands in for the module, so that the kernel definitions below parse
        jit = staticmethod(lambda fn: fn)
        cdiv = staticmethod(lambda a, b: -(-a // b))
        next_power_of_2 = staticmethod(lambda n: 1 << max(0, int(n) - 1).bit_length())

    class tl:  # noqa: N801
        constexpr = staticmethod(lambda value: value)


def _use_triton(x: torch.Tensor) -> bool:
    """Run the Triton kernel (on a GPU, or under TRITON_INTERPRET=1), or else the reference."""
    return HAS_TRITON and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def _sm_count(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


# ----------------------------------------------------------------------------------------
# Top-p selection: reference


def check_topp(p: float, name: str = "top-p") -> float:
    """p itself if it is a top-p value, in (0, 1]; else a one-line ValueError naming `name`."""
    if not (0 < p <= 1):  # NaN fails too
        raise ValueError(f"{name} must be in (0, 1], got {p}")
    return p


def _p_per_row(p, rows_shape, device) -> torch.Tensor:
    """p as a float32 tensor of shape rows_shape; checks a Python float."""
    if isinstance(p, torch.Tensor):
        return p.to(device=device, dtype=torch.float32).expand(rows_shape).contiguous()
    if not (p > 0) or math.isnan(p):  # also catches NaN
        raise ValueError(f"top-p must be in (0, 1], got {p}")
    return torch.full(rows_shape, float(p), device=device, dtype=torch.float32)


def _clean(w: torch.Tensor) -> torch.Tensor:
    """fp32 copy with NaN, ±inf and negative entries set to 0 (they carry no mass)."""
    w = w.float()
    return torch.where(torch.isfinite(w) & (w > 0), w, torch.zeros((), device=w.device))


def _inside(lengths, shape, device) -> torch.Tensor:
    """bool [..., N] (shape): position j < its row's length (lengths broadcast to shape[:-1])."""
    lengths = torch.as_tensor(lengths, device=device).expand(shape[:-1])
    return torch.arange(shape[-1], device=device) < lengths[..., None]


def topp_mask_reference(w: torch.Tensor, p, lengths=None) -> torch.Tensor:
    """Sort-based definition. w [..., N] -> bool [..., N] keeping {w >= θ} (see module doc).

    p >= 1 keeps everything (NaN entries too); an all-zero row keeps nothing for p < 1.
    lengths (ints broadcast to [...]): a row is only its first lengths[...] entries; the
    rest have no mass and are never kept.
    """
    p_rows = _p_per_row(p, w.shape[:-1], w.device).double()  # [...]
    x = _clean(w)
    inside = _inside(lengths, w.shape, w.device) if lengths is not None else None
    if inside is not None:
        x = torch.where(inside, x, 0.0)
    desc = x.sort(dim=-1, descending=True).values  # [..., N]
    mass = desc.double().cumsum(-1)  # mass[i] = mass of the i+1 largest (fp64: no rounding at the cut)
    target = p_rows[..., None] * mass[..., -1:]  # [..., 1]
    # θ = the first sorted value at which the running mass reaches the target.
    crossing = (mass < target).sum(-1, keepdim=True).clamp(max=x.shape[-1] - 1)
    theta = desc.gather(-1, crossing)  # [..., 1]
    keep = ((x >= theta) & (x > 0)) | (p_rows >= 1)[..., None]
    return keep & inside if inside is not None else keep


def topp_select_reference(w: torch.Tensor, p, lengths=None):
    """(idx int32 [..., N], count int32 [...]): kept indices, ascending, padded with -1."""
    return union_select_reference(topp_mask_reference(w, p, lengths)[..., None, :])


def union_select_reference(masks: torch.Tensor, lengths=None, dense_below: int = 0):
    """masks bool [..., K, N] -> (idx int32 [..., N], count int32 [...]): per row, the positions
    that any of its K masks keeps (and, with lengths [...], that lie below the row's
    length), ascending, padded with -1. A row with fewer than dense_below positions (its
    length, at most N) lists all of them."""
    keep = masks.any(-2)  # [..., N]
    n = keep.shape[-1]
    held = torch.as_tensor(n if lengths is None else lengths, device=keep.device).clamp(0, n)  # [...]
    keep |= (held < dense_below).expand(keep.shape[:-1])[..., None]
    if lengths is not None:
        keep &= _inside(lengths, keep.shape, keep.device)
    count = keep.sum(-1, dtype=torch.int32)
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)  # kept first, in index order
    idx = torch.where(torch.arange(keep.shape[-1], device=keep.device) < count[..., None], order, -1)
    return idx.to(torch.int32), count


def _selected_mask(idx: torch.Tensor, count: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of the compaction: bool [..., n] from idx [..., L] (first `count` [...] valid)."""
    valid = torch.arange(idx.shape[-1], device=idx.device) < count[..., None]  # [..., L]
    selected = torch.zeros(*idx.shape[:-1], n + 1, dtype=torch.bool, device=idx.device)  # column n: a bin
    selected.scatter_(-1, torch.where(valid, idx.long(), n), True)  # padding lands in the bin
    return selected[..., :n]


# ----------------------------------------------------------------------------------------
# Top-p selection: Triton
#
# Short rows: one program per row holds the row in registers and bisects on the key 31
# times, in one launch. Long rows: the row is cut into chunks, one program per (row,
# chunk), and the search runs as a few launches; each launch narrows [lo, hi) 16-fold by
# counting, per chunk, the mass at 16 pivot keys. Which is faster depends on how many
# programs there are to fill the GPU: one program per row (one launch, no round trips
# between launches) wins while a row fits in registers, up to 16k entries whatever the
# row count and up to 32k when the rows alone occupy half the multiprocessors; past that,
# or with few rows, the chunks spread one row over many multiprocessors
# (docs/performance.md has the timings).

SINGLE_PROGRAM_MAX = 16384
SINGLE_PROGRAM_MAX_MANY_ROWS = 32768
CHUNK = 4096  # elements per program for long rows
PIVOTS = 16  # pivots per pass: 2^31 keys / 16^8 = 1 -> 8 passes pin θ down
PASSES = 8
KEY_END = tl.constexpr(0x7FFFFFFF)  # above every cleaned key (finite floats end at 0x7F7FFFFF); a valid `hi`


@triton.jit
def _load_keys(w_ptr, offs, n):
    """Cleaned fp32 values (NaN, inf, negative -> 0) and their int32 bit patterns."""
    x = tl.load(w_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    x = tl.where((x > 0) & (x < float("inf")), x, 0.0)
    return x, x.to(tl.int32, bitcast=True)


@triton.jit
def _row_length(len_ptr, row, n, HAS_LEN: tl.constexpr):
    """How many of the row's n entries count: all, or (HAS_LEN) its own length, at most n."""
    if HAS_LEN:
        n = tl.minimum(tl.maximum(tl.load(len_ptr + row), 0), n)
    return n


@triton.jit
def _kept(key, offs, n, theta_key, keep_all, target):
    """Which entries the threshold keeps: key >= θ's key. A row with no mass keeps nothing
    (θ above every key); p >= 1 keeps every entry, NaNs too."""
    theta_key = tl.where(target > 0, theta_key, KEY_END)
    theta_key = tl.where(keep_all, -1, theta_key)
    return (key >= theta_key) & (offs < n)


@triton.jit
def _write_selection(keep, offs, n, first_slot, row, mask_ptr, idx_ptr, WRITE_MASK: tl.constexpr,
                     WRITE_IDX: tl.constexpr):
    """The mask, and the kept positions compacted into the row's list from first_slot on."""
    if WRITE_MASK:
        tl.store(mask_ptr + row * n + offs, keep.to(tl.int8), mask=offs < n)
    if WRITE_IDX:
        rank = tl.cumsum(keep.to(tl.int32), axis=0)  # 1 + how many kept entries come before
        tl.store(idx_ptr + row * n + first_slot + rank - 1, offs, mask=keep)


@triton.jit
def _topp_row_kernel(w_ptr, p_ptr, len_ptr, mask_ptr, idx_ptr, count_ptr, n, stride_row,
                     BLOCK: tl.constexpr, WRITE_MASK: tl.constexpr, WRITE_IDX: tl.constexpr,
                     HAS_LEN: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    n_row = _row_length(len_ptr, row, n, HAS_LEN)  # entries past it: no mass, never kept
    x, key = _load_keys(w_ptr + row * stride_row, offs, n_row)
    p = tl.load(p_ptr + row)
    target = p * tl.sum(x, axis=0)
    # Invariant: mass(key >= lo) >= target > mass(key >= hi). Each step halves [lo, hi).
    # A fixed 31 steps: stopping once a single key is left in [lo, hi) needs the keys
    # counted as well as weighed in every step, which costs more than the steps it saves.
    lo = 0
    hi = KEY_END
    for _ in range(31):
        mid = lo + (hi - lo) // 2
        mass = tl.sum(tl.where(key >= mid, x, 0.0), axis=0)
        lo = tl.where(mass >= target, mid, lo)
        hi = tl.where(mass >= target, hi, mid)
    keep = _kept(key, offs, n_row, lo, p >= 1, target)
    first_slot = 0
    if WRITE_IDX:  # the row is this program's alone: its list starts at slot 0 (an atomic add
        # to the zeroed count is the cheapest way to write it from a reduced value).
        first_slot = tl.atomic_add(count_ptr + row, tl.sum(keep.to(tl.int32), axis=0))
    _write_selection(keep, offs, n, first_slot, row, mask_ptr, idx_ptr, WRITE_MASK, WRITE_IDX)


@triton.jit
def _narrow(row, n_chunks, state_in, part_in, p_ptr, target_ptr, TARGET_FROM_PARTIALS: tl.constexpr,
            K: tl.constexpr, CHUNKS_POW2: tl.constexpr):
    """One 16-fold narrowing of [lo, hi) from the previous pass's per-chunk pivot masses.

    Every program of the row does this same small, fixed-order reduction, so all agree.
    Returns (lo, hi, target, j): the new lo is the previous pass's pivot j.
    """
    lo = tl.load(state_in + row * 2)
    hi = tl.load(state_in + row * 2 + 1)
    c = tl.arange(0, CHUNKS_POW2)
    i = tl.arange(0, K)
    part = tl.load(part_in + (row * n_chunks + c[:, None]) * K + i[None, :], mask=c[:, None] < n_chunks,
                   other=0.0)
    mass = tl.sum(part, axis=0)  # [K]: mass(key >= pivot_i), non-increasing in i
    if TARGET_FROM_PARTIALS:  # after the first pass: its pivot 0 is key 0, whose mass is the row sum
        target = tl.load(p_ptr + row) * tl.sum(tl.where(i == 0, mass, 0.0), axis=0)
    else:
        target = tl.load(target_ptr + row)
    pivots = lo + ((hi - lo).to(tl.int64) * i // K).to(tl.int32)
    # j: the last pivot before the first whose mass falls short of the target. Pivot 0 is lo,
    # which the pass before already found to reach the target: trust that (j >= 0) rather
    # than this pass's fp32 sum, which may round the same mass slightly lower.
    j = tl.maximum(tl.min(tl.where(mass < target, i, K), axis=0) - 1, 0)
    new_lo = tl.sum(tl.where(i == j, pivots, 0), axis=0)
    new_hi = tl.where(j + 1 < K, tl.sum(tl.where(i == j + 1, pivots, 0), axis=0), hi)
    done = hi - lo <= 1  # a converged row stays put (all its pivots are lo, so j still names lo)
    return tl.where(done, lo, new_lo), tl.where(done, hi, new_hi), target, j


@triton.jit
def _topp_pass_kernel(w_ptr, p_ptr, len_ptr, state_in, state_out, part_in, part_out, target_ptr, counts_out,
                      n, stride_row, n_chunks, STAGE: tl.constexpr, K: tl.constexpr, CHUNK_: tl.constexpr,
                      CHUNKS_POW2: tl.constexpr, COUNT: tl.constexpr, HAS_LEN: tl.constexpr):
    """One search pass over (row, chunk): narrow [lo, hi) (not on the first pass), then
    write this chunk's mass at the K pivots of the new interval (with COUNT, on the last
    pass, also how many of its entries reach each pivot).
    STAGE 0: first pass; 1: second (derives the target); 2: later passes."""
    row, chunk = tl.program_id(0), tl.program_id(1)
    if STAGE == 0:
        lo = 0
        hi = KEY_END
    else:
        lo, hi, target, _ = _narrow(row, n_chunks, state_in, part_in, p_ptr, target_ptr, STAGE == 1, K,
                                    CHUNKS_POW2)
        if STAGE == 1 and chunk == 0:
            tl.store(target_ptr + row, target)
    if chunk == 0:
        tl.store(state_out + row * 2, lo)
        tl.store(state_out + row * 2 + 1, hi)
    # The whole chunk is loaded at once (one round trip to memory, not one per sub-block);
    # then one reduction per pivot.
    offs = chunk * CHUNK_ + tl.arange(0, CHUNK_)
    n_row = _row_length(len_ptr, row, n, HAS_LEN)
    x, key = _load_keys(w_ptr + row * stride_row, offs, n_row)
    i = tl.arange(0, K)
    acc = tl.zeros([K], dtype=tl.float32)
    counts = tl.zeros([K], dtype=tl.int32)
    padding = CHUNK_ - tl.minimum(tl.maximum(n_row - chunk * CHUNK_, 0), CHUNK_)  # entries past it, key 0
    for k in tl.static_range(K):
        pivot = lo + ((hi - lo).to(tl.int64) * k // K).to(tl.int32)
        above = key >= pivot
        acc = tl.where(i == k, tl.sum(tl.where(above, x, 0.0), axis=0), acc)
        if COUNT:
            n_above = tl.sum(above.to(tl.int32), axis=0) - tl.where(pivot == 0, padding, 0)
            counts = tl.where(i == k, n_above, counts)
    tl.store(part_out + (row * n_chunks + chunk) * K + i, acc)
    if COUNT:
        tl.store(counts_out + (row * n_chunks + chunk) * K + i, counts)


@triton.jit
def _topp_final_kernel(w_ptr, p_ptr, len_ptr, state_in, part_in, target_ptr, counts_in, mask_ptr, idx_ptr,
                       count_ptr, n, stride_row, n_chunks, K: tl.constexpr, CHUNK_: tl.constexpr,
                       CHUNKS_POW2: tl.constexpr, WRITE_MASK: tl.constexpr, WRITE_IDX: tl.constexpr,
                       HAS_LEN: tl.constexpr):
    """Last narrowing (now hi = lo + 1, so θ's key is lo), then the mask and compacted indices."""
    row, chunk = tl.program_id(0), tl.program_id(1)
    lo, hi, target, j = _narrow(row, n_chunks, state_in, part_in, p_ptr, target_ptr, False, K, CHUNKS_POW2)
    offs = chunk * CHUNK_ + tl.arange(0, CHUNK_)
    n_row = _row_length(len_ptr, row, n, HAS_LEN)
    x, key = _load_keys(w_ptr + row * stride_row, offs, n_row)
    p = tl.load(p_ptr + row)
    keep = _kept(key, offs, n_row, lo, p >= 1, target)
    first_slot = 0
    if WRITE_IDX:
        # θ is the last pass's pivot j, and that pass stored how many entries of each chunk
        # reach it: the chunks before this one fill the row's list up to first_slot. So the
        # list is ascending, the same on every run, and needs no atomic counter.
        c = tl.arange(0, CHUNKS_POW2)
        kept_per_chunk = tl.load(counts_in + (row * n_chunks + c) * K + j, mask=c < n_chunks, other=0)
        kept_per_chunk = tl.where(p >= 1, tl.minimum(tl.maximum(n_row - c * CHUNK_, 0), CHUNK_),  # _kept's
                                  tl.where(target > 0, kept_per_chunk, 0))  # two special cases
        first_slot = tl.sum(tl.where(c < chunk, kept_per_chunk, 0), axis=0)
        if chunk == 0:
            tl.store(count_ptr + row, tl.sum(kept_per_chunk, axis=0))
    _write_selection(keep, offs, n, first_slot, row, mask_ptr, idx_ptr, WRITE_MASK, WRITE_IDX)


def _one_program_per_row(rows: int, n: int, device) -> bool:
    """The path _topp_triton takes for `rows` rows of n entries (see above)."""
    return n <= SINGLE_PROGRAM_MAX or (n <= SINGLE_PROGRAM_MAX_MANY_ROWS and 2 * rows >= _sm_count(device))


def _row_lengths(lengths, rows_shape, device) -> torch.Tensor:
    """One length per row, int32 [prod(rows_shape)]: from an int (every row), or a tensor
    broadcast to rows_shape. An int is filled on the device (no host copy: capture-safe)."""
    if isinstance(lengths, torch.Tensor):
        return lengths.to(device=device, dtype=torch.int32).expand(rows_shape).reshape(-1).contiguous()
    return torch.full((math.prod(rows_shape),), lengths, device=device, dtype=torch.int32)


def _topp_triton(w: torch.Tensor, p, write_mask: bool, write_idx: bool, lengths=None):
    shape, n = w.shape, w.shape[-1]
    w2 = w.reshape(-1, n)
    if w2.stride(-1) != 1:
        w2 = w2.contiguous()
    rows = w2.shape[0]
    p_rows = _p_per_row(p, shape[:-1], w.device).reshape(rows)
    dev = w.device
    has_len = lengths is not None
    lengths = _row_lengths(lengths, shape[:-1], dev) if has_len else None
    mask = torch.empty((rows, n), device=dev, dtype=torch.int8) if write_mask else None
    idx = torch.empty((rows, n), device=dev, dtype=torch.int32) if write_idx else None
    count = torch.zeros(rows, device=dev, dtype=torch.int32) if write_idx else None  # (kernels add to it)
    if rows == 0 or n == 0:
        pass
    elif _one_program_per_row(rows, n, dev):
        block = triton.next_power_of_2(n)
        _topp_row_kernel[(rows,)](w2, p_rows, lengths, mask, idx, count, n, w2.stride(0), BLOCK=block,
                                  WRITE_MASK=write_mask, WRITE_IDX=write_idx, HAS_LEN=has_len,
                                  num_warps=4 if block <= 2048 else 8 if block <= 8192 else 16)
    else:
        n_chunks = triton.cdiv(n, CHUNK)
        chunks_pow2 = triton.next_power_of_2(n_chunks)
        state = torch.empty((2, rows, 2), device=dev, dtype=torch.int32)  # [pass parity, row, (lo, hi)]
        part = torch.empty((2, rows, n_chunks, PIVOTS), device=dev, dtype=torch.float32)
        target = torch.empty(rows, device=dev, dtype=torch.float32)
        # per chunk, how many entries reach each of the last pass's pivots (for the list's order)
        counts = torch.empty((rows, n_chunks, PIVOTS), device=dev, dtype=torch.int32) if write_idx else None
        grid = (rows, n_chunks)
        for d in range(PASSES):
            stage = min(d, 2)
            _topp_pass_kernel[grid](w2, p_rows, lengths, state[(d - 1) % 2], state[d % 2], part[(d - 1) % 2],
                                    part[d % 2], target, counts, n, w2.stride(0), n_chunks, STAGE=stage,
                                    K=PIVOTS, CHUNK_=CHUNK, CHUNKS_POW2=chunks_pow2,
                                    COUNT=write_idx and d == PASSES - 1, HAS_LEN=has_len, num_warps=8)
        last = (PASSES - 1) % 2
        _topp_final_kernel[grid](w2, p_rows, lengths, state[last], part[last], target, counts, mask, idx,
                                 count, n, w2.stride(0), n_chunks, K=PIVOTS, CHUNK_=CHUNK,
                                 CHUNKS_POW2=chunks_pow2, WRITE_MASK=write_mask, WRITE_IDX=write_idx,
                                 HAS_LEN=has_len, num_warps=8)
    mask = mask.view(torch.bool).reshape(shape) if write_mask else None
    if write_idx:
        idx, count = idx.reshape(shape), count.reshape(shape[:-1])
    return mask, idx, count


def topp_mask(w: torch.Tensor, p, lengths=None) -> torch.Tensor:
    """bool [..., N] keeping {w >= θ}, θ the largest value whose mass at or above reaches
    p · rowsum. w: [..., N] non-negative weights (fp32/fp16/bf16; rows need not sum to 1);
    p: a float in (0, 1] or a per-row tensor [...]. NaN/inf/negative count as 0.
    lengths: None, or ints (a tensor broadcast to [...], e.g. per-row lengths on the
    device): each row is only its first lengths[...] entries (the rest: no mass, not kept)."""
    if not _use_triton(w):
        return topp_mask_reference(w, p, lengths)
    return _topp_triton(w, p, write_mask=True, write_idx=False, lengths=lengths)[0]


def topp_select(w: torch.Tensor, p, lengths=None):
    """(idx int32 [..., N], count int32 [...]): the kept indices of each row compacted to
    the front (entries past `count` are undefined). Same definition as topp_mask (on the
    GPU the two may differ at the cut by fp32 summation order). Indices are ascending, and
    the same on every run."""
    if not _use_triton(w):
        return topp_select_reference(w, p, lengths)
    _, idx, count = _topp_triton(w, p, write_mask=False, write_idx=True, lengths=lengths)
    return idx, count


# A union of selections, compacted: SpecAttn keeps what any of the γ draft rows' top-p sets
# keeps. One program per row walks it block by block, ORs the K masks, and appends the kept
# positions of each block after the previous blocks' (a prefix sum within the block), so
# the list comes out ascending with no atomics.

@triton.jit
def _union_select_kernel(mask_ptr, len_ptr, idx_ptr, count_ptr, n, dense_below, K: tl.constexpr,
                         BLOCK: tl.constexpr, HAS_LEN: tl.constexpr):
    row = tl.program_id(0)
    n_row = _row_length(len_ptr, row, n, HAS_LEN)
    whole = (tl.zeros([BLOCK], dtype=tl.int32) + (n_row < dense_below)) != 0  # a short row lists all it holds
    listed = tl.sum(tl.zeros([BLOCK], dtype=tl.int32), axis=0)  # kept positions before this block
    for start in range(0, n_row, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < n_row
        keep = whole & inside
        for k in tl.static_range(K):
            keep |= tl.load(mask_ptr + (row * K + k) * n + offs, mask=inside, other=0) != 0
        rank = tl.cumsum(keep.to(tl.int32), axis=0)  # 1 + how many kept entries of the block come before
        tl.store(idx_ptr + row * n + listed + rank - 1, offs, mask=keep)
        listed += tl.sum(keep.to(tl.int32), axis=0)
    tl.store(count_ptr + row, listed)


def union_select(masks: torch.Tensor, lengths=None, dense_below: int = 0):
    """masks bool [..., K, N] (or any dtype: nonzero keeps) -> (idx int32 [..., N], count
    int32 [...]): per row, the positions any of its K masks keeps, below the row's length if
    lengths (ints or a tensor broadcast to [...]) is given, compacted to the front in
    ascending order (entries past `count` are undefined). A row with fewer than dense_below
    positions (its length, at most N) lists all of them: a short context read whole
    (SpecAttn's sparse_from). One launch, no host sync."""
    if not _use_triton(masks):
        return union_select_reference(masks, lengths, dense_below)
    *lead, K, n = masks.shape
    rows = math.prod(lead)
    masks = masks if masks.dtype == torch.bool else masks != 0  # (any dtype: nonzero keeps)
    m = masks.reshape(rows, K, n).contiguous().view(torch.int8)
    idx = torch.empty((rows, n), device=masks.device, dtype=torch.int32)
    count = torch.empty(rows, device=masks.device, dtype=torch.int32)
    has_len = lengths is not None
    lengths = _row_lengths(lengths, lead, masks.device) if has_len else None
    if rows:
        block = min(triton.next_power_of_2(max(n, 1)), 4096)
        _union_select_kernel[(rows,)](m, lengths, idx, count, n, dense_below, K=K, BLOCK=block,
                                      HAS_LEN=has_len, num_warps=4 if block <= 1024 else 8)
    return idx.reshape(*lead, n), count.reshape(lead)


# ----------------------------------------------------------------------------------------
# Sparse verification attention: reference


def _key_window(k_cache, past_len, T: int) -> int:
    """How many cache slots the attention looks at: past_len + T for an int (the rows' block
    ends there), the whole buffer for per-row lengths (each row's block ends elsewhere)."""
    return k_cache.shape[2] if isinstance(past_len, torch.Tensor) else past_len + T


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D] rotated by its tokens' angles, cos and sin [B, T, D]: the half-split
    (HF) RoPE layout, the pair (x1[i], x2[i]) of the halves rotated by angle i; fp32 math,
    x's dtype out (as model.apply_rope)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos[:, None] + rotated.float() * sin[:, None]).type_as(x)


def sparse_attention_reference(q, k_cache, v_cache, past_len, idx=None, count=None, scale=None,
                               return_last_row=False, new_kv=None, last_row_mean=False, rope=None, window=0):
    """Dense fp32 attention under a boolean mask: the definition the kernel must meet.

    past_len: cached positions, an int for every batch row or an int tensor [B] per row
    (a batch whose rows have accepted different numbers of tokens).
    q: [B, Hq, T, D], the T new queries of row b at positions [past_len[b], past_len[b] + T).
    k_cache, v_cache: [B, Hkv, S >= past_len + T, D], the new block's keys already written,
    unless new_kv = (k_new, v_new) [B, Hkv, T, D] is given: then they are written first.
    rope = (cos, sin) (needs new_kv): q and k_new come unrotated, and are rotated by their
    tokens' angles first (`rope_reference`); the cache receives the rotated keys. The tables
    are [B, T, D], each token's angles, or [P, D], the angles of every position, of which
    row b's tokens take positions past_len[b] + t (FlashAttention's rotary tables with its
    cache lengths).
    idx: int32 [B, Hkv, L], selected cached positions (< past_len), first `count` valid;
    count: int32 [B, Hkv] (both may broadcast over heads). idx None: every cached position.
    window > 0 (instead of idx; a draft that reads its cache through the window it was trained
    on): row b's queries read position 0, the window - 1 cached positions before the block
    (from past_len[b] - window + 1 on) and the block.
    Returns [B, Hq, T, D] in q's dtype; with return_last_row also the last query's attention
    on the cached positions, summed over each KV head's query heads [B, Hkv, W], or with
    last_row_mean averaged over all query heads [B, W]. W = past_len for an int; for per-row
    lengths W = S, one entry per cache slot, zero at and past each row's length. That row is
    the attention over every cached position, also with a window (the softmax the output would
    take without it): SpecAttn's selection sees all of the context.
    """
    B, Hq, T, D = q.shape
    Hkv = k_cache.shape[1]
    lengths = _row_lengths(past_len, (B,), q.device).long()  # [B]: cached positions per row
    pos = lengths[:, None] + torch.arange(T, device=q.device)  # [B, T]: the block's positions
    if rope is not None:
        if new_kv is None:
            raise ValueError("sparse_attention: rope= rotates the new block's keys, so it needs new_kv")
        if rope[0].dim() == 2:  # [P, D]: each token's angles at its position
            rope = (rope[0][pos], rope[1][pos])  # [B, T, D]
        q, new_kv = rope_reference(q, *rope), (rope_reference(new_kv[0], *rope), new_kv[1])
    if new_kv is not None:  # row b's block goes to [lengths[b], lengths[b] + T)
        where = pos[:, None, :, None].expand(B, Hkv, T, D)
        k_cache.scatter_(2, where, new_kv[0].to(k_cache.dtype))
        v_cache.scatter_(2, where, new_kv[1].to(v_cache.dtype))
    group = Hq // Hkv
    S = _key_window(k_cache, past_len, T)
    s = torch.arange(S, device=q.device)
    cached = s < lengths[:, None]  # [B, S]
    if idx is not None:
        if window:
            raise ValueError("sparse_attention: give a selection (idx) or a window, not both")
        idx, count = idx.expand(B, Hkv, idx.shape[-1]), count.expand(B, Hkv)
        cached = cached[:, None] & _selected_mask(idx, count, S)  # [B, Hkv, S]
    else:
        cached = cached[:, None].expand(B, Hkv, S)
    block = (s[None, None, :] >= lengths[:, None, None]) & (s[None, None, :] <= pos[:, :, None])  # [B, T, S]
    allowed = cached[:, :, None, :] | block[:, None]  # [B, Hkv, T, S]
    read = allowed  # what the output reads
    if window:
        in_window = (s == 0) | (s >= lengths[:, None] - (window - 1))  # [B, S]: the sink and the newest
        read = (cached & in_window[:, None])[:, :, None, :] | block[:, None]
    # A KV head's G query heads x T queries as the rows of one matmul (no copy of K or V).
    k, v = k_cache[:, :, :S].float(), v_cache[:, :, :S].float()  # [B, Hkv, S, D]
    qg = q.float().reshape(B, Hkv, group * T, D)
    scores = (qg @ k.transpose(-1, -2)).view(B, Hkv, group, T, S) * (scale or 1 / math.sqrt(D))
    probs = scores.masked_fill(~read[:, :, None], float("-inf")).softmax(-1).view(B, Hq, T, S)
    out = (probs.view(B, Hkv, group * T, S) @ v).view(B, Hq, T, D).to(q.dtype)
    if return_last_row:  # last query, cached positions
        if window:  # the row covers every cached position
            probs = scores.masked_fill(~allowed[:, :, None], float("-inf")).softmax(-1).view(B, Hq, T, S)
        W = S if isinstance(past_len, torch.Tensor) else past_len
        row = (probs[:, :, -1, :W] * (s[:W] < lengths[:, None])[:, None]).float()  # [B, Hq, W]
        return out, row.mean(1) if last_row_mean else row.view(B, Hkv, group, W).sum(2)
    return out


# ----------------------------------------------------------------------------------------
# Sparse verification attention: Triton (split-KV; the last split of each head merges)
#
# One program = one (batch, KV head) and one split of its selected positions. It holds
# the whole query group, G query heads x T new tokens = G*T rows, so each gathered K/V
# row is read once for all of them (the GQA saving). The last split of every KV head is
# the new block itself, read causally (given new_kv, that program also appends the
# block's keys and values to the cache). Each program writes an unnormalised partial
# softmax (acc, running max m, running sum l) and then bumps its head's counter; the
# program that arrives last has every partial of its head in memory (most still in L2)
# and merges them into the output. No second launch, no host sync. The counters are
# reset by the program that merges, so the buffer is ready for the next call.


@triton.jit
def _rope(x, x_ptrs, cos_ptr, sin_ptr, angle_off, d, mask, D: tl.constexpr):
    """x, loaded from x_ptrs + d, rotated by RoPE (HF's half-split layout): x·cos + rotate_half(x)·sin,
    rotate_half(x) = (-x2, x1) for the halves x1, x2 of a head vector. The partner of column d is
    column (d + D/2) mod D, loaded again (it is in L1). In fp32, returned in x's dtype, as
    `rope_reference`."""
    half: tl.constexpr = D // 2
    partner = tl.load(x_ptrs + (d + half) % D, mask=mask, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + angle_off + d, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + angle_off + d, mask=mask, other=0.0).to(tl.float32)
    return (x.to(tl.float32) * cos + tl.where(d < half, -partner, partner) * sin).to(x.dtype)


@triton.jit
def _load_block(j, end, next_pos, idx_row, stride, oldest, k_base, v_base, sk_s, sv_s, d, DENSE: tl.constexpr,
                WINDOW_READ: tl.constexpr, WINDOW_MASK: tl.constexpr):
    """A split's block j (BLOCK_N slots of its share, those < end real): the cached positions
    it covers, which of them are real (valid) and read by the output (read), their keys [D, N]
    and values [N, D], and the list's entries one block further on (selected positions: the
    indices are fetched one block ahead, hiding that load's latency; dense: next_pos as given)."""
    valid = j < end
    if DENSE:
        pos = j
        if WINDOW_READ:
            pos = tl.where(j == 0, 0, oldest + j - 1)
    else:
        pos = next_pos
        next_pos = tl.load(idx_row + j + stride, mask=j + stride < end, other=0)
    read = valid
    if WINDOW_MASK:
        read = valid & ((pos == 0) | (pos >= oldest))
    kt = tl.load(k_base + pos[None, :] * sk_s + d[:, None], mask=valid[None, :], other=0.0)  # [D, N]
    v = tl.load(v_base + pos[:, None] * sv_s + d[None, :], mask=read[:, None], other=0.0)  # [N, D]
    return pos, valid, read, kt, v, next_pos


@triton.jit
def _attend_block(q, kt, v, pos, valid, read, m_i, l_i, acc, m_all, l_all, scale_log2, scores_ptr, bh, rows,
                  real, row_width, T: tl.constexpr, G: tl.constexpr, PRECISION: tl.constexpr,
                  STORE_SCORES: tl.constexpr, WINDOW_MASK: tl.constexpr):
    """One block of cached positions into the running softmax (m_i, l_i, acc; m_all, l_all over
    every position with WINDOW_MASK, where `read` marks the positions the output reads)."""
    s = tl.dot(q, kt, input_precision=PRECISION) * scale_log2  # [M, N]
    s = tl.where(valid[None, :], s, float("-inf"))
    if STORE_SCORES:  # the last token's scores of each query head, for _last_row_kernel
        last = real & (rows % T == T - 1)
        dst = scores_ptr + (bh * G + rows // T)[:, None] * row_width + pos[None, :]
        tl.store(dst, s, mask=last[:, None] & valid[None, :])
    if WINDOW_MASK:  # every position counts in the row's softmax; the output reads the window
        m_all_new = tl.maximum(m_all, tl.max(s, axis=1))
        l_all = l_all * tl.exp2(m_all - m_all_new) + tl.sum(tl.exp2(s - m_all_new[:, None]), axis=1)
        m_all = m_all_new
        s = tl.where(read[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    return m_new, l_i, acc, m_all, l_all


@triton.jit
def _sparse_attn_split_kernel(
        q_ptr, k_ptr, v_ptr, idx_ptr, count_ptr, acc_ptr, m_ptr, l_ptr, o_ptr, stats_ptr, lock_ptr,
        scores_ptr, kn_ptr, vn_ptr, len_ptr, cos_ptr, sin_ptr, m_all_ptr, l_all_ptr, row_width, scale_log2,
        n_splits, split_keys, window, H_KV, si_b, si_h, sc_b, sc_h, sq_b, sq_h, sq_t, sk_b, sk_h, sk_s,
        sv_b, sv_h, sv_s, so_b, so_h, so_t, skn_b, skn_h, skn_t, svn_b, svn_h, svn_t,
        T: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        DENSE: tl.constexpr, PRECISION: tl.constexpr, STORE_SCORES: tl.constexpr, MERGE_STATS: tl.constexpr,
        WINDOW_READ: tl.constexpr, WINDOW_MASK: tl.constexpr, WRITE_NEW: tl.constexpr, ROPE: tl.constexpr,
        ROPE_BY_POSITION: tl.constexpr, FLAT_MERGE: tl.constexpr, FLAT: tl.constexpr, PARTS_PER_LOAD: tl.constexpr,
        EARLY: tl.constexpr, PDL: tl.constexpr):
    bh, split = tl.program_id(0), tl.program_id(1)
    b, h = bh // H_KV, bh % H_KV
    rows = tl.arange(0, BLOCK_M)  # row r = query head (h*G + r // T), token r % T
    real = rows < G * T  # BLOCK_M is G*T rounded up to a power of 2 (>= 16, for tl.dot)
    d = tl.arange(0, D)
    past_len = tl.load(len_ptr + b)  # this batch row's cached positions (rows may differ)
    # The tables' row of token t: its position (tables of every position) or b*T + t (per token)
    angle_row0 = past_len if ROPE_BY_POSITION else b * T
    k_base, v_base = k_ptr + b * sk_b + h * sk_h, v_ptr + b * sv_b + h * sv_h
    # This head's selected positions go to the first n_active splits, at least split_keys
    # (>= BLOCK_N) each; the other splits (the grid is sized for the longest row the buffer
    # holds) write nothing and the merge skips them: a short row costs what its own length needs.
    # A window (a draft's) reads position 0 and the window - 1 cached positions from `oldest` on:
    # a list 0, oldest, oldest + 1, ... made on the fly (WINDOW_READ), or, where the scores of
    # every position are wanted as well (STORE_SCORES), a mask on the dense walk (WINDOW_MASK).
    oldest = tl.maximum(past_len - (window - 1), 1)
    n_sel = past_len
    if WINDOW_READ:
        n_sel = tl.minimum(past_len, window)
    if not DENSE:
        n_sel = tl.load(count_ptr + b * sc_b + h * sc_h)
    n_active = tl.minimum(n_splits, tl.cdiv(n_sel, split_keys))

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    m_all = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # WINDOW_MASK: max and sum over every position
    l_all = tl.zeros([BLOCK_M], dtype=tl.float32)
    # Striding over the compacted list gives every split the same share of the work
    # whatever the count, which the host never reads (no sync).
    stride = tl.maximum(n_active, 1) * BLOCK_N
    end = tl.where((split < n_active) & (split < n_splits), n_sel, 0)
    first = split * BLOCK_N  # the split's first block
    j = first + tl.arange(0, BLOCK_N)
    idx_row = idx_ptr  # the selection's list of this (batch row, head) (dense: none)
    next_pos = j  # the list's entries of the next block to load (dense: unused)
    if not DENSE:
        idx_row = idx_ptr + b * si_b + h * si_h
        next_pos = tl.load(idx_row + j, mask=j < end, other=0)
    if EARLY:  # the first block is loaded before q: with PDL, before waiting for the kernel before
        # Safe to read early: cached positions (< past_len) were written by earlier forwards,
        # the selection (idx, count) before the forward, and every kernel of this forward but
        # the one just before has finished (each PDL kernel of the step releases its dependents
        # only after its own wait, see decode_linear). q comes from the kernel just before.
        pos0, valid0, read0, kt0, v0, next_pos = _load_block(j, end, next_pos, idx_row, stride, oldest, k_base,
                                                             v_base, sk_s, sv_s, d, DENSE, WINDOW_READ, WINDOW_MASK)
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()  # after the wait: the kernel after may start early too
        first += stride
    q_rows = q_ptr + b * sq_b + (h * G + rows // T) * sq_h + (rows % T) * sq_t
    q = tl.load(q_rows[:, None] + d[None, :], mask=real[:, None], other=0.0)  # [M, D]
    if ROPE:  # q arrives unrotated: rotate each row by its token's angles
        q = _rope(q, q_rows[:, None], cos_ptr, sin_ptr, (angle_row0 + rows % T)[:, None] * D, d[None, :],
                  real[:, None], D)
    if split < n_splits:  # blocks split, split + n_active, ... of the selected positions
        if EARLY:
            m_i, l_i, acc, m_all, l_all = _attend_block(q, kt0, v0, pos0, valid0, read0, m_i, l_i, acc, m_all,
                                                        l_all, scale_log2, scores_ptr, bh, rows, real, row_width,
                                                        T, G, PRECISION, STORE_SCORES, WINDOW_MASK)
        for start in range(first, end, stride):
            pos, valid, read, kt, v, next_pos = _load_block(start + tl.arange(0, BLOCK_N), end, next_pos, idx_row,
                                                            stride, oldest, k_base, v_base, sk_s, sv_s, d, DENSE,
                                                            WINDOW_READ, WINDOW_MASK)
            m_i, l_i, acc, m_all, l_all = _attend_block(q, kt, v, pos, valid, read, m_i, l_i, acc, m_all, l_all,
                                                        scale_log2, scores_ptr, bh, rows, real, row_width, T, G,
                                                        PRECISION, STORE_SCORES, WINDOW_MASK)
    else:  # the new block: keys past_len + c, c <= t (causal)
        c = tl.arange(0, BLOCK_N)
        causal = (c[None, :] <= (rows % T)[:, None]) & (c[None, :] < T)
        k_dst = k_base + (past_len + c[None, :]) * sk_s + d[:, None]  # [D, N]
        v_dst = v_base + (past_len + c[:, None]) * sv_s + d[None, :]  # [N, D]
        if WRITE_NEW:  # this program appends the block to the cache (no other program reads it)
            kn_rows = kn_ptr + b * skn_b + h * skn_h + c[None, :] * skn_t
            kt = tl.load(kn_rows + d[:, None], mask=c[None, :] < T, other=0.0)  # [D, N]
            if ROPE:  # the cache holds rotated keys
                kt = _rope(kt, kn_rows, cos_ptr, sin_ptr, (angle_row0 + c[None, :]) * D, d[:, None],
                           c[None, :] < T, D)
            kt = kt.to(k_ptr.dtype.element_ty)
            v = tl.load(vn_ptr + b * svn_b + h * svn_h + c[:, None] * svn_t + d[None, :], mask=c[:, None] < T,
                        other=0.0).to(v_ptr.dtype.element_ty)
            tl.store(k_dst, kt, mask=c[None, :] < T)
            tl.store(v_dst, v, mask=c[:, None] < T)
        else:
            kt = tl.load(k_dst, mask=c[None, :] < T, other=0.0)
            v = tl.load(v_dst, mask=c[:, None] < T, other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION) * scale_log2
        s = tl.where(causal, s, float("-inf"))
        m_i = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_i[:, None])
        acc = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        l_i = tl.sum(p, axis=1)
        m_all, l_all = m_i, l_i  # the block is always read
    # Partials hold only the G*T real rows: [B*Hkv, n_splits + 1, G*T, (D)]; m and l fp32,
    # acc fp32 or bf16 (see sparse_attention).
    n_parts = n_splits + 1
    out = (bh * n_parts + split) * (G * T) + rows
    wrote = rows < tl.where((split == n_splits) | (split < n_active), G * T, 0)  # real rows, if any work
    tl.store(acc_ptr + out[:, None] * D + d[None, :], acc, mask=wrote[:, None])
    tl.store(m_ptr + out, m_i, mask=wrote)
    tl.store(l_ptr + out, l_i, mask=wrote)
    if WINDOW_MASK:
        tl.store(m_all_ptr + out, m_all, mask=wrote)
        tl.store(l_all_ptr + out, l_all, mask=wrote)
    # Release: every thread's partial stores happen before the counter moves.
    tl.debug_barrier()
    arrived = tl.atomic_add(lock_ptr + bh, 1, sem="acq_rel")
    if arrived == n_parts - 1:  # this head's last program: all partials are written
        tl.debug_barrier()
        if FLAT_MERGE:
            _merge_flat(acc_ptr, m_ptr, l_ptr, o_ptr, stats_ptr, bh * n_parts * (G * T), n_active, n_splits,
                        b * so_b + h * G * so_h, so_h, so_t, bh, T, G, D, MERGE_STATS, FLAT, PARTS_PER_LOAD)
        else:
            _merge_rows(acc_ptr, m_ptr, l_ptr, o_ptr, stats_ptr, bh * n_parts * (G * T), n_active, n_splits,
                        b * so_b + h * G * so_h, so_h, so_t, bh, rows, T, G, D, BLOCK_M, MERGE_STATS,
                        PARTS_PER_LOAD)
        if WINDOW_MASK:  # the row's statistics are those over every position, not the output's
            _merge_stats(m_all_ptr, l_all_ptr, stats_ptr, bh * n_parts * (G * T), n_active, n_splits, bh, rows,
                         T, G, BLOCK_M)
        tl.store(lock_ptr + bh, 0)  # ready for the next launch


@triton.jit
def _merge_rows(acc_ptr, m_ptr, l_ptr, o_ptr, stats_ptr, first, n_active, n_splits, o_off, so_h, so_t, bh,
                rows, T: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                WRITE_STATS: tl.constexpr, PARTS_PER_LOAD: tl.constexpr):
    """out = sum_s 2^(m_s - m) acc_s / sum_s 2^(m_s - m) l_s, m = max_s m_s, for every row at
    once, folding the parts in one at a time (the same rescaling as the main loop). The parts
    are the n_active splits that had work, then the block's (part n_splits).
    Loads bypass L1 (.cg): other multiprocessors wrote these partials."""
    real = rows < G * T
    d = tl.arange(0, D)
    m = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    den = tl.zeros([BLOCK_M], dtype=tl.float32)
    num = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    if PARTS_PER_LOAD == 1:
        # Each part's loads are issued one iteration ahead, so that the round trip to L2
        # overlaps the fold of the part before (the last iteration re-reads the last part).
        part = first + tl.where(n_active > 0, 0, n_splits) * (G * T) + rows
        m_next = tl.load(m_ptr + part, mask=real, other=-1.0e30, cache_modifier=".cg")
        l_next = tl.load(l_ptr + part, mask=real, other=0.0, cache_modifier=".cg")
        acc_next = tl.load(acc_ptr + part[:, None] * D + d[None, :], mask=real[:, None], other=0.0,
                           cache_modifier=".cg")
        for s in range(0, n_active + 1):
            m_s, l_s, acc_s = m_next, l_next, acc_next.to(tl.float32)
            after = s + 1  # the next part: split `after` while it had work, else the block's
            part = first + tl.where(after < n_active, after, n_splits) * (G * T) + rows
            m_next = tl.load(m_ptr + part, mask=real, other=-1.0e30, cache_modifier=".cg")
            l_next = tl.load(l_ptr + part, mask=real, other=0.0, cache_modifier=".cg")
            acc_next = tl.load(acc_ptr + part[:, None] * D + d[None, :], mask=real[:, None], other=0.0,
                               cache_modifier=".cg")
            m_new = tl.maximum(m, m_s)
            old, new = tl.exp2(m - m_new), tl.exp2(m_s - m_new)
            num = num * old[:, None] + acc_s * new[:, None]
            den = den * old + l_s * new
            m = m_new
    else:  # PARTS_PER_LOAD parts' loads at once (independent: one round trip), then their folds
        for first_part in range(0, n_active + 1, PARTS_PER_LOAD):
            for u in tl.static_range(PARTS_PER_LOAD):
                s = first_part + u
                part = first + tl.where(s < n_active, s, n_splits) * (G * T) + rows
                ok = real & (tl.zeros([BLOCK_M], dtype=tl.int32) + s <= n_active)
                m_s = tl.load(m_ptr + part, mask=ok, other=-1.0e30, cache_modifier=".cg")
                l_s = tl.load(l_ptr + part, mask=ok, other=0.0, cache_modifier=".cg")
                acc_s = tl.load(acc_ptr + part[:, None] * D + d[None, :], mask=ok[:, None], other=0.0,
                                cache_modifier=".cg").to(tl.float32)
                m_new = tl.maximum(m, m_s)
                old, new = tl.exp2(m - m_new), tl.exp2(m_s - m_new)
                num = num * old[:, None] + acc_s * new[:, None]
                den = den * old + l_s * new
                m = m_new
    den = tl.where(real, den, 1.0)  # padding rows hold nothing
    dst = o_ptr + o_off + (rows // T) * so_h + (rows % T) * so_t
    tl.store(dst[:, None] + d[None, :], (num / den[:, None]).to(o_ptr.dtype.element_ty), mask=real[:, None])
    if WRITE_STATS:  # each row's softmax max and sum, for _last_row_kernel: [B*Hkv, G*T, 2]
        tl.store(stats_ptr + (bh * (G * T) + rows) * 2, m, mask=real)
        tl.store(stats_ptr + (bh * (G * T) + rows) * 2 + 1, den, mask=real)


@triton.jit
def _merge_flat(acc_ptr, m_ptr, l_ptr, o_ptr, stats_ptr, first, n_active, n_splits, o_off, so_h, so_t, bh,
                T: tl.constexpr, G: tl.constexpr, D: tl.constexpr, WRITE_STATS: tl.constexpr,
                FLAT: tl.constexpr, PARTS_PER_LOAD: tl.constexpr):
    """The same fold as _merge_rows, in the same order, for a decode step's few rows (G*T*D <=
    FLAT entries). There a [BLOCK_M, D] tile is mostly padding (G*T = 3 of 16 rows for SmolLM2
    at T=1), and with many splits (22 a head at batch 1) waiting one L2 round trip per part
    is much of a long row's call. Here each thread holds a few of the G*T*D real (row, column)
    entries, with their row's max and sum alongside, and each round of the loop loads
    PARTS_PER_LOAD parts at once (independent loads: one round trip) before folding them."""
    f = tl.arange(0, FLAT)  # entry f is (row f // D, column f % D) of the G*T real rows
    real = f < G * T * D
    r = f // D
    m = tl.full([FLAT], -1.0e30, dtype=tl.float32)
    den = tl.zeros([FLAT], dtype=tl.float32)
    num = tl.zeros([FLAT], dtype=tl.float32)
    for first_part in range(0, n_active + 1, PARTS_PER_LOAD):
        for u in tl.static_range(PARTS_PER_LOAD):
            s = first_part + u  # the s-th part: split s while s < n_active, then the block's
            part = tl.where(s < n_active, s, n_splits)
            ok = real & (tl.zeros([FLAT], dtype=tl.int32) + s <= n_active)  # (a full-width mask)
            row0 = first + part * (G * T)
            m_s = tl.load(m_ptr + row0 + r, mask=ok, other=-1.0e30, cache_modifier=".cg")
            l_s = tl.load(l_ptr + row0 + r, mask=ok, other=0.0, cache_modifier=".cg")
            acc_s = tl.load(acc_ptr + row0 * D + f, mask=ok, other=0.0, cache_modifier=".cg").to(tl.float32)
            m_new = tl.maximum(m, m_s)
            old, new = tl.exp2(m - m_new), tl.exp2(m_s - m_new)
            num = num * old + acc_s * new
            den = den * old + l_s * new
            m = m_new
    den = tl.where(real, den, 1.0)
    dst = o_ptr + o_off + (r // T) * so_h + (r % T) * so_t + f % D
    tl.store(dst, (num / den).to(o_ptr.dtype.element_ty), mask=real)
    if WRITE_STATS:  # as _merge_rows: each row's max and sum, from the row's first entry
        row_head = real & (f % D == 0)
        tl.store(stats_ptr + (bh * (G * T) + r) * 2, m, mask=row_head)
        tl.store(stats_ptr + (bh * (G * T) + r) * 2 + 1, den, mask=row_head)


@triton.jit
def _merge_stats(m_ptr, l_ptr, stats_ptr, first, n_active, n_splits, bh, rows, T: tl.constexpr,
                 G: tl.constexpr, BLOCK_M: tl.constexpr):
    """Each row's softmax max and sum folded over the parts as _merge_rows folds them, without
    the outputs: with a window, the statistics of the softmax over every position (the
    partials' m_all, l_all), which _last_row_kernel normalises the stored scores by."""
    real = rows < G * T
    m = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    den = tl.zeros([BLOCK_M], dtype=tl.float32)
    for s in range(0, n_active + 1):
        part = first + tl.where(s < n_active, s, n_splits) * (G * T) + rows
        m_s = tl.load(m_ptr + part, mask=real, other=-1.0e30, cache_modifier=".cg")
        l_s = tl.load(l_ptr + part, mask=real, other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m, m_s)
        den = den * tl.exp2(m - m_new) + l_s * tl.exp2(m_s - m_new)
        m = m_new
    tl.store(stats_ptr + (bh * (G * T) + rows) * 2, m, mask=real)
    tl.store(stats_ptr + (bh * (G * T) + rows) * 2 + 1, den, mask=real)


@triton.jit
def _last_row_kernel(scores_ptr, stats_ptr, row_ptr, len_ptr, width, row_scale, T: tl.constexpr,
                     HEADS: tl.constexpr, GROUPS_PER_ROW: tl.constexpr, H_BLOCK: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    """The last query's attention probabilities on cached positions, summed over each group
    of HEADS consecutive query heads (a KV head's G, or all Hq of a batch row) and scaled
    by row_scale. The split pass stored that query's scores (log2 units); with each
    softmax row's final max and sum known after the merge, every probability is one exp2.
    Reads HEADS fp32 scores per position instead of going back to the D-wide keys.
    Entries from the batch row's length up to `width` are written as 0 (nothing cached)."""
    grp, blk = tl.program_id(0), tl.program_id(1)
    past_len = tl.load(len_ptr + grp // GROUPS_PER_ROW)
    g = tl.arange(0, H_BLOCK)
    head = grp * HEADS + g  # b * Hq + query head: the scores' row; the merge's rows are (head, token)
    stat = head * T + (T - 1)  # the merge's row for (this head, last token)
    m = tl.load(stats_ptr + stat * 2, mask=g < HEADS, other=0.0)
    den = tl.load(stats_ptr + stat * 2 + 1, mask=g < HEADS, other=1.0)
    j = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (g[:, None] < HEADS) & (j[None, :] < past_len)
    s = tl.load(scores_ptr + head[:, None] * width + j[None, :], mask=ok, other=float("-inf"))
    p = tl.exp2(s - m[:, None]) / den[:, None]  # [H_BLOCK, N]
    tl.store(row_ptr + grp * width + j, tl.sum(p, axis=0) * row_scale, mask=j < width)


_LOCKS: dict = {}


def _locks(device, n: int) -> torch.Tensor:
    """n int32 zeros kept per device for the merge counters (each launch leaves them at 0).
    Allocated on first use, which must not be inside a CUDA graph capture: a captured
    allocation would hold zeros only once the graph is replayed."""
    buf = _LOCKS.get(device)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("sparse_attention: call it once before capturing a CUDA graph "
                               "(it allocates its merge counters on first use)")
        buf = _LOCKS[device] = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
    return buf


def sparse_attention(q, k_cache, v_cache, past_len, idx=None, count=None, scale=None, n_splits=None,
                     block_n=None, num_warps=4, num_stages=3, return_last_row=False, new_kv=None,
                     last_row_mean=False, rope=None, split_keys=None, merge=None, merge_parts=None, window=0,
                     early=None):
    """Verification attention reading only the selected cached positions (see the reference
    for shapes). past_len: an int, or an int32 tensor [B] of per-row lengths on the device:
    then nothing here reads it on the host, so the launch can be captured in a CUDA graph
    once and replayed as the rows grow (the grid is sized by the buffer, not the lengths).
    idx/count come from `topp_select` (or any compacted selection); idx None reads every
    cached position. return_last_row (dense only) also returns what a draft needs for
    SpecAttn: the last query's attention on the cached positions, summed over the query
    heads of each KV head, [B, Hkv, W] fp32, from the scores the main pass stored (4 bytes
    per query head and position, far less than the keys); with last_row_mean, the mean over
    all query heads, [B, W] (one selection for every head, as SpecAttn uses it: no further
    ops on the row). W: past_len, or the buffer length S for per-row lengths (0 past each row).
    new_kv = (k_new, v_new) [B, Hkv, T, D]: the block's keys and values, which the programs
    that attend to the block write into the cache at [past_len, past_len + T) in the same
    launch (a decode step then needs no separate cache-write kernels). rope = (cos, sin)
    (with new_kv): q and the block's keys come unrotated and the same launch rotates them
    (no separate RoPE kernel either); the tables are [B, T, D], each token's angles, or
    [P, D], every position's, from which each row takes its own (past_len[b] + t, read on
    the device: the caller gathers nothing).
    window > 0 (a draft reading through the window it was trained on; no idx): the output
    reads position 0 and the window - 1 cached positions before the block, found from each
    row's length in the launch (no index list). With return_last_row the launch still scores
    every cached position, and the row is the attention over all of them (the softmax without
    the window), while the output accumulates over the window's positions alone: one pass
    over the keys serves both, and the values are read only in the window.
    n_splits, block_n, num_warps, num_stages: launch choices (None: the measured defaults
    below); split_keys: the fewest positions a split reads (None: 256), so a row shorter
    than n_splits * split_keys uses fewer splits (decided on the device, from its length);
    merge: "rows" folds the partials as [G*T, D] tiles, "flat" over the real (row, column)
    entries alone (None: flat for one query per row with G*D <= 512 over 8 or more splits);
    merge_parts: the partials it loads per round trip to L2 (None: 8 for flat; for rows 4 over
    8 or more splits, else 1).
    early: each program loads its first block of cached keys and values before q, and on
    Hopper and newer the launch is programmatic (PDL): the programs start while the kernel
    before finishes and wait for it (q, the new block) only after that first load. None: on
    for at most DECODE_LINEAR_ROWS query tokens (B*T) of heads spanning at most
    DECODE_LINEAR_MAX_K entries (Hq*D), a small model's decode step, where decode_linear's
    launches (PDL too) come before and after; off otherwise. On an H100 (`python bench.py
    --parts profile`, demo shapes), with decode_linear releasing its dependents early as well:
    at batch 1 / 1024 positions a plain step 589.3 -> 457.3 µs, a verification of two draft
    tokens 967.7 -> 768.5 µs; at batch 8 / 4096 positions (cuBLAS around it) this kernel was
    slower with it, 15.35 -> 16.76 µs a call, so it stays off there.
    The merge counters are one buffer per device: do not run calls on several CUDA streams
    at once.
    Falls back to the reference on a CPU without the interpreter."""
    if merge not in (None, "flat", "rows"):
        raise ValueError(f"sparse_attention: merge must be 'flat', 'rows' or None, got {merge!r}")
    if merge_parts is not None and merge_parts not in (1, 2, 4, 8, 16):
        raise ValueError(f"sparse_attention: merge_parts must be 1, 2, 4, 8 or 16, got {merge_parts!r}")
    if window < 0 or (window and idx is not None):
        raise ValueError(f"sparse_attention: window must be >= 0 and comes without a selection (idx), "
                         f"got window={window}")
    if not _use_triton(q):
        return sparse_attention_reference(q, k_cache, v_cache, past_len, idx, count, scale, return_last_row,
                                          new_kv, last_row_mean, rope, window)
    if return_last_row and idx is not None:
        raise ValueError("sparse_attention: return_last_row needs dense attention (idx=None)")
    B, Hq, T, D = q.shape
    Hkv = k_cache.shape[1]
    G = Hq // Hkv
    ragged = isinstance(past_len, torch.Tensor)
    if Hq % Hkv or k_cache.shape[2] < (T if ragged else past_len + T) or D not in (16, 32, 64, 128, 256):
        raise ValueError(f"sparse_attention: bad shapes q={tuple(q.shape)} k_cache={tuple(k_cache.shape)} "
                         f"past_len={past_len} (need Hq % Hkv == 0, cache >= past_len + T, D a power of 2 "
                         f">= 16)")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("sparse_attention: q, k_cache and v_cache need a contiguous last dimension")
    k_new, v_new = new_kv if new_kv is not None else (None, None)
    if new_kv is not None and (k_new.shape != (B, Hkv, T, D) or v_new.shape != (B, Hkv, T, D)
                               or k_new.stride(-1) != 1 or v_new.stride(-1) != 1):
        raise ValueError(f"sparse_attention: new_kv must be two [B, Hkv, T, D] = {(B, Hkv, T, D)} tensors "
                         f"with a contiguous last dim, got {tuple(k_new.shape)} and {tuple(v_new.shape)}")
    if rope is not None:
        cos, sin = rope
        if new_kv is None:
            raise ValueError("sparse_attention: rope= rotates the new block's keys, so it needs new_kv")
        by_position = cos.dim() == 2
        if any((t.shape[1:] != (D,) or t.shape[0] < T) if by_position else t.shape != (B, T, D)
               for t in (cos, sin)) or not (cos.is_contiguous() and sin.is_contiguous()):
            raise ValueError(f"sparse_attention: rope must be two contiguous tables, [B, T, D] = {(B, T, D)} "
                             f"or [positions, {D}], got {tuple(cos.shape)} and {tuple(sin.shape)}")
    else:
        cos = sin = None
        by_position = False
    dense = idx is None
    if not dense:  # [B, Hkv, L] and [B, Hkv], any strides but a contiguous last dim (0 strides share a row)
        idx, count = idx.expand(B, Hkv, idx.shape[-1]), count.expand(B, Hkv)
        if idx.stride(-1) != 1 or idx.dtype != torch.int32 or count.dtype != torch.int32:
            raise ValueError("sparse_attention: idx and count must be int32 with a contiguous last dim")
    lengths = _row_lengths(past_len, (B,), q.device)  # [B] int32: cached positions per row
    width = k_cache.shape[2] if ragged else past_len  # the last row's entries (one per cache slot if ragged)
    capacity = k_cache.shape[2] - T if ragged else past_len  # the most cached positions a row can have
    capacity = capacity if dense else min(capacity, idx.shape[-1])
    window_read, window_mask = bool(window) and not return_last_row, bool(window) and return_last_row
    capacity = min(capacity, window) if window_read else capacity
    block_m = max(16, triton.next_power_of_2(G * T))
    if early is None:  # a small model's decode step, with decode_linear's launches before and after
        early = B * T <= DECODE_LINEAR_ROWS and Hq * D <= DECODE_LINEAR_MAX_K
    pdl = early and _pdl(q.device)
    sm = _sm_count(q.device)
    if n_splits is None:
        # Every split leaves a partial that the merging program folds in one after another,
        # so fewer splits are better as long as the multiprocessors stay busy. Measured on
        # an H200 (`python bench.py --parts kernels`, launch choices): about one program per two
        # multiprocessors, 128 keys per block; with few heads and long rows, more splits of
        # >= 4096 positions each, up to two programs per multiprocessor, 64 keys per block
        # (batch 1 at 128k: 32 splits per head, not 9).
        n_splits = triton.cdiv(sm, 2 * B * Hkv)
        if not dense and n_splits == 1 and B * Hkv < sm:
            # A selection is gathered position by position, each (row, KV head)'s list by its
            # own program: with one split per head some multiprocessors would get none, and
            # the longest list (a step's rows keep different shares) sets the launch's time.
            # Two splits put a program on every one and cut each list longer than split_keys
            # in two (the demo target at batch 32: 96 KV heads on 132 multiprocessors; `python
            # bench.py --parts launch` times both).
            n_splits = 2
        long_rows = min(triton.cdiv(capacity, 4096), triton.cdiv(2 * sm, B * Hkv))
        if 4 * B * Hkv < sm and long_rows > n_splits:  # few heads (batch 1 with 8 KV heads), long rows
            n_splits = long_rows
            block_n = block_n or 64
    block_n = max(block_n or 128, triton.next_power_of_2(T))  # also covers the new block in one tile
    n_splits = max(1, min(n_splits, triton.cdiv(capacity, block_n))) if capacity else 0
    split_keys = max(split_keys or 256, block_n)  # a short row: fewer partials to merge (measured, demo)
    parts = n_splits + 1
    # The merge: one query per row (plain decoding, a draft step) spread over many splits folds
    # flat, 8 parts per load; several queries (a draft's first step, verification) over many
    # splits fold as rows, 4 parts per load; a few splits fold as rows one part at a time. On an
    # H200 (`python bench.py --parts merge`) at SmolLM2's shapes, batch 1, 7.9k positions, µs a
    # call: one query rows 12.8, flat 8.9; two queries rows 12.7, 4 a load 9.9, flat 10.6; five
    # rows 13.3, 4 a load 9.9, flat 14.8.
    flat = triton.next_power_of_2(G * T * D)
    if merge is None:
        merge = "flat" if T == 1 and flat <= 512 and n_splits >= 8 else "rows"
    if merge_parts is None:
        if merge == "flat":
            merge_parts = max(1, min(8, 4096 // flat))
        else:
            merge_parts = 4 if n_splits >= 8 else 1
    # The partial outputs are what the merge reads back, so for 16-bit inputs they are kept
    # in bf16 (half the bytes; relative error 2^-9 per partial, the same as rounding the
    # output itself); their max and sum stay fp32. fp32 inputs keep fp32 partials.
    acc_dtype = torch.float32 if q.dtype == torch.float32 else torch.bfloat16
    acc = torch.empty((B * Hkv, parts, G * T, D), device=q.device, dtype=acc_dtype)
    m = torch.empty((B * Hkv, parts, G * T), device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    # The output lives token-major, [B, T, Hq, D] in memory (returned as its [B, Hq, T, D] view), so
    # the output projection after it reads [B, T, Hq * D] as a view: with T > 1 (a verification
    # block) a head-major output would cost a copy kernel per layer.
    out = torch.empty((B, T, Hq, D), device=q.device, dtype=q.dtype).transpose(1, 2)
    # With return_last_row: the last token's scores [B*Hq, width] and each row's softmax (max, sum).
    scores = torch.empty((B * Hq, width), device=q.device, dtype=torch.float32) if return_last_row else None
    stats = (torch.empty((B * Hkv, G * T, 2), device=q.device, dtype=torch.float32) if return_last_row
             else None)
    # With a window and the row: the partials' max and sum over every position, besides the output's.
    m_all, l_all = (torch.empty_like(m), torch.empty_like(m)) if window_mask else (None, None)
    locks = _locks(q.device, B * Hkv)
    scale = (scale or 1 / math.sqrt(D)) * 1.4426950408889634  # exp(x) = exp2(x * log2(e))
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _sparse_attn_split_kernel[(B * Hkv, parts)](
        q, k_cache, v_cache, idx, count, acc, m, l, out, stats, locks, scores, k_new, v_new, lengths,
        cos, sin, m_all, l_all, width, scale, n_splits, split_keys, window, Hkv,
        *((0, 0, 0, 0) if dense else (idx.stride(0), idx.stride(1), count.stride(0), count.stride(1))),
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1), out.stride(2),
        *((*k_new.stride()[:3], *v_new.stride()[:3]) if new_kv is not None else (0,) * 6),
        T=T, G=G, D=D, BLOCK_M=block_m, BLOCK_N=block_n, DENSE=dense, PRECISION=precision,
        STORE_SCORES=return_last_row, MERGE_STATS=return_last_row and not window_mask, WINDOW_READ=window_read,
        WINDOW_MASK=window_mask, WRITE_NEW=new_kv is not None, ROPE=rope is not None,
        ROPE_BY_POSITION=by_position, FLAT_MERGE=merge == "flat", FLAT=flat, PARTS_PER_LOAD=merge_parts,
        EARLY=early, PDL=pdl, num_warps=num_warps, num_stages=num_stages, **({"launch_pdl": True} if pdl else {}))
    if not return_last_row:
        return out
    heads = Hq if last_row_mean else G  # query heads summed into each output row
    row = torch.empty((B, width) if last_row_mean else (B, Hkv, width), device=q.device, dtype=torch.float32)
    h_block = triton.next_power_of_2(heads)
    row_block = max(16, min(512, 2048 // h_block))  # positions per program: ~2048 scores each
    if width:
        _last_row_kernel[(B * Hq // heads, triton.cdiv(width, row_block))](
            scores, stats, row, lengths, width, 1 / Hq if last_row_mean else 1.0, T=T, HEADS=heads,
            GROUPS_PER_ROW=Hq // heads, H_BLOCK=h_block, BLOCK_N=row_block, num_warps=4)
    return out, row


def attention_slot(q, k_new, v_new, k_cache, v_cache, lengths, start=None, keep=None, return_probs=False,
                   rope=None, window=0):
    """model.Transformer's attention slot (`model.attend = attention_slot`) served by
    sparse_attention, with each batch row's cache length read on the device (`lengths`
    int32 [B]; `start`, the host's common length, is not used), so the whole forward can
    be captured in a CUDA graph once and replayed as the rows grow. keep: the select
    hook's (idx, count), e.g. from topp_select; None reads every cached position.
    return_probs (the draft side) returns only what SpecAttn needs: the last query's
    attention averaged over all query heads, [B, S] (S = the cache buffer's length; 0 from
    each row's length on). rope = (cos, sin), the model's tables of every position [P, D]
    (or each token's, [B, T, D]): q and k_new are unrotated, and the launch rotates them by
    the angles of positions lengths[b] + t. window > 0 (bind it with functools.partial: a
    draft reading through its training window): the output reads position 0 and the window - 1
    positions before the block, while the row returned with return_probs still covers every
    cached position (one launch: see sparse_attention). On a CPU the references run instead
    (same shapes)."""
    if k_cache is None:
        raise ValueError("attention_slot needs a KV cache (pass cache= to the forward)")
    if keep is not None and return_probs:
        raise ValueError("attention_slot: return_probs reads every cached position, so it takes no selection "
                         "(a draft limits what its output reads with window=)")
    idx, count = keep if keep is not None else (None, None)
    got = sparse_attention(q, k_cache, v_cache, lengths, idx, count, return_last_row=return_probs,
                           new_kv=(k_new, v_new), last_row_mean=True, rope=rope, window=window)
    return got if return_probs else (got, None)


# model.Attention hands this slot q and k before RoPE, with the tables (rope=), and leaves the
# cache write to it (new_kv): a decode step's layer needs no RoPE or cache-write kernels.
attention_slot.rotates_and_writes = True


# ----------------------------------------------------------------------------------------
# The greedy choice: argmax over the vocabulary in one launch
#
# A draft step ends in an argmax over ~50k-128k logits of each row, γ times a step. Reduced
# by one program (or a few), one long row is a chain of dependent loads; cut into chunks of
# BLOCK, every program reduces its chunk at once and leaves its max and first index, and the
# row's last program to finish (an atomic counter, as in the attention's merge) picks the
# first of the largest. The chunks are in index order, so that is the row's first maximum.


def argmax_reference(x: torch.Tensor, ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [..., V] -> int64 [...]: the first index of each row's largest entry; with ids (int64
    [V]), ids at that index (x's entries are scores of the tokens ids lists)."""
    best = x.argmax(-1)
    return best if ids is None else ids[best]


@triton.jit
def _argmax_kernel(x_ptr, val_ptr, idx_ptr, lock_ptr, out_ptr, ids_ptr, n, stride_row, stride_out, n_chunks,
                   BLOCK: tl.constexpr, CHUNKS_POW2: tl.constexpr, HAS_IDS: tl.constexpr):
    row, chunk = tl.program_id(0), tl.program_id(1)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride_row + offs, mask=offs < n, other=float("-inf")).to(tl.float32)
    m = tl.max(x, axis=0)
    tl.store(val_ptr + row * n_chunks + chunk, m)
    tl.store(idx_ptr + row * n_chunks + chunk, tl.min(tl.where(x == m, offs, n), axis=0))
    tl.debug_barrier()  # release: this program's partial is stored before the counter moves
    arrived = tl.atomic_add(lock_ptr + row, 1, sem="acq_rel")
    if arrived == n_chunks - 1:  # the row's last program: every chunk's partial is there
        c = tl.arange(0, CHUNKS_POW2)
        v = tl.load(val_ptr + row * n_chunks + c, mask=c < n_chunks, other=float("-inf"),
                    cache_modifier=".cg")  # (.cg: other multiprocessors wrote these)
        i = tl.load(idx_ptr + row * n_chunks + c, mask=c < n_chunks, other=n, cache_modifier=".cg")
        best = tl.min(tl.where(v == tl.max(v, axis=0), i, n), axis=0)
        if HAS_IDS:  # the token the winning score stands for
            best = tl.load(ids_ptr + best)
        tl.store(out_ptr + row * stride_out, best.to(tl.int64))
        tl.store(lock_ptr + row, 0)  # ready for the next launch


def argmax(x: torch.Tensor, block: int = 2048, out=None, ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [..., V] (rows free of NaN; any strides but a contiguous last dim) -> int64 [...]: the
    first index of each row's largest entry, as `argmax_reference` (torch.argmax), in one
    launch of cdiv(V, block) programs per row. out: an int64 tensor of x's leading shape to
    write into (for a [B, V] x, any stride: a column of a token buffer, which then needs no
    copy kernel). ids: int64 [V], contiguous: return ids[index] instead (x scores the tokens
    ids lists, as a draft's head over a vocabulary subset does). Shares the attention's merge
    counters, so the same one-stream rule holds. The reference answers on a CPU without the
    interpreter."""
    *lead, n = x.shape
    if ids is not None and (ids.shape != (n,) or ids.dtype != torch.long or not ids.is_contiguous()):
        raise ValueError(f"argmax: ids must be contiguous int64 of shape ({n},), got {ids.dtype} {tuple(ids.shape)}")
    fits = out is None or (out.shape == tuple(lead) and out.dtype == torch.long
                           and (len(lead) <= 1 or out.is_contiguous()))
    if not fits:
        raise ValueError(f"argmax: out must be int64 of shape {tuple(lead)} (contiguous unless 1-D), got "
                         f"{out.dtype} {tuple(out.shape)}")
    if not _use_triton(x):
        return argmax_reference(x, ids) if out is None else out.copy_(argmax_reference(x, ids))
    if n == 0:
        raise ValueError("argmax: rows of 0 entries have no largest entry")
    rows = math.prod(lead)
    x2 = x.reshape(rows, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    flat = torch.empty(rows, device=x.device, dtype=torch.long) if out is None else out.view(rows)
    n_chunks = triton.cdiv(n, block)
    val = torch.empty((rows, n_chunks), device=x.device, dtype=torch.float32)  # each chunk's max
    idx = torch.empty((rows, n_chunks), device=x.device, dtype=torch.int32)  # and its first index
    if rows:
        _argmax_kernel[(rows, n_chunks)](x2, val, idx, _locks(x.device, rows), flat, ids, n, x2.stride(0),
                                         flat.stride(0), n_chunks, BLOCK=block,
                                         CHUNKS_POW2=triton.next_power_of_2(n_chunks), HAS_IDS=ids is not None,
                                         num_warps=4)
    return flat.reshape(lead) if out is None else out


# ----------------------------------------------------------------------------------------
# Proposals from the context itself (prompt lookup)
#
# Text repeats itself: names, phrases, and the loops a small model's greedy decoding falls
# into. Where a row's newest n tokens occurred before in its own history, the tokens that
# followed them then are a free guess at what follows now. `context_lookup` finds, for each
# row, the latest earlier occurrence of its last n tokens (ending at e < L, the newest
# token's index) and proposes hist[e + 1], hist[e + 2], ... . Where that copy would run past
# L it continues from its own proposals, which repeat with period L - e: proposal i is
# hist[e + 1 + i % (L - e)] (a loop "a b c a b c" keeps proposing "a b c ...").
# The kernel is one program per row walking the history in blocks, each position compared
# with the row's last n tokens; the latest match wins.


def context_lookup_reference(hist: torch.Tensor, lengths: torch.Tensor, n: int, count: int):
    """hist int64 [B, S] (each row's tokens), lengths [B] (the newest token's index L, so a row
    holds hist[b, :L + 1]) -> (tokens int64 [B, count], found bool [B]): after the latest
    earlier occurrence of each row's last n tokens, the count tokens that followed it (the
    copy repeating with period L - e past the newest token); zeros where none occurred."""
    B, S = hist.shape
    L = lengths.long().clamp(max=S - 1)  # [B]
    e = torch.arange(S, device=hist.device)  # [S]: candidate ends of an earlier occurrence
    match = (e[None] < L[:, None]) & (e[None] >= n - 1)  # [B, S] (so L >= n: the newest n tokens exist)
    for k in range(n):  # hist[e - k] == hist[L - k] for the n tokens
        newest = hist.gather(1, (L - k).clamp(min=0)[:, None])  # [B, 1]
        match &= hist.gather(1, (e - k).clamp(min=0).expand(B, S)) == newest
    best = torch.where(match, e[None], -1).max(1).values  # [B]: the latest, -1 if none
    found = best >= 0
    i = torch.arange(count, device=hist.device)
    src = best[:, None] + 1 + i[None] % (L - best).clamp(min=1)[:, None]  # [B, count]
    tokens = hist.gather(1, src.clamp(0, S - 1))
    return torch.where(found[:, None], tokens, 0), found


@triton.jit
def _context_lookup_kernel(hist_ptr, len_ptr, tok_ptr, found_ptr, S, stride_h, stride_t, N: tl.constexpr,
                           COUNT: tl.constexpr, COUNT_PAD: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    row = hist_ptr + b * stride_h
    L = tl.minimum(tl.load(len_ptr + b).to(tl.int32), S - 1)
    best = tl.full([], -1, tl.int32)
    for e0 in range(0, L, BLOCK):  # candidate ends e < L, a block at a time
        e = e0 + tl.arange(0, BLOCK)
        match = (e < L) & (e >= N - 1)
        for k in tl.static_range(N):
            newest = tl.load(row + tl.maximum(L - k, 0))
            match = match & (tl.load(row + e - k, mask=match, other=-1) == newest)
        best = tl.maximum(best, tl.max(tl.where(match, e, -1), axis=0))
    i = tl.arange(0, COUNT_PAD)
    found = best >= 0
    src = best + 1 + i % tl.maximum(L - best, 1)  # within hist[:L + 1], found or not
    tokens = tl.where(found, tl.load(row + src, mask=i < COUNT, other=0), 0)
    tl.store(tok_ptr + b * stride_t + i, tokens, mask=i < COUNT)
    tl.store(found_ptr + b, found)


def context_lookup(hist: torch.Tensor, lengths: torch.Tensor, n: int, count: int, block: int = 4096,
                   tokens: Optional[torch.Tensor] = None, found: Optional[torch.Tensor] = None):
    """`context_lookup_reference` in one launch (a program per row, walking its history `block`
    positions at a time: two rounds at the demo model's 8192). hist: int64 [B, S],
    contiguous last dim; lengths: [B] on hist's device. tokens / found: int64 [B, count] and
    bool [B] buffers to write into (a captured graph's), else new ones. Returns (tokens, found)."""
    B, S = hist.shape
    if n < 1 or count < 1:
        raise ValueError(f"context_lookup: n and count must be >= 1, got n={n}, count={count}")
    if hist.dtype != torch.long or hist.stride(-1) != 1 or lengths.shape != (B,):
        raise ValueError(f"context_lookup: hist must be int64 [B, S] with a contiguous last dim and lengths [B], "
                         f"got {hist.dtype} {tuple(hist.shape)} and {tuple(lengths.shape)}")
    tokens = torch.empty(B, count, dtype=torch.long, device=hist.device) if tokens is None else tokens
    found = torch.empty(B, dtype=torch.bool, device=hist.device) if found is None else found
    if (tokens.shape != (B, count) or tokens.dtype != torch.long or tokens.stride(-1) != 1 or found.shape != (B,)
            or found.dtype != torch.bool):
        raise ValueError(f"context_lookup: tokens must be int64 [{B}, {count}] (contiguous last dim), found bool [{B}]")
    if not _use_triton(hist):
        got, hit = context_lookup_reference(hist, lengths, n, count)
        return tokens.copy_(got), found.copy_(hit)
    if B:
        _context_lookup_kernel[(B,)](hist, lengths, tokens, found, S, hist.stride(0), tokens.stride(0), N=n,
                                     COUNT=count, COUNT_PAD=triton.next_power_of_2(count), BLOCK=block,
                                     num_warps=8)
    return tokens, found


# ----------------------------------------------------------------------------------------
# A decode step's matmuls, each in one launch with the pointwise work before it
#
# A small model's decode step multiplies one row (or a few) by each weight: SmolLM2-135M's
# largest layer weight is 3.5 MB, which the GPU reads in about a microsecond, so each matmul
# costs what its launch costs, and so do the RMSNorm and SwiGLU kernels between them. Here a
# program owns BLOCK_N output columns: it loads its [BLOCK_N, K] slice of the weight whole,
# recomputes the prologue (the residual add and RMSNorm, or SwiGLU; K entries a row, cheap to
# repeat in every program) and reduces. Three tricks:
# - Fusing the prologue removes the norm and SwiGLU launches (3 of a layer's 8).
# - The weight does not depend on the kernel before, so on Hopper and newer the launch is
#   programmatic (PDL): the program loads its weight slice *before* waiting for the previous
#   kernel (gdc_wait), overlapping the largest read with that kernel's tail (both forms
#   below, but the tensor-core form walking K in chunks, which reads them after the wait).
#   Right after its wait it releases the kernel after it (gdc_launch_dependents), which then
#   starts early too. Releasing only after one's own wait is the rule every PDL launch here
#   keeps (and Inductor's PDL kernels, which model.compile_pointwise asks for, release after a
#   wait as well): when a kernel starts, all kernels but the one just before it have finished,
#   which is what lets sparse_attention (early=) read cached keys before its wait.
# - The residual sum h + delta, which the next sublayer adds to, is written by program 0
#   alone; the others recompute it for their norm.
# Every row's prologue runs in one pass (all rows' loads in flight together); the products
# then go one row at a time (each a product and a sum across the tile), so every further row
# costs another reduction: `decode_linear_suits` keeps the kernel to at most 5 rows of small
# weights (a decode step at batch 1-5, a draft's step, a verification of up to 4 draft tokens
# at batch 1) and leaves the rest to cuBLAS and the separate kernels. `row_grid=True` launches
# the same kernel as a program per (column block, row) instead: the rows side by side, each
# program as short as a one-row call, the weight slice read once per row (from L2 after the
# first); the engine does not use it by default. A second form,
# `tensor_cores=True`, multiplies up to 16 rows at once with tl.dot, holding K whole up to
# 1024 columns and walking it in chunks beyond; the engine does not use it (on an H100, with K
# whole it beats the row-by-row form only for gate|up at 4-5 rows, by under a microsecond; in
# chunks, for the down projection, it is twice as slow as cuBLAS).
# `python bench.py --parts linear` times both against the separate kernels at 1-8 rows,
# `--parts profile` shows what a whole step runs.


def decode_linear_reference(x, weight, bias=None, delta=None, norm_weight=None, eps=1e-6, swiglu=False):
    """The prologue, then x · weightᵀ (+ bias). x [..., K] ([..., 2K] with swiglu), weight [N, K].
    delta: x = x + delta (the residual add, returned too); norm_weight: x = rms_norm(x) * norm_weight
    (mean square in fp32, as model.rms_norm); swiglu: x = silu(gate) * up, x = gate | up.
    Returns y [..., N], or (x + delta, y) with delta."""
    h = x if delta is None else x + delta
    if swiglu:
        gate, up = h.chunk(2, -1)
        h_in = F.silu(gate) * up
    elif norm_weight is not None:
        hf = h.float()
        h_in = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).type_as(h) * norm_weight
    else:
        h_in = h
    y = F.linear(h_in, weight, bias)
    return y if delta is None else (h, y)


@triton.jit
def _prologue_in(x_ptr, delta_ptr, h_ptr, r, k, mask, sx, sd, sh, dtype, write_h, ADD: tl.constexpr):
    """The input rows r [ROWS, 1] at entries k [1, KB], plus delta with ADD (rounded to `dtype`
    as the eager residual add rounds its sum, and written to h where write_h: by one program,
    once)."""
    x = tl.load(x_ptr + r * sx + k, mask=mask, other=0.0)
    if ADD:
        x = (x.to(tl.float32) + tl.load(delta_ptr + r * sd + k, mask=mask, other=0.0).to(tl.float32)).to(dtype)
        if write_h:
            tl.store(h_ptr + r * sh + k, x, mask=mask)
    return x


@triton.jit
def _squares(x):
    """Each row's sum of squares in fp32: [ROWS, KB] -> [ROWS]."""
    xf = x.to(tl.float32)
    return tl.sum(xf * xf, axis=1)


@triton.jit
def _prologue_out(x, x_ptr, g, r, k, mask, K, rstd, sx, dtype, NORM: tl.constexpr, SWIGLU: tl.constexpr):
    """What the matmul takes from _prologue_in's x: RMSNorm (rstd [ROWS] from every entry's
    _squares) times the norm's weight g [1, KB], or silu(gate) * up (x the gate, up K entries
    further); rounded to `dtype` after each step, as the eager reference rounds."""
    if NORM:
        x = ((x.to(tl.float32) * rstd[:, None]).to(dtype) * g).to(dtype)
    if SWIGLU:
        gate = x.to(tl.float32)
        up = tl.load(x_ptr + r * sx + K + k, mask=mask, other=0.0)
        x = ((gate / (1.0 + tl.exp(-gate))).to(dtype) * up).to(dtype)
    return x


@triton.jit
def _decode_linear_kernel(x_ptr, delta_ptr, norm_ptr, w_ptr, bias_ptr, y_ptr, h_ptr, N, K, eps,
                          sx, sd, sy, sh, sw, ROWS: tl.constexpr, ROWS_PAD: tl.constexpr, K_PAD: tl.constexpr,
                          BLOCK_N: tl.constexpr, ADD: tl.constexpr, NORM: tl.constexpr, SWIGLU: tl.constexpr,
                          HAS_BIAS: tl.constexpr, PDL: tl.constexpr):
    pid, row0 = tl.program_id(0), tl.program_id(1)  # row0: the row a row_grid program does (else 0)
    x_ptr += row0 * sx
    y_ptr += row0 * sy
    if ADD:
        delta_ptr += row0 * sd
        h_ptr += row0 * sh
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    r = tl.arange(0, ROWS_PAD)[:, None]  # [ROWS_PAD, 1]
    k = tl.arange(0, K_PAD)[None, :]  # [1, K_PAD]
    w = tl.load(w_ptr + n[:, None] * sw + k, mask=(n[:, None] < N) & (k < K), other=0.0)  # [BLOCK_N, K_PAD]
    bias = tl.load(bias_ptr + n, mask=n < N, other=0.0).to(tl.float32) if HAS_BIAS else None
    g = tl.load(norm_ptr + k, mask=k < K, other=0.0) if NORM else None
    if PDL:  # the weights are constant: read before the previous kernel's outputs are ready
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    dtype = y_ptr.dtype.element_ty
    # Every row's prologue in one pass, so that all rows' loads are in flight together (a
    # loop that loaded row by row would wait out the memory latency once per row).
    mask = (r < ROWS) & (k < K)
    x = _prologue_in(x_ptr, delta_ptr, h_ptr, r, k, mask, sx, sd, sh, dtype, pid == 0, ADD)  # [ROWS_PAD, K_PAD]
    rstd = tl.rsqrt(_squares(x) / K + eps) if NORM else None
    x = _prologue_out(x, x_ptr, g, r, k, mask, K, rstd, sx, dtype, NORM, SWIGLU).to(tl.float32)
    for row in tl.static_range(ROWS):  # one row at a time: a product and a sum across the tile
        x_row = tl.sum(tl.where(r == row, x, 0.0), axis=0)  # [K_PAD], picked out exactly
        y = tl.sum(w.to(tl.float32) * x_row[None, :], axis=1)  # [BLOCK_N]
        if HAS_BIAS:
            y = y + bias
        tl.store(y_ptr + row * sy + n, y.to(dtype), mask=n < N)


@triton.jit
def _decode_linear_dot_kernel(x_ptr, delta_ptr, norm_ptr, w_ptr, bias_ptr, y_ptr, h_ptr, N, K, eps,
                              sx, sd, sy, sh, sw, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              WHOLE_K: tl.constexpr, ADD: tl.constexpr, NORM: tl.constexpr, SWIGLU: tl.constexpr,
                              HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr):
    """decode_linear for several rows on the tensor cores: the rows padded to 16 (tl.dot's
    smallest tile). WHOLE_K (BLOCK_K >= K): the program's [BLOCK_N, K] weight slice is read
    before the wait, as in the row-by-row form, and one tl.dot takes every row. Otherwise K
    is walked in chunks of BLOCK_K so that no whole row or weight slice sits in registers;
    with NORM a first pass over the chunks sums each row's squares (the add included), the
    second normalizes chunk by chunk as it multiplies."""
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    r = tl.arange(0, 16)[:, None]  # [16, 1]
    kk = tl.arange(0, BLOCK_K)[None, :]  # [1, BLOCK_K]
    if WHOLE_K:  # the weights are constant: read before the previous kernel's outputs are ready
        w = tl.load(w_ptr + n[:, None] * sw + kk, mask=(n[:, None] < N) & (kk < K), other=0.0)
        g = tl.load(norm_ptr + kk, mask=kk < K, other=0.0) if NORM else None
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    dtype = y_ptr.dtype.element_ty
    rstd = None
    if WHOLE_K:
        m = (r < ROWS) & (kk < K)
        x = _prologue_in(x_ptr, delta_ptr, h_ptr, r, kk, m, sx, sd, sh, dtype, pid == 0, ADD)  # [16, BLOCK_K]
        if NORM:
            rstd = tl.rsqrt(_squares(x) / K + eps)
        x = _prologue_out(x, x_ptr, g, r, kk, m, K, rstd, sx, dtype, NORM, SWIGLU)
        acc = tl.dot(x.to(dtype), tl.trans(w.to(dtype)), input_precision=PRECISION)  # [16, BLOCK_N] fp32
    else:
        if NORM:
            squares = tl.zeros([16], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                m = (r < ROWS) & (k0 + kk < K)
                squares += _squares(_prologue_in(x_ptr, delta_ptr, h_ptr, r, k0 + kk, m, sx, sd, sh, dtype, False,
                                                 ADD))  # (the sum is written in the second pass)
            rstd = tl.rsqrt(squares / K + eps)
        acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + kk
            m = (r < ROWS) & (k < K)
            w = tl.load(w_ptr + n[:, None] * sw + k, mask=(n[:, None] < N) & (k < K), other=0.0)
            x = _prologue_in(x_ptr, delta_ptr, h_ptr, r, k, m, sx, sd, sh, dtype, pid == 0, ADD)
            g = tl.load(norm_ptr + k, mask=k < K, other=0.0) if NORM else None
            x = _prologue_out(x, x_ptr, g, r, k, m, K, rstd, sx, dtype, NORM, SWIGLU)
            acc += tl.dot(x.to(dtype), tl.trans(w.to(dtype)), input_precision=PRECISION)  # [16, BLOCK_N]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + r * sy + n[None, :], acc.to(dtype), mask=(r < ROWS) & (n[None, :] < N))


DECODE_LINEAR_ROWS = 5  # the most rows decode_linear_suits gives the kernel
DECODE_LINEAR_MAX_K = 2048  # the widest input row its programs hold whole
DECODE_LINEAR_WHOLE_K = 1024  # the widest the tensor-core form holds whole (wider: K in chunks of 256)


def decode_linear_suits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a model should run this matmul through decode_linear: a CUDA input of at most
    DECODE_LINEAR_ROWS rows and a weight of at most DECODE_LINEAR_MAX_K columns and 8M entries
    (16 MB in bf16), the latency-bound small weights of a small model's decode step. The
    larger weights (an 8B model's layers, a vocabulary head) stay with cuBLAS."""
    rows = x.numel() // x.shape[-1]
    return (HAS_TRITON and x.is_cuda and 0 < rows <= DECODE_LINEAR_ROWS
            and weight.shape[1] <= DECODE_LINEAR_MAX_K and weight.numel() <= 8 * 2 ** 20)


_PDL: dict = {}


def _pdl(device) -> bool:
    """Programmatic dependent launch: CUDA on Hopper (compute capability 9) or newer, and a
    Triton that has it (tl.extra.cuda.gdc_wait)."""
    if device.type != "cuda":
        return False
    if device not in _PDL:
        has_it = hasattr(getattr(getattr(tl, "extra", None), "cuda", None), "gdc_wait")
        _PDL[device] = has_it and torch.cuda.get_device_capability(device)[0] >= 9
    return _PDL[device]


def decode_linear(x, weight, bias=None, delta=None, norm_weight=None, eps=1e-6, swiglu=False, block_n=None,
                  num_warps=None, tensor_cores=False, block_k=None, row_grid=False):
    """decode_linear_reference in one launch (see above): for a few rows (at most 16) and
    weights of at most DECODE_LINEAR_MAX_K columns; any leading dims, a contiguous last dim.
    block_n, num_warps: output columns and warps per program (both None: one warp on 4 columns
    for one row of at most 1024 entries, else 4 warps on 8 columns, or 16 for weights over 1M
    entries; either None alone: that default).
    tensor_cores: all rows at once through tl.dot (_decode_linear_dot_kernel) instead of one
    row at a time; block_k: its K chunk (None: K whole up to DECODE_LINEAR_WHOLE_K columns,
    else 256). row_grid (the row-by-row form): a program per (column block, row), each doing
    one row's work, instead of a program per column block walking every row: as many rows
    run side by side as there are, each program as short as a one-row call's, the weight
    slice read once per row (after the first, from L2). `python bench.py --parts linear`
    times each form and launch.
    Falls back to the reference on a CPU without the interpreter."""
    N, K = weight.shape
    rows = x.numel() // x.shape[-1]
    if swiglu and (delta is not None or norm_weight is not None):
        raise ValueError("decode_linear: swiglu comes alone (no delta or norm_weight)")
    if not _use_triton(x):
        return decode_linear_reference(x, weight, bias, delta, norm_weight, eps, swiglu)
    if tensor_cores and row_grid:
        raise ValueError("decode_linear: row_grid is a launch of the row-by-row form, not of tensor_cores")
    if block_k is not None and (block_k < 16 or block_k & (block_k - 1)):
        raise ValueError(f"decode_linear: block_k must be a power of 2 of at least 16, got {block_k}")
    if x.shape[-1] != (2 * K if swiglu else K) or rows > 16 or K > DECODE_LINEAR_MAX_K:
        raise ValueError(f"decode_linear: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not fit (need "
                         f"x's last dim {'2K' if swiglu else 'K'}, at most 16 rows, K <= {DECODE_LINEAR_MAX_K})")
    x2 = x.reshape(rows, x.shape[-1])
    d2 = delta.reshape(rows, K) if delta is not None else None
    if x2.stride(-1) != 1 or weight.stride(-1) != 1 or (d2 is not None and d2.stride(-1) != 1):
        raise ValueError("decode_linear: x, delta and weight need a contiguous last dim")
    y = torch.empty((rows, N), device=x.device, dtype=x.dtype)
    h = torch.empty((rows, K), device=x.device, dtype=x.dtype) if delta is not None else None
    pdl = _pdl(x.device)
    args = (x2, d2, norm_weight, weight, bias, y, h, N, K, eps, x2.stride(0), d2.stride(0) if d2 is not None else 0,
            y.stride(0), K, weight.stride(0))
    if block_n is None and num_warps is None and not tensor_cores and (rows == 1 or row_grid) and K <= 1024:
        # One short row (a plain or draft step): one warp on 4 columns keeps the sum over K within
        # the warp (shuffles, no shared-memory round trip across warps) and spreads the weight's
        # reads over 4x the programs. Timed alone it also wins at 2-3 rows, yet a whole verify
        # step at 3 rows runs slower with it; wider rows (K 1536) overflow one warp's registers
        # (`python bench.py --parts linear`, launch table; `--parts profile --gamma 2`).
        block_n, num_warps = 4, 1
    common = dict(ADD=delta is not None, NORM=norm_weight is not None, SWIGLU=swiglu, HAS_BIAS=bias is not None,
                  PDL=pdl, num_warps=num_warps or 4, **({"launch_pdl": True} if pdl else {}))
    if tensor_cores:
        block_n = max(16, block_n or 16)
        block_k = block_k or max(16, triton.next_power_of_2(K) if K <= DECODE_LINEAR_WHOLE_K else 256)
        _decode_linear_dot_kernel[(triton.cdiv(N, block_n),)](
            *args, ROWS=rows, BLOCK_N=block_n, BLOCK_K=block_k, WHOLE_K=block_k >= K,
            PRECISION="ieee" if x.dtype == torch.float32 else "tf32", **common)
    else:
        block_n = block_n or (16 if weight.numel() > 2 ** 20 else 8)
        per_program = 1 if row_grid else rows  # rows each program walks
        _decode_linear_kernel[(triton.cdiv(N, block_n), rows // per_program)](
            *args, ROWS=per_program, ROWS_PAD=triton.next_power_of_2(per_program), K_PAD=triton.next_power_of_2(K),
            BLOCK_N=block_n, **common)
    y = y.reshape(*x.shape[:-1], N)
    return y if delta is None else (h.reshape(*x.shape[:-1], K), y)


# ----------------------------------------------------------------------------------------
# Checks (tests, and python kernels.py --check on a GPU)


def random_selection(B, Hkv, S, frac, device="cpu", generator=None, shuffled=False):
    """A compacted selection (idx int32 [B, Hkv, S], count int32 [B, Hkv]) keeping every position
    with probability frac, kept positions first, ascending as topp_select writes them. With
    shuffled, the kept part is in random order and the rest -7: the attention must read only
    idx[..., :count], in any order (what the tests check)."""
    keep = torch.rand(B, Hkv, S, device=device, generator=generator) < frac
    count = keep.sum(-1, dtype=torch.int32)
    order = (~keep).float()  # kept first, then dropped; within each, ascending or random
    if shuffled:
        order = order + 0.5 * torch.rand(B, Hkv, S, device=device, generator=generator)
    idx = torch.argsort(order, dim=-1, stable=True).to(torch.int32)
    if shuffled:
        idx = torch.where(torch.arange(S, device=device) < count[..., None], idx, -7)
    return idx, count


def check_topp_definition(w, keep, p, rel_tol: float):
    """Assert that `keep` [..., N] satisfies the top-p definition on w, up to rel_tol of each row's
    mass: rows with p >= 1 keep everything; rows without mass keep nothing; otherwise only
    positive entries are kept, every kept entry is strictly above every dropped one (ties are
    never split), the kept mass reaches p, and dropping the smallest kept value (with its
    ties) would fall below p. Used by the tests and by --bench."""
    n = w.shape[-1]
    x = _clean(w).double().reshape(-1, n)
    keep = keep.reshape(-1, n)
    p_rows = _p_per_row(p, w.shape[:-1], w.device).double().reshape(-1)
    total = x.sum(-1)
    kept_mass = (x * keep).sum(-1)
    smallest = torch.where(keep, x, float("inf")).min(-1, keepdim=True).values
    largest_dropped = torch.where(keep, -1.0, x).max(-1).values
    without_smallest = kept_mass - (x * (x == smallest)).sum(-1)
    partial = (~(keep & (x <= 0)).any(-1)) & (smallest.squeeze(-1) > largest_dropped) \
        & (kept_mass >= (p_rows - rel_tol) * total) & (without_smallest < (p_rows + rel_tol) * total)
    ok = torch.where(p_rows >= 1, keep.all(-1), torch.where(total == 0, ~keep.any(-1), partial))
    if not ok.all():
        r = (~ok).nonzero()[0].item()
        raise AssertionError(
            f"top-p definition violated in {(~ok).sum().item()} rows (N={n}); "
            f"row {r} (p={p_rows[r].item()}): "
            f"kept {keep[r].sum().item()}, smallest kept {smallest[r].item():.4e} vs largest dropped "
            f"{largest_dropped[r].item():.4e}, kept mass {kept_mass[r].item():.9f}, without smallest "
            f"{without_smallest[r].item():.9f}, target {p_rows[r].item() * total[r].item():.9f}")


def check_on_gpu(topp_shapes=((32, 4096), (15, 131072))):
    """The kernels against their references on the GPU, on fresh inputs: top-p at the given
    (rows, N), and the attention in bf16 (which the CPU interpreter cannot run) at awkward
    sizes and at the benchmark's own (up to 33 partials per head to merge), with and
    without the cache write (new_kv), and the draft side's last-row output and window. Raises on
    the first mismatch; `python kernels.py --check` runs it alone."""
    dev = "cuda"
    torch.manual_seed(0)
    for rows, n in topp_shapes:
        w = torch.softmax(4 * torch.randn(rows, n, device=dev), -1)
        for p in (0.5, 0.9, 0.99):
            got, ref = topp_mask(w, p), topp_mask_reference(w, p)
            if not torch.equal(got, ref):  # allowed only through fp32 summation at the cut
                check_topp_definition(w, got, p, rel_tol=1e-6)
            idx, count = topp_select(w, p)
            check_topp_definition(w, _selected_mask(idx, count, n), p, rel_tol=1e-6)
            listed = torch.arange(1, n, device=dev) < count[:, None]  # [rows, n - 1]: idx[:, 1:] in the list
            ascending = ((idx[:, 1:] > idx[:, :-1]) | ~listed).all()
            assert bool(ascending), f"top-p {rows}x{n}: indices not ascending"
        # Per-row lengths (the engine's select phase), and the union of 4 masks per row, compacted.
        lengths = torch.randint(0, n + 1, (rows,), device=dev)
        inside = _inside(lengths, w.shape, dev)
        for p in (0.5, 0.9):
            got = topp_mask(w, p, lengths)
            if not torch.equal(got, topp_mask_reference(w, p, lengths)):
                assert not (got & ~inside).any(), f"top-p {rows}x{n}: kept past a row's length"
                check_topp_definition(w * inside, got, p, rel_tol=1e-6)
        masks = torch.rand(rows, 4, n, device=dev) < 0.05
        for dense_below in (0, n // 2):  # rows shorter than dense_below list every position they hold
            idx, count = union_select(masks, lengths, dense_below)
            ref_idx, ref_count = union_select_reference(masks, lengths, dense_below)
            listed = torch.arange(n, device=dev) < ref_count[:, None]
            assert torch.equal(count, ref_count) and torch.equal(torch.where(listed, idx, -1), ref_idx), \
                f"union_select {rows}x4x{n}, dense below {dense_below}: differs from the reference"
    # The greedy argmax at vocabulary sizes, bf16 logits, a tie across chunks (the first wins).
    for rows, V in ((1, 49152), (64, 49152), (5, 128256), (3, 4099)):
        x = torch.randn(rows, V, device=dev, dtype=torch.bfloat16)
        x[0, V // 3] = x[0, V - 1] = 100.0
        assert torch.equal(argmax(x), argmax_reference(x)), f"argmax {rows}x{V}: differs from torch.argmax"
        tokens = torch.full((rows, 5), -1, device=dev, dtype=torch.long)  # out=: a strided column
        argmax(x, out=tokens[:, 3])
        assert torch.equal(tokens[:, 3], argmax_reference(x)) and (tokens[:, [0, 1, 2, 4]] == -1).all(), \
            f"argmax {rows}x{V} into a column of a token buffer: differs from torch.argmax"
        ids = torch.randperm(2 * V, device=dev)[:V]  # x scores a subset of a vocabulary twice as large
        argmax(x, out=tokens[:, 3], ids=ids)
        assert torch.equal(tokens[:, 3], argmax_reference(x, ids)), \
            f"argmax {rows}x{V} with ids: differs from ids[torch.argmax]"
    # Context lookup: histories with planted repeats, rows of every length up to the buffer's.
    for rows, S, vocab, n, count in ((1, 8193, 50, 3, 4), (64, 4099, 7, 3, 4), (5, 300, 3, 1, 7), (3, 2, 2, 2, 1)):
        hist = torch.randint(0, vocab, (rows, S), device=dev)
        if S > 100:
            hist[:, S // 2:S // 2 + 40] = hist[:, 10:50]  # a copy, so that long suffixes recur
        lengths = torch.randint(0, S, (rows,), device=dev, dtype=torch.int32)
        got, ref = context_lookup(hist, lengths, n, count), context_lookup_reference(hist, lengths, n, count)
        assert all(torch.equal(a, b) for a, b in zip(got, ref)), \
            f"context_lookup {rows}x{S}, n={n}, count={count}: differs from the reference"
    # A decode step's matmuls with each prologue, bf16: awkward sizes, SmolLM2's, a head's.
    for rows, N, K, tensor_cores in ((2, 37, 100, False), (1, 960, 576, False), (2, 3072, 576, False),
                                     (1, 576, 1536, False), (1, 49152, 576, False), (5, 960, 576, False),
                                     (3, 576, 1536, False), (5, 37, 100, True),
                                     (5, 3072, 576, True), (8, 576, 1536, True)):
        x, delta = (torch.randn(rows, K, device=dev, dtype=torch.bfloat16) for _ in range(2))
        weight = torch.randn(N, K, device=dev, dtype=torch.bfloat16) / math.sqrt(K)
        norm_weight = (1 + 0.2 * torch.randn(K, device=dev)).to(torch.bfloat16)
        for kw in (dict(), dict(bias=torch.randn(N, device=dev, dtype=torch.bfloat16)),
                   dict(delta=delta, norm_weight=norm_weight), dict(x=torch.randn(rows, 2 * K, device=dev,
                                                                                  dtype=torch.bfloat16), swiglu=True)):
            args = {"x": x, "weight": weight, **kw}
            got, ref = decode_linear(**args, tensor_cores=tensor_cores), decode_linear_reference(**args)
            if "delta" in kw:
                assert torch.equal(got[0], ref[0]), f"decode_linear {rows}x{N}x{K}: the residual sum differs"
                got, ref = got[1], ref[1]
            err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
            assert err < 1e-2, (f"decode_linear {rows}x{N}x{K} {sorted(kw)} tensor_cores={tensor_cores}: "
                                f"rel err {err:.2e}, max abs "
                                f"{(got.float() - ref.float()).abs().max().item():.2e}")
    # (B, Hq, Hkv, T, S, kept, D): awkward sizes with GQA 4 and 3, then the benchmark's shapes.
    attention_cases = ((2, 8, 2, 5, 577, 0.25, 64), (3, 9, 3, 9, 63, 1.0, 128), (2, 12, 4, 1, 4099, 0.1, 128),
                       (8, 32, 8, 5, 8192, 0.25, 128), (1, 32, 8, 8, 4099, 0.25, 128),
                       (1, 32, 8, 8, 32768, 0.1, 128), (1, 32, 8, 9, 131072, 1.0, 128))
    for B, Hq, Hkv, T, S, frac, D in attention_cases:
        q = torch.randn(B, Hq, T, D, device=dev, dtype=torch.bfloat16)
        kc = torch.randn(B, Hkv, S + T + 3, D, device=dev, dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        idx, count = random_selection(B, Hkv, S, frac, dev)
        for new_kv in (None, torch.randn(2, B, T, Hkv, D, device=dev, dtype=torch.bfloat16).transpose(2, 3)):
            kr, vr = kc.clone(), vc.clone()  # the reference's own cache (new_kv writes into it)
            got = sparse_attention(q, kc, vc, S, idx, count, new_kv=new_kv).float()
            ref = sparse_attention_reference(q, kr, vr, S, idx, count, new_kv=new_kv).float()
            err = ((got - ref).norm() / ref.norm()).item()
            assert err < 1e-2, (f"sparse attention B={B} Hq={Hq} Hkv={Hkv} T={T} S={S} kept={frac} D={D} "
                                f"new_kv={new_kv is not None}: rel err {err:.2e}, max abs "
                                f"{(got - ref).abs().max().item():.2e}")
            assert torch.equal(kc, kr) and torch.equal(vc, vr), "sparse attention: cache differs after new_kv"
    # Per-row lengths on the device (a batch whose rows accepted different numbers of tokens);
    # SmolLM2's batch-1 decode shapes: one query over many splits takes the flat merge, two the
    # row merge loading 4 partials a round trip.
    for B, Hq, Hkv, T, S, D in ((3, 9, 3, 5, 1100, 64), (4, 32, 8, 5, 9000, 128), (1, 9, 3, 1, 7900, 64),
                                (1, 9, 3, 2, 4000, 64)):
        q = torch.randn(B, Hq, T, D, device=dev, dtype=torch.bfloat16)
        kc = torch.randn(B, Hkv, S, D, device=dev, dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        lengths = torch.randint(1, S - T, (B,), device=dev, dtype=torch.int32)
        new_kv = torch.randn(2, B, Hkv, T, D, device=dev, dtype=torch.bfloat16)
        angles = (lengths[:, None] + torch.arange(T, device=dev))[..., None] * 0.37 ** torch.arange(
            D // 2, device=dev)
        angles = torch.cat([angles, angles], -1)  # [B, T, D]
        tables = (angles.cos(), angles.sin())
        every = torch.arange(S, device=dev)[:, None] * 0.37 ** torch.arange(D // 2, device=dev)
        every = torch.cat([every, every], -1)  # [S, D]: every position's angles, as the model's tables
        selections = ((None, None), random_selection(B, 1, S, 0.2, dev))
        # early: the first cached block loaded before q (a PDL launch on Hopper) and not
        for sel, rope, early in itertools.product(selections, (None, tables, (every.cos(), every.sin())),
                                                  (False, True)):
            if sel[0] is not None:  # keep only positions each row has cached
                sel = union_select_reference(_selected_mask(*sel, S)[:, :, None], lengths[:, None])
            kr, vr = kc.clone(), vc.clone()
            block = dict(new_kv=tuple(new_kv), rope=rope)
            got = sparse_attention(q, kc, vc, lengths, *sel, **block, early=early).float()
            ref = sparse_attention_reference(q, kr, vr, lengths, *sel, **block).float()
            err = ((got - ref).norm() / ref.norm()).item()
            # Unrotated keys are copied: equal. Rotated ones: the same fp32 math, up to one bf16
            # rounding where the GPU fuses a multiply-add.
            cache_err = ((kc.float() - kr.float()).abs().max() / kr.float().abs().max()).item()
            keys_ok = torch.equal(kc, kr) if rope is None else cache_err < 1e-2
            assert err < 1e-2 and keys_ok and torch.equal(vc, vr), (
                f"per-row B={B} S={S} rope={rope is not None} early={early}: rel err {err:.2e}, "
                f"keys {cache_err:.2e}")
        _, row = sparse_attention(q, kc, vc, lengths, return_last_row=True, last_row_mean=True)
        _, ref = sparse_attention_reference(q, kc, vc, lengths, return_last_row=True, last_row_mean=True)
        assert ((row - ref).abs().max() / ref.abs().max()).item() < 1e-2, f"per-row last row B={B} S={S}"
        # A draft's window (the demo draft's 512; 1 = the sink alone): the output alone, and with
        # the row over every position (the scores of all, the output over the window).
        for window in (512, 1):
            ref_out = sparse_attention_reference(q, kc, vc, lengths, window=window).float()
            out = sparse_attention(q, kc, vc, lengths, window=window).float()
            out_too, row = sparse_attention(q, kc, vc, lengths, window=window, return_last_row=True,
                                            last_row_mean=True)
            for got in (out, out_too.float()):
                err = ((got - ref_out).norm() / ref_out.norm()).item()
                assert err < 1e-2, f"window {window} B={B} S={S}: rel err {err:.2e}"
            assert ((row - ref).abs().max() / ref.abs().max()).item() < 1e-2, f"window {window} row B={B} S={S}"
    # The draft side's row (dense attention): per KV head, and averaged over all query heads.
    for B, Hq, Hkv, T, S in ((2, 12, 4, 5, 577), (3, 32, 8, 1, 8192)):
        q = torch.randn(B, Hq, T, 64, device=dev, dtype=torch.bfloat16)
        kc, vc = (torch.randn(B, Hkv, S + T, 64, device=dev, dtype=torch.bfloat16) for _ in range(2))
        for mean in (False, True):
            _, row = sparse_attention(q, kc, vc, S, return_last_row=True, last_row_mean=mean)
            _, ref = sparse_attention_reference(q, kc, vc, S, return_last_row=True, last_row_mean=mean)
            err = ((row - ref).abs().max() / ref.abs().max()).item()
            assert row.shape == ref.shape and err < 1e-2, \
                f"last row B={B} Hq={Hq} S={S} mean={mean}: max rel err {err:.2e}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="SpecAttn Triton kernels: check them against their PyTorch "
                                     "references on the GPU (bf16 attention included). "
                                     "Timing: bench.py --parts kernels")
    parser.add_argument("--check", action="store_true", help="run the check (needs a CUDA GPU)")
    if parser.parse_args().check:
        check_on_gpu()
        print("kernels match their references on the GPU")
    else:
        parser.print_help()
