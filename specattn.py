"""Speculative decoding with draft-guided sparse verification (SpecAttn).

The loop, in one picture (γ = gamma), run for every row of a batch at once:

    draft : [prev, last] -> d1 -> ... -> dγ     γ cheap draft steps, each reading the draft's
                                                trained window of its cache; SpecAttn keeps each
                                                step's attention row over the whole context (the
                                                first step's alone with combine="first", COMBINE)
    select: for target layer j, draft layer layer_map[j]'s head-averaged attention,
            cut at top-p, says which cached positions the target reads
    target: [last, d1, ..., dγ] in ONE forward  (γ+1 queries, sparse in layers >= dense_layers)
    accept: per row, the longest prefix of d1..dγ the target agrees with, plus one token of its own
    rewind: both caches forget each row's rejected positions, explicitly

`SpecEngine` runs that loop on fixed buffers with each row's cache length on the device, so on a
GPU every phase is a CUDA graph captured once (see its docstring); given more prompts than rows,
a row that finishes takes the next waiting prompt (continuous batching). `speculative_generate`
and `greedy_generate` are the functions on top. `draft_selection` turns draft attention into the
target's KV selection for teacher-forced evaluation (eval_pg19.py). Pairs and layer maps come
from calibrate.py (`load_pair`, `layer_map_for`); the attention hooks from model.py; the
kernels from kernels.py.

KV accounting, defined once: an "entry" is one (target layer, KV head, cached position) that
the target reads during a verification forward. The new block's own γ+1 positions are always
read and are not counted. Dense verification reads n_layers × n_kv_heads × past_len entries per
step and row; we report the fraction saved over all layers and over the sparse layers alone.

    python specattn.py --prompt "..." --topp 0.9            # the offline demo, batch 1
    python specattn.py --device cuda --batch 8 --context 4096
    python specattn.py --device cuda --batch 64 --requests 256 --context 7900 --modes dense,specattn
"""

from __future__ import annotations

import argparse
import functools
import gc
import itertools
import json
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Optional

import torch

import torch.nn.functional as F
from tqdm import tqdm

from calibrate import (HelpFormatter, add_pair_arguments, calibration_book, check_device, layer_map_for, load_pair,
                       parse_layers)
from demo import demo_books
from kernels import (argmax, attention_slot, check_topp, context_lookup, decode_linear, decode_linear_suits, topp_mask,
                     topp_select, union_select)
from model import (Linear, Tokenizer, Transformer, apply_rope, cache_attention, compile_pointwise, format_bytes,
                   free_memory, kv_cache_bytes, use_decode_linear, write_atomic)

# ----------------------------------------------------------------------------------------
# Draft attention -> target KV selection


# A verification block's queries are [last, d1, ..., dγ]; draft step i's attention row is
# the draft's at the query of the block's token i. "union": query t's selection is the union
# of top-p sets of rows 0..t (generation takes all γ rows for the whole block). "mean": top-p
# of those rows' mean. "first": row 0 alone, the draft's attention at the block's first
# query, for every query: the draft computes one attention row a step instead of γ (its other
# steps read only its window) and the target reads one top-p set. Query 0 is where most
# speculation is decided (every accepted token needs its agreement), and consecutive queries
# mostly attend to the same positions.
#
# What each costs and buys, measured (docs/results.md, "The first draft row alone";
# docs/performance.md, "SpecAttn reading the draft's first row alone"): teacher-forced at γ = 4
# the union buys more perplexity per KV read (both +4.4% at 57-58% of reads saved; at 80-87%
# saved the union +18.0%, the first row +42.8%). In generation the union costs the draft an
# attention row per draft token, so the γ chooser proposes fewer tokens (1.1-1.5 a step at batch
# 32-64, continuous batching); with the first row it proposes as many as dense speculation, and
# with continuous batching on one H200 SpecAttn made 1.05-1.50x dense speculation with the first
# row against 0.96-1.33x with the union. In fixed batches, which wait for their slowest row, the
# union did better: 1.06-1.61x dense speculation over 64-128 prompts on one H100, the first row
# 0.99-1.49x. So specattn.py and bench.py select from the first row where a finished row takes
# the next prompt and from the union otherwise (default_combine); SelectionConfig's default is
# the union.
COMBINE = ("union", "mean", "first")


def default_combine(continuous: bool) -> str:
    """The selection specattn.py and bench.py make unless --combine names one: the first row's
    when prompts are served by continuous batching, the union's otherwise (see COMBINE)."""
    return "first" if continuous else "union"


@dataclass
class SelectionConfig:
    topp: float = 0.9
    dense_layers: int = 2  # the first layers always read everything
    # How the draft's rows become one selection: "union" of their top-p sets, top-p of their
    # "mean", or the "first" row's top-p set alone (see COMBINE).
    combine: str = "union"
    sinks: int = 0  # always read the first `sinks` positions
    per_head: bool = False  # select per target KV head (needs draft heads == target heads)
    # Rows whose cache holds fewer positions than this verify densely: skipping reads saves
    # time only where the KV cache is a large part of what a step reads (see SpecEngine).
    sparse_from: int = 0

    def __post_init__(self):
        check_topp(self.topp)
        if self.sparse_from < 0:
            raise ValueError(f"sparse_from (positions before verification turns sparse) must be >= 0, "
                             f"got {self.sparse_from}")
        if self.combine not in COMBINE:
            raise ValueError(f"combine must be one of {', '.join(COMBINE)}, got {self.combine!r}")


def draft_selection(draft_probs: list, past_len: int, layer_map: list[int], n_kv_heads: int,
                    cfg: SelectionConfig, causal: bool = False) -> dict[int, torch.Tensor]:
    """Target layer -> bool [B, Hkv, T or 1, past_len]: the cached positions it reads.

    draft_probs: per draft layer, the draft's attention rows [B, Hd, T, >= past_len]
    (T rows: the draft's γ steps, or the scored block in eval). Only the first past_len
    keys matter: those the target has cached.
    causal=False: one selection from all T rows (verification in generation).
    causal=True: row t of the selection uses draft rows 0..t only. Teacher-forced scoring
    needs this: draft row t+1 has read token t+1, the label of query t.
    """
    per_draft_layer = {}  # several target layers often map to one draft layer: select once
    for j in range(cfg.dense_layers, len(layer_map)):
        i = layer_map[j]
        if i not in per_draft_layer:
            per_draft_layer[i] = _select_from_rows(draft_probs[i][..., :past_len], n_kv_heads, cfg, causal)
    return {j: per_draft_layer[layer_map[j]] for j in range(cfg.dense_layers, len(layer_map))}


def _select_from_rows(probs: torch.Tensor, n_kv_heads: int, cfg: SelectionConfig,
                      causal: bool) -> torch.Tensor:
    B, Hd, T, S = probs.shape
    if cfg.per_head:
        if Hd % n_kv_heads:
            raise ValueError(f"per-head selection needs draft heads ({Hd}) to group into target KV heads "
                             f"({n_kv_heads})")
        rows = probs.float().view(B, n_kv_heads, Hd // n_kv_heads, T, S).mean(2)  # [B, Hkv, T, S]
    else:
        rows = probs.float().mean(1, keepdim=True)  # [B, 1, T, S]: one selection for all heads
    if S < cfg.sparse_from:  # a context this short is read whole
        keep = torch.ones(B, rows.shape[1], T if causal else 1, S, dtype=torch.bool, device=rows.device)
    elif cfg.combine == "first":  # the block's first row serves every query (causal: row 0 precedes them all)
        keep = topp_mask(rows[:, :, :1], cfg.topp)
        keep = keep.expand(B, rows.shape[1], T, S) if causal else keep
    elif cfg.combine == "mean":  # average the rows (running average if causal), then one top-p cut
        if causal:
            rows = rows.cumsum(2) / torch.arange(1, T + 1, device=rows.device).view(1, 1, T, 1)
        else:
            rows = rows.mean(2, keepdim=True)
        keep = topp_mask(rows, cfg.topp)
    else:  # a top-p cut per row, then their union (running union if causal)
        keep = topp_mask(rows, cfg.topp)
        keep = keep.cummax(2).values if causal else keep.any(2, keepdim=True)
    if cfg.sinks:
        keep[..., :cfg.sinks] = True
    return keep.expand(B, n_kv_heads, keep.shape[2], S)


# ----------------------------------------------------------------------------------------
# The draft's attention window
#
# A draft trained on short windows drifts from the target far into a long text: what it
# predicts there rests on attention over distances it never saw. Read through the window it
# was trained on (the sink, position 0, plus the most recent positions), every forward looks
# like training again. On the demo pair at 7.9k positions dense speculation at γ = 4 then
# gains 2.17 tokens a step instead of 1.76 (docs/results.md, "The draft's attention window"). The
# window cuts only what the draft's hidden states are made of: with SpecAttn, the attention
# row a draft layer hands the target still covers every cached position (one launch scores
# every position for the row and accumulates the output over the window: kernels.sparse_attention).

PREFILL_BLOCK = 256  # a windowed prefill's forward places the sink once per this many queries
WINDOW_SCORES = 1 << 28  # the most attention scores one of window_attention's SDPA calls covers


def draft_window_of(draft: Optional[Transformer], draft_window: Optional[int] = None) -> int:
    """The window the draft reads through: draft_window, or by default (None) the one it was
    trained on, its sink_distance (0, its whole cache, for a checkpoint without one); 0 with no
    draft (plain decoding)."""
    if draft_window is not None and draft_window < 0:
        raise ValueError(f"draft_window must be >= 0 (0: the draft reads its whole cache), got {draft_window}")
    if draft is None:
        return 0
    return draft.args.sink_distance if draft_window is None else draft_window


def draft_attention_slot(window: int):
    """The attention slot of the draft's decode forwards: kernels.attention_slot reading through
    the window (0: every cached position). Each query reads position 0 (the attention sink), the
    window - 1 positions before its row's block and the block; the rows' lengths are read on the
    device, in the launch (graph-capturable, no index lists). With return_probs the row it hands
    SpecAttn still covers every cached position."""
    slot = functools.partial(attention_slot, window=window)
    slot.rotates_and_writes = True  # as attention_slot: the launch rotates q and k and writes the block
    return slot


def window_attention(window: int, model: Optional[Transformer] = None):
    """An attention slot (model.AttentionFn) for forwards of rows that all hold the same number
    of positions (a prefill, teacher-forced evaluation) through the draft's window: the query
    at position P reads position 0 and positions P - window + 1 .. P. return_probs: also the
    same queries' attention over every position (model.cache_attention's), which SpecAttn
    selects from.

    A long forward (a prefill) is cut into chunks of PREFILL_BLOCK queries, and every chunk is
    attended at once: chunk j at position s_j reads the sink and the keys s_j - window + 1 ..
    s_j + PREFILL_BLOCK - 1, gathered into one [chunks, 1 + window - 1 + PREFILL_BLOCK] key
    block per row and masked. Its work is T x (window + PREFILL_BLOCK), however long the
    context, in a fixed number of launches. With the model's sink_distance d (model given),
    each chunk reads the sink as a forward starting at s_j would (Transformer.forward's
    place_sink): position 0's key rotated to sit at s_j - d (or at 0, if that is nearer). So
    one forward of a prompt gives the cache that forwards of PREFILL_BLOCK tokens would."""
    sink_distance = model.args.sink_distance if model is not None else 0

    def attend(q, k_new, v_new, k_cache, v_cache, lengths, start, keep=None, return_probs=False):
        if start is None or keep is not None:
            raise ValueError("window_attention needs rows of one length and no selection (a draft's "
                             "prefill or teacher-forced forward)")
        B, Hq, T, D = q.shape
        dev = q.device
        C = min(PREFILL_BLOCK, T)  # queries per chunk
        n = -(-T // C)  # chunks
        first = start + C * torch.arange(n, device=dev)  # [n]: each chunk's first position
        oldest = (first - (window - 1)).clamp(min=1)  # [n]: the oldest position after 0 it reads
        key_pos = oldest[:, None] + torch.arange(window - 1 + C, device=dev)  # [n, W + C - 1]
        gather = key_pos.clamp(max=start + T - 1).flatten()  # (past the block's end: masked below)
        k = k_cache.index_select(2, gather).unflatten(2, key_pos.shape)  # [B, Hkv, n, W + C - 1, D]
        v = v_cache.index_select(2, gather).unflatten(2, key_pos.shape)
        sink_k, sink_v = k_cache[:, :, :1, None], v_cache[:, :, :1, None]  # [B, Hkv, 1, 1, D]
        if sink_distance and n > 1:  # the forward placed the sink for chunk 0; rotate it on for the rest
            at = (first - sink_distance).clamp(min=0)  # [n]
            turn = at - at[0]  # RoPE composes: rotating by a, then by b, is rotating by a + b
            sink_k = apply_rope(sink_k[:, :, 0], model.rope_cos[turn], model.rope_sin[turn])[:, :, :, None]
        k = torch.cat([sink_k.expand(-1, -1, n, -1, -1), k], 3)  # [B, Hkv, n, 1 + W + C - 1, D]
        v = torch.cat([sink_v.expand(-1, -1, n, -1, -1), v], 3)
        query_pos = first[:, None] + torch.arange(C, device=dev)  # [n, C] (the last chunk's tail: padding)
        allowed = (key_pos[:, None, :] <= query_pos[:, :, None]) & \
                  (key_pos[:, None, :] > query_pos[:, :, None] - window)  # [n, C, W + C - 1]
        allowed = F.pad(allowed, (1, 0), value=True)  # the sink column: every query reads it
        q_chunks = F.pad(q, (0, 0, 0, n * C - T)).unflatten(2, (n, C))  # [B, Hq, n, C, D]
        # chunks as batch rows, [B * n, H, ., D]; a few SDPA calls bound the scores a masked one may hold
        q_rows, k_rows, v_rows = (x.transpose(1, 2).flatten(0, 1) for x in (q_chunks, k, v))
        mask = allowed[:, None].repeat(B, 1, 1, 1)  # [B * n, 1, C, 1 + W + C - 1]
        step = max(1, WINDOW_SCORES // (Hq * mask[0].numel()))
        out = torch.cat([F.scaled_dot_product_attention(q_rows[i:i + step], k_rows[i:i + step], v_rows[i:i + step],
                                                        attn_mask=mask[i:i + step], enable_gqa=True)
                         for i in range(0, B * n, step)])
        out = out.unflatten(0, (B, n)).transpose(1, 2).flatten(2, 3)[:, :, :T]  # [B, Hq, T, D]
        probs = cache_attention(q, k_new, v_new, k_cache, v_cache, lengths, start, return_probs=True)[1] \
            if return_probs else None
        return out, probs
    return attend


def window_prefill(draft: Transformer, tokens: torch.Tensor, cache, window: int) -> None:
    """Cache tokens [B, T] (rows starting at 0) in the draft as it reads through its window:
    one forward (`window_attention`), the keys and values its windowed steps would have
    cached, with the sink placed as forwards of PREFILL_BLOCK tokens place it."""
    first = torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)  # logits: one, unused
    draft(tokens, cache=cache, logits_at=first, attend=window_attention(window, draft))


# ----------------------------------------------------------------------------------------
# Speculative decoding: the engine


@dataclass
class SpecStats:
    """What a generation did, summed over its batch rows (device counters, read once at the end)."""
    steps: int = 0  # speculative steps, summed over rows (a finished row takes no more)
    engine_steps: int = 0  # steps the engine ran: until the batch's last row finished
    accepted: int = 0  # draft tokens accepted, summed over rows and steps
    tokens: int = 0  # tokens generated, all rows
    prompts: int = 0  # prompts served (each one's first token comes from its prefill)
    kv_read: int = 0  # entries read by the target in verification (see module doc)
    kv_dense: int = 0  # entries dense verification would read
    kv_read_sparse_layers: int = 0
    kv_dense_sparse_layers: int = 0
    accepted_hist: list = field(default_factory=list)  # [γ + 1]: steps that accepted 0, 1, ..., γ tokens
    gamma_steps: list = field(default_factory=list)  # [γ + 1]: engine steps that proposed 0, 1, ..., γ tokens
    sparse_steps: int = 0  # engine steps that verified sparsely (SpecAttn)
    seconds: dict = field(default_factory=dict)  # wall time: prefill, decode; GPU time per step phase
    # run_modes(rounds=R): decode_rate of each round; two stats' lists concatenate (see __add__)
    round_rates: list = field(default_factory=list, metadata={"add": "concatenate"})

    @property
    def mean_accepted(self) -> float:
        return self.accepted / max(1, self.steps)

    @property
    def decode_rate(self) -> float:
        """Tokens per second of decoding: the tokens the steps made (not each prompt's first,
        which its prefill made) over the steps' wall time."""
        return (self.tokens - self.prompts) / max(self.seconds.get("decode", 0.0), 1e-9)

    @property
    def mean_gamma(self) -> float:
        """Draft tokens proposed per engine step (γ, or its mean with a gamma chooser)."""
        return sum(g * n for g, n in enumerate(self.gamma_steps)) / max(1, sum(self.gamma_steps))

    def __add__(self, other: "SpecStats") -> "SpecStats":
        """Two generations' stats as one (fixed batches run one after another): counts and
        seconds add up, histograms add up position by position, and a field marked
        metadata={"add": "concatenate"} (the per-round rates) lists self's then other's."""
        def add(a, b, how):
            if how == "concatenate":
                return a + b
            if isinstance(a, dict):
                return {k: a.get(k, 0.0) + b.get(k, 0.0) for k in a.keys() | b.keys()}
            if isinstance(a, list):
                return [x + y for x, y in itertools.zip_longest(a, b, fillvalue=0)]
            return a + b
        return SpecStats(**{f.name: add(getattr(self, f.name), getattr(other, f.name), f.metadata.get("add"))
                            for f in fields(self)})

    def summary(self) -> dict:
        return {
            "steps": self.steps, "mean_accepted": round(self.mean_accepted, 3),
            "mean_gamma": round(self.mean_gamma, 3),
            "tokens_per_step": round(self.mean_accepted + 1, 3),
            "sparse_steps": self.sparse_steps,
            "kv_saved_all_layers": round(1 - self.kv_read / max(1, self.kv_dense), 4),
            "kv_saved_sparse_layers": (round(1 - self.kv_read_sparse_layers / self.kv_dense_sparse_layers, 4)
                                       if self.kv_dense_sparse_layers else None),
        }


def count_kv_reads(selection: dict, n_layers: int, n_kv_heads: int, past_len: int, batch: int = 1,
                   sparse_layers=None):
    """(read all layers, dense all layers, read sparse layers, dense sparse layers) for one
    verification forward. A layer without a selection reads all Hkv × past_len entries; a
    selected layer reads what its mask [B, Hkv, T, past_len] keeps, a position counting once
    per KV head even when several of the block's queries read it. sparse_layers: the layers
    eligible for selection (default: those in `selection`). (eval_pg19.py's accounting; the
    engine counts the same entries on the device from its (idx, count) lists.)"""
    sparse_layers = set(selection) if sparse_layers is None else set(sparse_layers)
    dense_layer = batch * n_kv_heads * past_len
    read_per_layer = [int(selection[j].expand(batch, n_kv_heads, -1, -1).any(2).sum()) if j in selection
                      else dense_layer for j in range(n_layers)]
    read_sparse = sum(read_per_layer[j] for j in sparse_layers)
    return sum(read_per_layer), n_layers * dense_layer, read_sparse, len(sparse_layers) * dense_layer


def acceptance_probability(target_logits: torch.Tensor, draft_logits: torch.Tensor) -> torch.Tensor:
    """Σ_x min(p(x), q(x)) at temperature 1 for each position ([..., V] -> [...]): the
    probability that speculative sampling keeps the draft's token there (see the accept
    phase); eval_pg19.py and train_draft.py report its mean over a text."""
    p, q = target_logits.float().softmax(-1), draft_logits.float().softmax(-1)
    return torch.minimum(p, q).sum(-1)


def _sample(probs: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """One draw per row of probs [..., V] -> [...]. argmax(p / E), E ~ Exp(1) per entry, is a
    draw from p (the exponential race: entry x wins first with probability p(x)); unlike
    torch.multinomial it is a fixed set of kernels with no host check, so it can be captured."""
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(-1)


class GammaChooser:
    """Chooses γ (draft tokens to propose) for each step, from the acceptances seen so far and
    what a step costs (SpecEngine(gamma_chooser=...); on the command line by default, off with
    --fixed-gamma).

    The acceptance model: each draft token agrees with the target with probability α,
    independently, until the first disagreement. A step proposing γ tokens then gains
    k + 1 tokens (k accepted, one of the target's own) with
        E[k + 1] = 1 + α + α² + ... + α^γ = (1 - α^(γ+1)) / (1 - α),
    and takes T(γ). The step goes to the γ in 1..gamma_max with the most expected tokens per
    unit time, E[k + 1] / T(γ). α is estimated by counting: a step that accepted k < γ tokens
    saw k agreements and one disagreement, one that accepted all γ saw γ agreements (the
    next was never asked); each count decays by `decay` a step, so the estimate follows the
    text (about 1 / (1 - decay) steps of memory), pooled over the rows.

    costs=(draft, verify): T(γ) = γ·draft + verify, fixed (the choices then depend on the
    tokens alone, so runs repeat exactly). costs=None: T is measured (GPU time of the steps
    the engine ran, from each phase's CUDA events; the host clock on a CPU), a running mean per
    γ tried; a γ not tried yet is read off the least-squares line through those tried, or,
    with one tried, off that one plus the draft's measured time per token for each token more.
    A γ's first step is not timed (a first run may include one-time work: a CPU's first eager
    call at a shape, a graph's first replay): a time read too high would keep that γ from ever
    being tried again. Times measured at a shorter context read low, so a γ left aside is
    tried again as the context grows and the others' times rise.
    """

    def __init__(self, gamma_max: int, costs: Optional[tuple[float, float]] = None, decay: float = 0.9,
                 prior: tuple[float, float] = (3.0, 1.0), gamma_min: int = 1):
        if not 1 <= gamma_min <= gamma_max:
            raise ValueError(f"need 1 <= gamma_min <= gamma_max, got gamma_min={gamma_min}, gamma_max={gamma_max}")
        self.gamma_max, self.gamma_min, self.decay, self.prior = gamma_max, gamma_min, decay, prior
        self.fixed_costs = costs
        self.reset()

    def reset(self) -> None:
        self.agree, self.disagree = self.prior  # decayed counts, starting from a prior (α = 3/4)
        self.observed = 0  # steps observed
        self.step_time: dict[int, float] = {}  # γ -> running mean of a step's measured time
        self.draft_per_token: Optional[float] = None  # running mean of the draft phase's time / γ
        self.run_once: set[int] = set()  # γ whose first step has been seen (and not timed)

    @property
    def alpha(self) -> float:
        return self.agree / (self.agree + self.disagree)

    def observe(self, gamma: int, accepted: list[int], draft_s: Optional[float] = None,
                step_s: Optional[float] = None) -> None:
        """One step's evidence: it proposed `gamma`; `accepted` draft tokens per running row;
        its draft phase and whole-step times (used when costs are measured)."""
        self.observed += 1
        agreements, disagreements = self.counts(gamma, accepted)
        self.agree = self.agree * self.decay + agreements
        self.disagree = self.disagree * self.decay + disagreements
        if gamma not in self.run_once:
            self.run_once.add(gamma)
        elif draft_s is not None and step_s is not None and self.fixed_costs is None:
            mean = lambda old, new: new if old is None else 0.8 * old + 0.2 * new  # noqa: E731
            self.draft_per_token = mean(self.draft_per_token, draft_s / gamma)
            self.step_time[gamma] = mean(self.step_time.get(gamma), step_s)

    @staticmethod
    def counts(gamma: int, accepted: list[int]) -> tuple[int, int]:
        """(agreements, disagreements) a step proposing `gamma` saw, `accepted` per row: a row
        that accepted k < γ saw k and one, one that accepted all γ saw γ and none."""
        return sum(accepted), sum(k < gamma for k in accepted)

    def step_cost(self, gamma: int) -> float:
        """T(γ): the time a step proposing γ tokens is expected to take (see the class doc)."""
        if self.fixed_costs is not None:
            return gamma * self.fixed_costs[0] + self.fixed_costs[1]
        if gamma in self.step_time:
            return self.step_time[gamma]
        tried = sorted(self.step_time)
        if len(tried) == 1:
            return self.step_time[tried[0]] + (gamma - tried[0]) * self.draft_per_token
        x_mean = sum(tried) / len(tried)
        y_mean = sum(self.step_time.values()) / len(tried)
        slope = (sum((x - x_mean) * (self.step_time[x] - y_mean) for x in tried)
                 / sum((x - x_mean) ** 2 for x in tried))
        return y_mean + max(slope, 0.0) * (gamma - x_mean)  # more tokens never cost less

    @property
    def ready(self) -> bool:
        """Whether a step has been observed and, with measured costs, timed (until then
        `choose` proposes gamma_max and `best` has no rate to give)."""
        return bool(self.observed) and (self.fixed_costs is not None or bool(self.step_time))

    def best(self, alpha: Optional[float] = None) -> tuple[float, int]:
        """(expected tokens per unit time, γ) of the best γ in gamma_min..gamma_max (needs `ready`),
        at the acceptance `alpha` (None: this chooser's own estimate)."""
        a = min(self.alpha if alpha is None else alpha, 1 - 1e-6)
        rate = {g: (1 - a ** (g + 1)) / (1 - a) / self.step_cost(g)
                for g in range(self.gamma_min, self.gamma_max + 1)}
        g = max(rate, key=rate.get)
        return rate[g], g

    def choose(self, alpha: Optional[float] = None) -> int:
        """The γ for the next step (gamma_max until `ready`), at `alpha` as in `best`."""
        return self.best(alpha)[1] if self.ready else self.gamma_max

    # What SpecEngine calls (VerifyChooser's interface too): a GammaChooser leaves the variant
    # (sparse or dense verification) as the engine's sparse_from says.
    def choose_step(self, sparse_allowed: bool) -> tuple[bool, int]:
        return sparse_allowed, self.choose()

    def observe_step(self, sparse: bool, gamma: int, accepted: list[int], draft_s=None, step_s=None) -> None:
        self.observe(gamma, accepted, draft_s=draft_s, step_s=step_s)


# VerifyChooser's default sparse_margin: a sparse step must promise 20% more tokens per second than a
# dense one. Each step's acceptance and time are what the chooser sees; what a sparse step does to the
# text that follows, it does not: verifying sparsely moves the target's greedy choice at some
# positions, and from there the text repeats itself less exactly, so the lookup finds less to copy
# for the dense steps too. On the demo pair at batch 1 / 7.9k a 3% margin let SpecAttn verify sparsely
# in 85% and 42% of its steps (two runs; at 85%, its steps 12% shorter than dense speculation's) and
# make 0.90x dense speculation's tokens/s; with 20% it runs dense steps there (0.98-0.99x), and at
# batches 32-64 / 7.9k, where a sparse step is about a third shorter or more, it still verifies
# sparsely. The price: batch 8 / 7.9k (a sparse step a sixth shorter) runs dense steps too, giving up
# the 1.07-1.09x that sparse steps made there (docs/performance.md, "VerifyChooser's margin at 0.03
# and 0.2").
SPARSE_MARGIN = 0.2


class VerifyChooser:
    """Chooses, for each step of a SpecAttn engine, sparse or dense verification, and the
    step's γ (SpecEngine(gamma_chooser=...); specattn.py's default for SpecAttn, off with
    --always-sparse).

    Sparse verification pays only where the KV reads it skips outweigh what it costs: the
    draft's attention rows and the top-p cut each step, and tokens (at p < 1 the target,
    reading fewer positions, agrees with the draft a little less often). Which side wins
    depends on the batch, the context and the GPU, so it is measured, as γ is: each variant
    keeps a GammaChooser of its own (its step time per γ), and a step goes to the variant and
    γ with the most expected tokens per unit time. A variant not yet ready
    (GammaChooser.ready) runs first, sparse before dense; one left aside for `explore_every`
    steps runs once more, since its time moves as the context grows (costs measured at a
    shorter context read low, which also brings it back). Each such re-run that leaves the
    variant aside again doubles its wait, up to `explore_every * explore_backoff` steps, and a
    step it wins on its rate sets the wait back to `explore_every`: a variant that keeps losing
    costs a few steps in a long generation rather than one in every `explore_every` (a sparse
    re-run also changes the text that follows). Sparse steps must promise
    `sparse_margin` (a fraction) more tokens per unit time than dense ones: both rates are
    estimates from noisy steps, a sparse step also changes the text that follows in ways a
    step's own acceptance does not show (see SPARSE_MARGIN), and short of a clear gain the exact
    variant (dense verification loses nothing) is the one to keep.

    Acceptance is estimated so that the two variants stay comparable though they run at
    different times. How often the draft is right moves with the text, for both variants
    alike; what sparse reads change is a small, steady factor. So α is counted over every
    step, whichever variant ran it (pooled: a GammaChooser's decayed counts, with no prior,
    seeded by the first step), and each variant keeps the ratio of the agreements its own
    steps saw to those the pooled α expected of them (by Wald's identity E[agreements] =
    α · E[agreements + disagreements] for the stop-at-first-miss counts), over a long memory
    (`ratio_decay` per own step, from `ratio_prior` pseudo-trials at ratio 1). A variant's
    α = pooled α × its ratio: a variant kept aside follows the text through the other's
    steps instead of keeping the α of the text it last saw.

    costs: {sparse: (draft, verify)} per variant (fixed costs, see GammaChooser: the choices
    then follow the tokens alone); None: measured. Sparse steps are allowed only where the
    engine allows them (its sparse_from). Where dense steps win, SpecAttn's generation is
    dense speculation's, and its KV reads saved fall accordingly.
    """

    def __init__(self, gamma_max: int, costs: Optional[dict] = None, explore_every: int = 32,
                 gamma_min: int = 1, sparse_margin: float = SPARSE_MARGIN, ratio_decay: float = 0.98,
                 ratio_prior: float = 8.0, explore_backoff: int = 8):
        if explore_every < 1 or explore_backoff < 1:
            raise ValueError(f"explore_every and explore_backoff must be >= 1, got {explore_every} and "
                             f"{explore_backoff}")
        if not sparse_margin >= 0:  # (NaN too)
            raise ValueError(f"sparse_margin must be >= 0, got {sparse_margin}")
        if not (0 < ratio_decay <= 1 and ratio_prior > 0):
            raise ValueError(f"need 0 < ratio_decay <= 1 and ratio_prior > 0, got ratio_decay={ratio_decay}, "
                             f"ratio_prior={ratio_prior}")
        self.gamma_max, self.gamma_min, self.explore_every = gamma_max, gamma_min, explore_every
        self.explore_backoff = explore_backoff
        self.sparse_margin, self.ratio_decay, self.ratio_prior = sparse_margin, ratio_decay, ratio_prior
        self.pooled = GammaChooser(gamma_max, costs=(0.0, 1.0), prior=(0.0, 0.0))  # every step's counts, for α
        self.variants = {sparse: GammaChooser(gamma_max, costs=costs[sparse] if costs else None,
                                              gamma_min=gamma_min) for sparse in (True, False)}
        self.reset()

    def reset(self) -> None:
        for chooser in (self.pooled, *self.variants.values()):
            chooser.reset()
        self.steps = 0  # steps chosen
        self.last_run = {True: 0, False: 0}  # the step each variant last ran (0: never)
        self.wait = {True: self.explore_every, False: self.explore_every}  # steps aside before a re-run
        # per variant: decayed agreements seen on its steps, and those the pooled α expected
        self.agreed = {True: self.ratio_prior, False: self.ratio_prior}
        self.agreed_expected = dict(self.agreed)

    def alpha(self, sparse: bool) -> float:
        """The variant's acceptance now: the pooled α × the variant's ratio (see the class doc);
        before any step, the GammaChooser's prior."""
        if not self.pooled.observed:
            return self.variants[sparse].alpha
        return min(self.pooled.alpha * self.agreed[sparse] / self.agreed_expected[sparse], 1 - 1e-6)

    def rate(self, sparse: bool) -> tuple[float, int]:
        """(expected tokens per unit time, γ) of the variant's best γ (needs its `ready`)."""
        return self.variants[sparse].best(self.alpha(sparse))

    def choose_step(self, sparse_allowed: bool) -> tuple[bool, int]:
        """(sparse, γ) for the next step."""
        self.steps += 1
        if not sparse_allowed:
            sparse = False
        else:
            waiting = [s for s in (True, False) if not self.variants[s].ready
                       or self.steps - self.last_run[s] > self.wait[s]]
            if waiting:
                sparse = waiting[0]
                if self.variants[sparse].ready:  # a re-run: the next waits twice as long unless this one wins
                    self.wait[sparse] = min(2 * self.wait[sparse], self.explore_every * self.explore_backoff)
            else:
                sparse = self.rate(True)[0] > (1 + self.sparse_margin) * self.rate(False)[0]
                self.wait[sparse] = self.explore_every
        self.last_run[sparse] = self.steps
        return sparse, self.variants[sparse].choose(self.alpha(sparse))

    def observe_step(self, sparse: bool, gamma: int, accepted: list[int], draft_s=None, step_s=None) -> None:
        """One step's evidence (see GammaChooser.observe): its counts go to the pooled α and, against
        what that α expected of them, to the variant's ratio; its times to the variant it ran."""
        agreements, disagreements = GammaChooser.counts(gamma, accepted)
        trials = agreements + disagreements
        if trials:
            if self.pooled.observed:  # the first step only seeds the pool: no prior to compare against
                decay = self.ratio_decay
                self.agreed[sparse] = self.agreed[sparse] * decay + agreements
                self.agreed_expected[sparse] = self.agreed_expected[sparse] * decay + self.pooled.alpha * trials
            self.pooled.observe(gamma, accepted)
        self.variants[sparse].observe(gamma, accepted, draft_s=draft_s, step_s=step_s)


class SpecEngine:
    """Speculative decoding of a batch, on fixed buffers, one step as four phases.

    A step is  draft (γ draft forwards; with SpecAttn the first, or each, keeps its attention
    row, see COMBINE) -> select (top-p on those rows: the target's reading list) -> verify
    (one target forward of γ + 1 tokens) -> accept (how many draft tokens each row keeps;
    explicit rewind of both caches). Every phase reads and writes only tensors the engine
    owns, sized once for (batch, γ, max_len), and each batch row's cache length lives on the
    device. So on CUDA each phase is captured once as a CUDA graph and replayed for every
    later step, however the rows grow (no recapture, no recompilation); on a CPU the same
    phase functions run eagerly, with the PyTorch references inside `kernels.attention_slot`.

    Row state between steps (b: batch row): the target cache holds lengths[b] positions;
    `prev[b]` is the token at the last of them, `last[b]` the newest token, in no cache yet.
    The draft cache holds one position fewer than the target's and reads [prev, last]
    first (re-reading prev costs nothing extra in a 2-token step and gives every row one
    shape whether or not the draft saw the last accepted token).

    draft=None is plain decoding through the same engine: the step is a 1-token target
    forward and the accept phase emits its choice. use_specattn=True (needs layer_map and a
    selection with topp < 1) makes verification read the draft-selected positions only.

    Short rows verify densely (selection.sparse_from): skipping reads pays only where the KV
    cache is a large part of a step's reads, while asking the draft for its attention rows
    and cutting them costs the same at any length. On the device the select phase gives a
    row below sparse_from every cached position. On the host, `generate` knows a bound on
    every row's length (its prompt, the tokens it had a step ago, γ + 1 a step); while no
    running row can have reached sparse_from, the step is dense speculation's step (no
    attention rows, no select phase): the same tokens, without the draft rows' cost. Both
    variants are captured at the first step, so switching never captures.

    draft_window: the draft reads its cache through this window (see `draft_attention_slot`):
    position 0 and the most recent positions, in the prefill and every draft step (0: all of
    it). None: the window the draft was trained on (its sink_distance, the demo draft's 512;
    0 for a checkpoint that has none). The target never reads through it, so greedy output
    is still the target's own.

    draft_vocab: the token ids the draft may propose (None: all of them), e.g. the most
    frequent ones (`draft_vocabulary`): its head computes only their logits (`_draft_head`),
    and greedy output is still the target's own.

    lookup: n >= 1 lets a row propose from its own context (prompt lookup): where its newest
    n tokens occurred before, the step proposes the tokens that followed them then
    (`kernels.context_lookup`, the latest occurrence) instead of the draft's, which the draft
    still reads, so its cache and attention rows stay as they would be. Text repeats (names,
    phrases, and the loops a small model's greedy decoding falls into) and such a guess costs
    one small launch a step; a sampled step hands the acceptance test a q that is all on the
    looked-up token. 0: the draft alone. The engine keeps each row's tokens (`hist`) for it.

    gamma_chooser (a GammaChooser) lets each step propose g <= γ draft tokens: the draft loop,
    the select phase's rows, the verify block and the accept phase read the first g; one set
    of phase graphs per g, all captured at the first step. `generate` asks the chooser for
    each step's g and hands it what each step accepted and how long it took. A VerifyChooser
    (SpecAttn only) also chooses whether the step verifies sparsely or densely (both variants
    captured), where sparse_from allows sparse steps.

    compile_accept (default: with CUDA graphs) runs the accept phase through torch.compile:
    it is ~30 element-wise ops on [B, γ + 1] tensors, one tiny kernel each in eager PyTorch,
    which Inductor fuses into a few (then captured in the phase's graph like the rest).
    Greedy, the phase is integer ops and the compiled one gives exactly the eager one's tokens;
    sampling draws from the engine's generator outside the fused kernels (Dynamo leaves calls
    that take a generator to eager PyTorch), on probabilities the fused kernels compute.
    """

    def __init__(self, target: Transformer, draft: Optional[Transformer], *, batch_size: int, max_len: int,
                 gamma: int = 4, temperature: float = 0.0, layer_map=None,
                 selection: Optional[SelectionConfig] = None, use_specattn: bool = False,
                 eos_id: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 cuda_graphs: Optional[bool] = None, compile_accept: Optional[bool] = None,
                 gamma_chooser: Optional[GammaChooser] = None, draft_window: Optional[int] = None,
                 draft_vocab=None, lookup: int = 0):
        if draft is not None and gamma < 1:
            raise ValueError(f"gamma (draft tokens per step) must be >= 1, got {gamma}")
        if gamma_chooser is not None and (draft is None or gamma_chooser.gamma_max != gamma):
            raise ValueError(f"a gamma_chooser needs a draft and gamma_max == gamma ({gamma})")
        if isinstance(gamma_chooser, VerifyChooser) and not use_specattn:
            raise ValueError("a VerifyChooser chooses between sparse and dense verification: it needs SpecAttn "
                             "(use_specattn=True)")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if lookup < 0 or (lookup and draft is None):
            raise ValueError(f"lookup (how many newest tokens a context match needs) must be >= 0, and 0 without "
                             f"a draft; got {lookup}")
        if use_specattn and (draft is None or layer_map is None):
            raise ValueError("SpecAttn needs a draft and a layer map (see calibrate.py)")
        self.cfg = selection or SelectionConfig()
        if use_specattn and self.cfg.per_head:
            raise ValueError("per-head selection is an evaluation option (eval_pg19.py); "
                             "generation selects once per layer")
        self.target, self.draft = target, draft
        self.gamma = gamma if draft is not None else 0  # the most draft tokens a step proposes: buffer sizes
        self.g = self.gamma  # what this step proposes (`gamma_chooser` sets it per step in generate)
        self.chooser = gamma_chooser
        self.temperature, self.eos_id, self.generator = temperature, eos_id, generator
        self.use_specattn = use_specattn
        self.sparse_now = use_specattn  # the host's choice for the next step (see `generate`)
        self.B, self.max_len = batch_size, max_len
        device = target.output.weight.device
        self.device = device
        self.cuda_graphs = device.type == "cuda" if cuda_graphs is None else cuda_graphs
        # An engine dropped since the last capture was frozen with everything else (see `step`),
        # and the collector never frees frozen objects: unfreeze, so the memory check below and
        # this engine's own capture can free what is no longer referenced.
        gc.unfreeze()
        check_engine_memory(target, draft, batch_size, max_len, self.gamma, temperature)
        self.t_cache = target.new_cache(batch_size=batch_size, max_len=max_len)
        self.d_cache = draft.new_cache(batch_size=batch_size, max_len=max_len) if draft is not None else None
        # The draft's attention window (0: it reads its whole cache), by default the window it
        # was trained on (see `draft_attention_slot`).
        self.window = draft_window_of(draft, draft_window)
        self.draft_attend = draft_attention_slot(self.window)
        self.draft_vocab, self.draft_head = self._draft_head(draft_vocab, device)
        # The host's bound on any row's length: the engine sized the buffers, so it holds
        # (a row stops at max_new_tokens, at most γ + 1 positions before the end).
        self._bound = max_len - (self.gamma + 2)
        B, G, V = batch_size, self.gamma, target.args.vocab_size
        i64 = dict(device=device, dtype=torch.long)
        self.prev, self.last = torch.zeros(B, **i64), torch.zeros(B, **i64)
        self.drafted = torch.zeros(B, G, **i64)  # [B, γ]
        self.q_dists = torch.zeros(B, G, V, device=device) if temperature > 0 and G else None  # draft's q
        self.out = torch.zeros(B, max_len, **i64)  # [B, tokens]: each row's new tokens
        # Prompt lookup: each row's tokens by position (its newest, `last`, at index lengths[b]),
        # the proposals found in them and whether a row found any.
        self.lookup = lookup
        self.hist = torch.zeros(B, max_len + 1, **i64) if lookup else None  # [B, positions]
        self.looked = torch.zeros(B, G, **i64) if lookup else None  # [B, γ]
        self.found = torch.zeros(B, device=device, dtype=torch.bool) if lookup else None  # [B]
        self.n_out = torch.zeros(B, **i64)
        self.max_new = torch.zeros((), **i64)
        self.done = torch.ones(B, device=device, dtype=torch.bool)
        # Counters per row: steps, accepted, kv_read, kv_dense, kv_read_sparse, kv_dense_sparse, then
        # how many steps accepted 0, 1, ..., γ draft tokens.
        self.counters = torch.zeros(6 + G + 1, B, **i64)
        if use_specattn:
            n_t = target.args.n_layers
            self.layer_map = list(layer_map)
            if len(self.layer_map) != n_t:
                raise ValueError(f"layer map has {len(self.layer_map)} entries; the target has {n_t} layers")
            sparse = range(self.cfg.dense_layers, n_t)
            # The draft layers the sparse target layers read: one contiguous range (the map is monotone,
            # calibrate.py), selected in one topp call; `uses[u]` target layers read draft layer first + u.
            self.first_used = min(self.layer_map[j] for j in sparse)
            n_used = max(self.layer_map[j] for j in sparse) - self.first_used + 1
            self.uses = torch.zeros(n_used, **i64)
            for j in sparse:
                self.uses[self.layer_map[j] - self.first_used] += 1
            n_rows = 1 if self.cfg.combine == "first" else G  # draft steps that keep their attention row
            self.draft_rows = torch.zeros(n_used, B, n_rows, max_len, device=device)  # [used, B, γ or 1, S]
        # What the host reads after each step: [done, tokens so far (at most max_new)] per row.
        self.flags = torch.zeros(2, B, **i64)
        self.graphs: dict = {}
        self.captures = 0  # CUDA graphs captured (a test checks it stays at one per phase)
        self.phase_events: list = []  # per timed step: (phase names, their marks, γ proposed)
        self._accept = self._accept_phase
        if self.cuda_graphs if compile_accept is None else compile_accept:
            # Engines of other sizes recompile once, then share a graph with dynamic sizes; the
            # limit only needs to stay above the few variants (γ, EOS, SpecAttn) a process makes.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self._accept = torch.compile(self._accept_phase)

    def _draft_head(self, draft_vocab, device) -> tuple[Optional[torch.Tensor], Optional[Linear]]:
        """(ids, head) for a draft proposing only the tokens draft_vocab lists: its output
        layer's rows for them, copied once. A draft step then reads that share of its largest
        weight (the demo draft's head is twice its four layers together). Lossless: the target
        verifies every token, and a sampled draft hands the acceptance test a q with no mass on
        the other tokens (see `_accept_phase`). None: the whole vocabulary."""
        if draft_vocab is None:
            return None, None
        if self.draft is None:
            raise ValueError("draft_vocab: plain decoding has no draft")
        ids = torch.as_tensor(draft_vocab, dtype=torch.long).flatten()
        vocab = shared_vocab_size(self.target, self.draft)
        if not len(ids) or ids.min() < 0 or ids.max() >= vocab or len(ids.unique()) != len(ids):
            raise ValueError(f"draft_vocab must list distinct token ids in [0, {vocab}), got {len(ids)} ids")
        if len(ids) == self.draft.args.vocab_size:  # every token: the draft's own head, no copy
            return None, None
        full = self.draft.output
        head = Linear(full.in_features, len(ids), bias=full.bias is not None, device=device,
                      dtype=full.weight.dtype).requires_grad_(False)
        ids = ids.to(device)
        with torch.no_grad():
            head.weight.copy_(full.weight[ids])  # [len(ids), dim]
            if full.bias is not None:
                head.bias.copy_(full.bias[ids])
        return ids, head

    # -- the four phases ------------------------------------------------------------------

    @property
    def sparse(self) -> bool:
        """Whether this step verifies sparsely (SpecAttn, and a row may have reached sparse_from)."""
        return self.use_specattn and self.sparse_now

    def _draft_phase(self):
        """γ draft tokens per row, greedy or sampled, or where a row's context lookup found a
        repeat, the tokens that followed it; with SpecAttn each draft step's attention row
        (combine="first": the first step's alone)."""
        self.d_cache.length = self._bound
        inp = torch.stack([self.prev, self.last], 1)  # [B, 2]: re-read prev, then the newest token
        # Greedy steps take the argmax of the logits as the head writes them (bf16 on a GPU): a
        # cast to fp32 cannot change it, and skipping it saves a kernel per forward.
        fp32 = self.temperature > 0
        if self.lookup:  # each row's guess from its own context: looked [B, γ], found [B]
            context_lookup(self.hist, self.t_cache.lengths, self.lookup, self.g, tokens=self.looked[:, :self.g],
                           found=self.found)
        for i in range(self.g):
            if self.sparse and i < self.draft_rows.shape[2]:  # (combine="first": step 0's row alone)
                used = range(self.first_used, self.first_used + len(self.draft_rows))  # layers the map reads
                logits, rows = self.draft(inp, cache=self.d_cache, return_attn=set(used), attend=self.draft_attend,
                                          fp32_logits=fp32, head=self.draft_head)
                self.draft_rows[:, :, i].copy_(torch.stack([rows[u] for u in used]))  # [B, S] per used layer
            else:
                logits = self.draft(inp, cache=self.d_cache, attend=self.draft_attend, fp32_logits=fp32,
                                    head=self.draft_head)
            logits = logits[:, -1]  # [B, V], or [B, len(draft_vocab)]: scores of the tokens it lists
            if self.temperature == 0:  # kernels.argmax: one launch, written straight into the token buffer
                tok = argmax(logits, out=self.drafted[:, i], ids=self.draft_vocab)
                if self.lookup:  # rows that found their context proposal take it
                    tok = torch.where(self.found, self.looked[:, i], tok, out=self.drafted[:, i])
            else:
                q = torch.softmax(logits / self.temperature, -1)
                pick = _sample(q, self.generator)  # [B]
                if self.draft_vocab is None:
                    self.q_dists[:, i].copy_(q)
                else:  # q over the whole vocabulary: the subset's probabilities, 0 elsewhere
                    self.q_dists[:, i].zero_().index_copy_(1, self.draft_vocab, q)
                    pick = self.draft_vocab[pick]
                if self.lookup:  # a looked-up token is proposed for certain: q is all on it
                    pick = torch.where(self.found, self.looked[:, i], pick)
                    sure = F.one_hot(pick, self.q_dists.shape[-1]).to(self.q_dists.dtype)  # [B, V]
                    self.q_dists[:, i].copy_(torch.where(self.found[:, None], sure, self.q_dists[:, i]))
                tok = self.drafted[:, i].copy_(pick)
            inp = tok[:, None]

    def _select_phase(self):
        """The draft rows -> per used draft layer, the cached positions the target reads,
        compacted (idx [used, B, S], count [used, B]). Only the target's cached positions
        count: the rows' entries at and past each row's target length (the draft's own
        block) take no part in the top-p cut (the kernels read that length on the device).
        A row shorter than sparse_from lists every cached position."""
        cfg = self.cfg
        lengths = self.t_cache.lengths[None, :, None]  # [1, B, 1]: broadcast over used layers and rows
        rows = self.draft_rows[:, :, :self.g]  # [used, B, γ or 1, S]: this step's draft rows
        rows = rows.mean(2, keepdim=True) if cfg.combine == "mean" else rows
        if cfg.combine != "union" and not cfg.sinks and not cfg.sparse_from:  # one row's cut: one launch
            self.sel_idx, self.sel_count = topp_select(rows[:, :, 0], cfg.topp, lengths=lengths[..., 0])
            return
        keep = topp_mask(rows, cfg.topp, lengths=lengths)  # [used, B, γ or 1, S]: each row's top-p set
        if cfg.sinks:
            keep[..., :cfg.sinks] = True
        # their union, compacted (one launch); sinks only where a row has them cached; a row
        # shorter than sparse_from lists every position it holds
        self.sel_idx, self.sel_count = union_select(keep, lengths=lengths[..., 0], dense_below=cfg.sparse_from)

    def _verify_phase(self):
        """The target reads [last, d1..dγ] in one forward: logits [B, γ + 1, V]. With
        SpecAttn, sparse layers read only the selected positions; this makes verification
        approximate (the target's distribution now depends on the draft through the selection)."""
        self.t_cache.length = self._bound
        select = None
        if self.sparse:
            first, idx, count = self.first_used, self.sel_idx, self.sel_count
            select = {j: (idx[i - first][:, None], count[i - first][:, None])  # one list for every KV head
                      for j, i in enumerate(self.layer_map) if j >= self.cfg.dense_layers}
        block = torch.cat([self.last[:, None], self.drafted[:, :self.g]], 1)  # [B, γ + 1]
        self.t_logits = self.target(block, cache=self.t_cache, select=select, attend=attention_slot,
                                    fp32_logits=self.temperature > 0)  # greedy: argmax alone (_draft_phase)
        if self.temperature == 0:
            # The target's greedy choices, here rather than in the compiled accept phase: there
            # the argmax is a reduction of one program per row over V, ~3x slower than this
            # launch of cdiv(V, 2048) programs per row (`python bench.py --parts profile`).
            self.t_choice = argmax(self.t_logits)  # [B, γ + 1]

    def _accept_phase(self):
        """Keep the longest agreeing prefix of each row's draft, emit one token of the target's,
        rewind both caches by what was rejected, count."""
        G, logits, drafted = self.g, self.t_logits, self.drafted[:, :self.g]  # [B, γ + 1, V], [B, γ]
        if self.temperature == 0:  # greedy: keep d_i while it is the target's argmax
            choice = self.t_choice  # [B, γ + 1]: the target's argmax (_verify_phase)
            agree = drafted == choice[:, :G]
            candidates = choice  # what to emit after k accepted tokens
        else:
            # Sampling (Leviathan et al. 2023): keep d_i with probability min(1, p(d_i) / q(d_i));
            # at the first rejection draw from norm(max(0, p - q)). Then P(emit x) = min(p(x), q(x))
            # [accepted] + (1 - Σ min(p, q)) · max(0, p(x) - q(x)) / Σ max(0, p - q) [resampled]
            # = p(x), since Σ max(0, p - q) = 1 - Σ min(p, q). If all γ pass, the target's own
            # distribution after dγ gives one bonus token. Every position's fallback is drawn;
            # position k's is used.
            p = torch.softmax(logits / self.temperature, -1)  # [B, γ + 1, V]
            candidates = _sample(p[:, G:], self.generator)  # [B, 1]: the bonus token
            if G:
                q = self.q_dists[:, :G]
                p_d, q_d = (d.gather(-1, drafted[..., None])[..., 0] for d in (p[:, :G], q))  # [B, γ]
                u = torch.rand(p_d.shape, device=p.device, generator=self.generator)
                agree = u * q_d <= p_d
                residual = (p[:, :G] - q).clamp(min=0)
                # (where p == q the residual is empty, and never used: any distribution will do)
                residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p[:, :G])
                candidates = torch.cat([_sample(residual, self.generator), candidates], 1)  # [B, γ + 1]
            else:
                agree = drafted.bool()  # [B, 0]
        k = agree.long().cumprod(1).sum(1)  # [B]: accepted draft tokens
        new = candidates.gather(1, k[:, None])[:, 0]  # [B]
        j = torch.arange(G + 1, device=self.device)
        emitted = torch.where(j < k[:, None], F.pad(drafted, (0, 1)), new[:, None])  # [B, γ + 1]: k + 1 real
        n_new = k + 1
        active = ~self.done
        if self.eos_id is not None:  # a row ends at its first EOS
            eos = (emitted == self.eos_id) & (j <= k[:, None])
            n_new = torch.where(eos.any(1), eos.long().argmax(1) + 1, n_new)
            self.done |= eos.any(1)
        # A finished row writes past its end (never read) and stops counting.
        self.out.scatter_(1, self.n_out[:, None] + j, emitted)
        past = self.t_cache.lengths.long() - (G + 1)  # [B]: cached positions this step verified against
        if self.lookup:  # the emitted tokens follow `last` (at index past) in the row's context
            # (clamped: a capture's warm-up runs this phase twice on a state no verify has grown,
            # where a short row's past is negative; a real step's indices are 1..lengths[b])
            self.hist.scatter_(1, (past[:, None] + 1 + j).clamp(0, self.hist.shape[1] - 1), emitted)
        self.n_out += torch.where(active, n_new, 0)
        self.done |= self.n_out >= self.max_new
        # Rewind. The target cached [last, d1..dγ] and keeps [last, d1..dk]; the draft cached
        # [prev, last, d1..d(γ-1)] and keeps one position fewer than the target, so both drop
        # γ - k. A row that had finished keeps none of this step's positions.
        # A finished row's caches are then emptied (its tokens are in `out`): the steps it still
        # takes part in (the rest of a fixed batch, or the step before the host refills it)
        # attend over their own block alone, not over its whole context.
        drop = torch.where(active, G - k, G + 1).int()
        for cache in (self.t_cache, self.d_cache) if self.draft is not None else (self.t_cache,):
            cache.rewind_rows(drop)
            cache.lengths.masked_fill_(self.done, 0)
        if G:  # prev: the newest token the target keeps cached, d_k (or `last` if none was accepted)
            d_k = drafted.gather(1, (k - 1).clamp(min=0)[:, None])[:, 0]
            newest_kept = torch.where(k > 0, d_k, self.last)
            self.prev.copy_(torch.where(active, newest_kept, self.prev))
        self.last.copy_(torch.where(active, new, self.last))
        self._count(k, past, active)
        self.flags.copy_(torch.stack([self.done.long(), self.n_out.clamp(max=self.max_new)]))

    def _count(self, k: torch.Tensor, past: torch.Tensor, active: torch.Tensor) -> None:
        """Add this step to the per-row counters: k [B] accepted draft tokens, past [B] cached
        positions verified against, active [B] rows still running (see the module doc's KV
        accounting). A few element-wise ops at the end of the accept graph."""
        G, args, a = self.gamma, self.target.args, active.long()
        dense_all = args.n_layers * args.n_kv_heads * past
        dense_sparse = (args.n_layers - self.cfg.dense_layers) * args.n_kv_heads * past
        if self.sparse:
            read_sparse = args.n_kv_heads * (self.uses[:, None] * self.sel_count.long()).sum(0)
            read_all = dense_all - dense_sparse + read_sparse
        else:
            read_sparse, read_all = dense_sparse, dense_all
        step = torch.stack([torch.ones_like(k), k, read_all, dense_all, read_sparse, dense_sparse])  # [6, B]
        self.counters += torch.cat([step, F.one_hot(k, G + 1).T]) * a

    # -- running the phases -----------------------------------------------------------------

    def _phases(self, sparse: Optional[bool] = None):
        """(name, function) of a step's phases: this step's, or those of the variant `sparse`."""
        sparse = self.sparse if sparse is None else sparse
        phases = [("draft", self._draft_phase)] if self.draft is not None else []
        phases += [("select", self._select_phase)] if sparse else []
        return phases + [("verify", self._verify_phase), ("accept", self._accept)]

    def _variants(self) -> list[bool]:
        """The values `sparse` takes in this engine's steps: a set of phase graphs each."""
        both = self.cfg.sparse_from or isinstance(self.chooser, VerifyChooser)
        return [True, False] if self.use_specattn and both else [self.use_specattn]

    def _gammas(self) -> list[int]:
        """The γ a step may propose: each is a set of phase graphs (the block's shapes differ)."""
        return list(range(self.chooser.gamma_min, self.gamma + 1)) if self.chooser is not None else [self.gamma]

    def phase_graphs(self) -> int:
        """How many graphs the engine captures: one per phase of each variant and γ."""
        return len(self._gammas()) * sum(len(self._phases(sparse)) for sparse in self._variants())

    def _state(self) -> list[torch.Tensor]:
        """Every tensor a phase may change that must survive between steps."""
        state = [self.t_cache.lengths, self.prev, self.last, self.drafted, self.out, self.n_out, self.done,
                 self.counters, self.flags]
        state += [self.hist] if self.lookup else []
        return state + ([self.d_cache.lengths] if self.draft is not None else [])

    def _warm_up(self, fn) -> None:
        """Run the phase fn twice (Triton and Inductor compile, the kernels' buffers are
        allocated), then put the engine's state back as it was. fn runs on the state before
        the first step, not after the phases before it, so its indices must stay in their
        buffers there too."""
        saved = [t.clone() for t in self._state()]
        for _ in range(2):
            fn()
        for t, s in zip(self._state(), saved):
            t.copy_(s)

    def _capture(self, fn) -> torch.cuda.CUDAGraph:
        """Warm fn up on a side stream (`_warm_up`), then capture it as a graph."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._warm_up(fn)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self.generator is not None and hasattr(graph, "register_generator_state"):
            graph.register_generator_state(self.generator)  # replays draw fresh numbers from it
        with torch.cuda.graph(graph):
            fn()
        self.captures += 1
        return graph

    def step(self, timed: bool = False) -> None:
        """One speculative step for every row (replayed graphs on CUDA; eager elsewhere), the
        variant `self.sparse` says, proposing `self.g` draft tokens. No host synchronisation
        here. The first step on CUDA captures every phase of every variant and γ. timed:
        record a CUDA event after each phase."""
        if self.cuda_graphs and not self.graphs:
            now = self.sparse_now, self.g
            for sparse, g in itertools.product(self._variants(), self._gammas()):
                self.sparse_now, self.g = sparse, g  # the phase functions read them while captured
                for name, fn in self._phases():
                    self.graphs[name, sparse, g] = self._capture(fn)
            self.sparse_now, self.g = now
            # Compiling and capturing leave hundreds of thousands of long-lived Python objects.
            # Left as they are, they bring on one of the cycle collector's full passes during
            # generation, which walks every one of them: the host stalls for tenths of a second
            # while the GPU waits for the next replay. Collect once now and freeze what survives
            # (gc.freeze: the collector skips those objects from then on), as serving engines do
            # after capture. A frozen engine that is dropped is freed once gc.unfreeze() runs:
            # the next engine's constructor calls it.
            gc.collect()
            gc.freeze()
        phases = self._phases()
        events = [self._mark()] if timed else []
        for name, fn in phases:
            if self.cuda_graphs:
                self.graphs[name, self.sparse, self.g].replay()
            else:
                fn()
            if timed:
                events.append(self._mark())
        if timed:
            self.phase_events.append(([name for name, _ in phases], events, self.g))

    def _check_prompts(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        """One-line errors for prompts this engine cannot take, before any work is done."""
        lengths = [len(p) for p in prompts]
        if not lengths or min(lengths) < 1:
            raise ValueError("every prompt needs at least one token")
        if positions_needed(max(lengths), max_new_tokens, self.gamma) > self.max_len:
            raise ValueError(f"a prompt of {max(lengths)} tokens + {max_new_tokens} new tokens does not fit "
                             f"this engine's {self.max_len}-position cache; use shorter prompts or fewer "
                             f"new tokens")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        """Start every row on its prompt (see `_prefill_rows`) with clean counters."""
        if len(prompts) != self.B:
            raise ValueError(f"this engine holds {self.B} rows; got {len(prompts)} prompts")
        self._check_prompts(prompts, max_new_tokens)
        self.max_new.fill_(max_new_tokens)
        self.counters.zero_()
        self._prefill_rows(0, prompts)

    @torch.no_grad()
    def _prefill_rows(self, first_row: int, prompts: list[list[int]]) -> None:
        """Rows first_row .. first_row + len(prompts) start on these prompts, the other rows
        untouched: the prompts (right-padded into one batch, PyTorch attention) go into both
        caches, and each row's first token comes from the target's last prompt position. The
        row's counters are left alone (they count its steps, whatever prompt it serves)."""
        n, lengths = len(prompts), [len(p) for p in prompts]
        tokens = torch.zeros(n, max(lengths), dtype=torch.long)
        for b, p in enumerate(prompts):
            tokens[b, :len(p)] = torch.as_tensor(p, dtype=torch.long)
        tokens = tokens.to(self.device)
        last_pos = torch.tensor(lengths, device=self.device) - 1
        rows_per_chunk = max(1, 65536 // max(lengths))  # bounds the prefill's activations
        logits = []
        # The target caches the whole prompt; the draft all but its last token, `prev`, which
        # its first step reads together with `last` (see the class docstring).
        for model, cache, cached in ((self.target, self.t_cache, lengths),
                                     (self.draft, self.d_cache, [L - 1 for L in lengths])):
            if model is None:
                continue
            rows = cache.rows(first_row, first_row + n)
            rows.reset()  # these rows' lengths are 0 (views of the cache's)
            # At least the first token goes in, even where every prompt is one token and the draft
            # caches none of it: a forward from position 0 is where a cache keeps its rows' sink keys
            # (KVCache.keep_sink), and the lengths set below leave those rows empty all the same.
            width = max(max(cached), 1)
            for b0 in range(0, n, rows_per_chunk):
                b1 = b0 + rows_per_chunk
                at = last_pos[b0:b1] if model is self.target else torch.zeros_like(last_pos[b0:b1])
                if model is self.draft and self.window:
                    window_prefill(self.draft, tokens[b0:b1, :width], rows.rows(b0, b1), self.window)
                    continue
                # every row starts at 0: plain causal PyTorch attention (SDPA), right padding unread
                out = model(tokens[b0:b1, :width], cache=rows.rows(b0, b1), logits_at=at,
                            attend=cache_attention)
                if model is self.target:
                    logits.append(out[:, 0])
            rows.lengths.copy_(torch.as_tensor(cached, dtype=torch.int32))
            cache.set_lengths(cache.lengths.tolist())  # the host's bound over every row
        first = self._first_token(torch.cat(logits))  # [n]
        r = slice(first_row, first_row + n)
        if self.lookup:  # the row's context: its prompt, then its first token at index len(prompt)
            self.hist[r, :tokens.shape[1]] = tokens
            self.hist[r].scatter_(1, last_pos[:, None] + 1, first[:, None])
        self.prev[r] = tokens.gather(1, last_pos[:, None])[:, 0]
        self.last[r] = first
        self.out[r, 0] = first
        self.n_out[r] = 1
        done = first == self.eos_id if self.eos_id is not None else torch.zeros_like(self.done[r])
        self.done[r] = done | (self.n_out[r] >= self.max_new)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, progress: bool = False,
                 refill: bool = True, reset_chooser: bool = True):
        """New tokens for each prompt (a list per prompt, each stopping at its EOS or
        max_new_tokens) and the SpecStats. With more prompts than the engine has rows, the
        first B start and each row that finishes takes the next waiting prompt (`_prefill_rows`
        for that row alone, eager), so while prompts wait a row idles for one step at most (the
        step below that the host runs before it sees the row finished): continuous batching.
        refill=False: fixed batches instead, B prompts at a time, each batch running until its
        last row is done before the next starts (the stats are their sum, the gamma chooser
        goes on from batch to batch; len(prompts) must be a multiple of B).
        reset_chooser=False: the gamma chooser goes on from what it learnt in the engine's last
        generation (its acceptance, its step times) instead of starting over, as if these
        prompts had been waiting in the same generation.

        The host runs one step ahead of what it knows. After queueing step t + 1 it waits for
        step t's `done` flags and token counts alone (copied to pinned host memory when step t
        ended): the one host synchronisation per step, made while step t + 1 runs, so the GPU
        waits for the host only if the host's work per step outlasts a step. So a row is seen
        to finish one step late; that step changes nothing in a finished row (the accept phase
        rewinds it, and a finished row's caches stay empty: see `_accept_phase`), and the
        engine runs one step more than the rows need. A step on which rows finish also reads
        their tokens.

        The same flags bound each row's length for SpecAttn's sparse_from: a row's target
        cache holds its prompt + n_out - 1 positions, and each step adds at most γ + 1 to
        n_out, so when step t + 1 is queued, knowing n_out after step t - 1, a row holds at
        most prompt + n_out + γ positions.

        With a gamma_chooser the host also reads, from the same flags, how many tokens each
        running row gained in step t - 1 (accepted + 1), and that step's phase times from its
        events (complete once the host has synchronised on them), and chooses step t + 1's γ."""
        if len(prompts) < self.B:
            raise ValueError(f"this engine holds {self.B} rows; got {len(prompts)} prompts")
        self._check_prompts(prompts, max_new_tokens)  # the waiting ones too, before any is run
        if not refill and len(prompts) > self.B:
            if len(prompts) % self.B:
                raise ValueError(f"fixed batches of {self.B} rows need a multiple of {self.B} prompts, "
                                 f"got {len(prompts)}")
            runs = [self.generate(prompts[i:i + self.B], max_new_tokens, progress,
                                  reset_chooser=reset_chooser and i == 0)
                    for i in range(0, len(prompts), self.B)]
            return [ids for outputs, _ in runs for ids in outputs], sum((st for _, st in runs[1:]), runs[0][1])
        t0 = time.perf_counter()
        self.prefill(prompts[:self.B], max_new_tokens)
        self.phase_events = []
        _sync(self.device)
        t1 = time.perf_counter()
        serving = list(range(self.B))  # serving[b]: the prompt row b generates for (None: idle)
        waiting = list(range(self.B, len(prompts)))
        outputs: list = [None] * len(prompts)
        refill_s = 0.0
        # Each step's [done, n_out] lands in one of two pinned host buffers, read a step later.
        flags = [torch.zeros(2, self.B, dtype=torch.long, pin_memory=self.device.type == "cuda")
                 for _ in range(2)]
        in_flight = None  # (flags buffer, step number, event) of the step queued before the newest
        started = [0] * self.B  # step at which row b's prompt started: flags of earlier steps are not its own
        n_seen = [1] * self.B  # row b's n_out in the newest flags of its prompt that the host has read
        if self.chooser is not None and reset_chooser:
            self.chooser.reset()
        bar = tqdm(total=len(prompts) * max_new_tokens, unit="tok", disable=not progress, leave=False)
        while any(i is not None for i in serving):  # every step emits >= 1 token per running row
            sparse_allowed = self.use_specattn
            if self.use_specattn and self.cfg.sparse_from:  # dense steps while every running row is short
                longest = max(len(prompts[i]) + n_seen[b] + self.gamma for b, i in enumerate(serving)
                              if i is not None)
                sparse_allowed = longest >= self.cfg.sparse_from
            self.sparse_now = sparse_allowed
            if self.chooser is not None:
                self.sparse_now, self.g = self.chooser.choose_step(sparse_allowed)
            self.step(timed=True)
            step = len(self.phase_events)  # steps queued so far; this one is `step`
            buf = flags[step % 2]
            buf.copy_(self.flags, non_blocking=True)
            queued = (buf, step, self._mark())
            if in_flight is None:  # the first step: queue the next before looking
                in_flight = queued
                continue
            (buf, seen_step, event), in_flight = in_flight, queued
            if self.device.type == "cuda":
                event.synchronize()  # the step's one host synchronisation: step seen_step is done
            done, n_out = buf.tolist()
            current = [serving[b] is not None and seen_step > started[b] for b in range(self.B)]
            if self.chooser is not None:  # rows that ran step seen_step and did not stop in it
                self._observe(seen_step, [n_out[b] - n_seen[b] - 1 for b in range(self.B)
                                          if current[b] and not done[b]])
            n_seen = [n if current[b] else n_seen[b] for b, n in enumerate(n_out)]
            finished = [b for b in range(self.B) if done[b] and current[b]]
            if finished:
                for b, row in zip(finished, self.out[finished].tolist()):
                    outputs[serving[b]], serving[b] = row[:n_out[b]], None
            bar.update(sum(len(o) for o in outputs if o is not None)
                       + sum(n for b, n in enumerate(n_out) if current[b] and serving[b] is not None) - bar.n)
            if finished and waiting:
                t_refill = time.perf_counter()
                for b in finished[:len(waiting)]:
                    serving[b] = waiting.pop(0)
                    started[b] = step  # the step in flight ran before this prompt was in the row
                    n_seen[b] = 1
                    self._prefill_rows(b, [prompts[serving[b]]])
                _sync(self.device)
                refill_s += time.perf_counter() - t_refill
        bar.close()
        self.sparse_now, self.g = self.use_specattn, self.gamma
        _sync(self.device)  # the last step queued (no row needed it)
        t2 = time.perf_counter()
        c = self.counters.sum(1).tolist()
        stats = SpecStats(steps=c[0], accepted=c[1], tokens=sum(len(o) for o in outputs),
                          prompts=len(prompts), kv_read=c[2], kv_dense=c[3], kv_read_sparse_layers=c[4],
                          kv_dense_sparse_layers=c[5], accepted_hist=c[6:],
                          engine_steps=len(self.phase_events),
                          gamma_steps=[self.step_gammas.count(g) for g in range(self.gamma + 1)],
                          sparse_steps=sum("select" in names for names, _, _ in self.phase_events))
        stats.seconds = {"prefill": t1 - t0 + refill_s, "decode": t2 - t1 - refill_s, **self._phase_seconds()}
        return outputs, stats

    @property
    def step_gammas(self) -> list[int]:
        """The γ each step of the last generation proposed."""
        return [gamma for _, _, gamma in self.phase_events]

    def _observe(self, step: int, accepted: list[int]) -> None:
        """Hand step `step` (counted from 1) to the gamma chooser: its γ, the draft tokens each
        running row accepted, its draft phase and whole-step times."""
        names, marks, gamma = self.phase_events[step - 1]
        seconds = [self._seconds(a, b) for a, b in zip(marks, marks[1:])]
        self.chooser.observe_step("select" in names, gamma, accepted, draft_s=seconds[names.index("draft")],
                                  step_s=sum(seconds))

    def _first_token(self, logits: torch.Tensor) -> torch.Tensor:
        """The target's choice after a prompt, from its last position's logits [B, V] -> [B]."""
        if self.temperature == 0:
            return logits.argmax(-1)
        return _sample(torch.softmax(logits / self.temperature, -1), self.generator)

    def _mark(self):
        """A point in the step's timeline: a CUDA event on the GPU's stream, else the host clock."""
        if self.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _seconds(self, a, b) -> float:
        """Seconds between two of `_mark`'s points (on CUDA, both recorded and complete)."""
        return a.elapsed_time(b) / 1e3 if self.device.type == "cuda" else b - a

    def _phase_seconds(self) -> dict:
        """Time per phase, summed over the steps (read after the last step)."""
        total = {name: 0.0 for name, _ in self._phases(sparse=self._variants()[0])}  # every phase it may run
        for names, marks, _ in self.phase_events:
            for name, a, b in zip(names, marks, marks[1:]):
                total[name] += self._seconds(a, b)
        return total


def use_gpu_kernels(enable: bool = True) -> None:
    """What a GPU run plugs into every model between the attention launches: the pointwise
    functions fused by torch.compile (model.compile_pointwise), and kernels.decode_linear, a
    decode step's matmul with the residual add and norm, or the SwiGLU, before it in one launch
    (model.use_decode_linear). enable=False puts the separate eager kernels back."""
    compile_pointwise(enable)
    use_decode_linear(decode_linear if enable else None, decode_linear_suits)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _as_batch(prompt_ids) -> tuple[list[list[int]], bool]:
    """A flat list of ids (one prompt) or a list of such lists -> (prompts, was one)."""
    if isinstance(prompt_ids, torch.Tensor):
        prompt_ids = prompt_ids.tolist()
    prompt_ids = list(prompt_ids)
    single = not prompt_ids or not isinstance(prompt_ids[0], (list, tuple, torch.Tensor))
    prompts = [list(map(int, p)) for p in ([prompt_ids] if single else prompt_ids)]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (an empty prompt was given)")
    return prompts, single


def positions_needed(prompt_len: int, max_new_tokens: int, gamma: int) -> int:
    """Cache positions a row needs for a prompt and its new tokens, with room for its last
    step to run past max_new_tokens and write γ + 1 positions beyond the row's end."""
    return prompt_len + max_new_tokens + 2 * gamma + 2


def engine_max_len(model: Transformer, prompts: list[list[int]], max_new_tokens: int, gamma: int) -> int:
    """The cache length a generation of these prompts needs (`positions_needed`)."""
    need = positions_needed(max(len(p) for p in prompts), max_new_tokens, gamma)
    if need > model.args.max_seq_len:
        raise ValueError(f"a prompt of {max(len(p) for p in prompts)} tokens + {max_new_tokens} new tokens "
                         f"needs {need} positions; the model has {model.args.max_seq_len}: use a shorter "
                         "prompt or fewer new tokens")
    return need


def engine_memory(target: Transformer, draft: Optional[Transformer], batch: int, max_len: int, gamma: int,
                  temperature: float) -> int:
    """Bytes a SpecEngine allocates (an upper bound): both KV caches, the draft attention rows
    SpecAttn keeps (every draft layer), the draft's distributions when sampling, and a verify
    step's logits and activations."""
    w = target.output.weight
    need = kv_cache_bytes(target.args, batch, max_len, w.dtype)
    per_token = target.args.vocab_size * 4 * 3 + target.args.hidden_dim * w.element_size() * 2
    step = (gamma + 2) * batch * per_token
    if draft is not None:
        need += kv_cache_bytes(draft.args, batch, max_len, w.dtype)
        need += 4 * draft.args.n_layers * batch * gamma * max_len  # draft rows [used, B, γ, S]
        need += 4 * batch * gamma * target.args.vocab_size if temperature > 0 else 0
    return need + step + 8 * batch * max_len


def check_engine_memory(target, draft, batch: int, max_len: int, gamma: int, temperature: float) -> None:
    """A one-line MemoryError naming a batch that fits, before an engine that would not fit allocates."""
    device = target.output.weight.device
    need, free = engine_memory(target, draft, batch, max_len, gamma, temperature), free_memory(device)
    if free is not None and need > 0.9 * free:
        # An engine no longer referenced (the one before, in a loop over modes or shapes) is part
        # of reference cycles: its caches stay allocated until the cycle collector runs.
        gc.collect()
        free = free_memory(device)
    if free is None or need <= 0.9 * free:
        return
    per_row = engine_memory(target, draft, 1, max_len, gamma, temperature)
    fits = int(0.9 * free // per_row)
    raise MemoryError(f"a batch of {batch} with {max_len}-position caches needs about {format_bytes(need)} "
                      f"and {format_bytes(free)} is free on {device}; "
                      + (f"--batch {fits} fits at this context" if fits >= 1 else "use a shorter --context"))


def make_engine(mode: str, target, draft, prompts, max_new_tokens: int, gamma: int, temperature: float,
                layer_map, selection: SelectionConfig, eos_id=None, generator=None, cuda_graphs=None,
                batch_size: Optional[int] = None, compile_accept: Optional[bool] = None,
                gamma_chooser: Optional[GammaChooser] = None, draft_window: Optional[int] = None,
                draft_vocab=None, lookup: Optional[int] = None) -> SpecEngine:
    """The engine for one of MODES, sized for these prompts: one row each, or batch_size rows
    that take the prompts in turn (continuous batching). gamma_chooser, draft_window,
    draft_vocab, lookup: speculative modes only (see SpecEngine; lookup None: LOOKUP)."""
    g = gamma if mode != "plain" else 0
    lookup = LOOKUP if lookup is None else lookup
    return SpecEngine(target, draft if mode != "plain" else None, batch_size=batch_size or len(prompts),
                      max_len=engine_max_len(target, prompts, max_new_tokens, g), gamma=g,
                      temperature=temperature, layer_map=layer_map, selection=selection,
                      use_specattn=mode == "specattn", eos_id=eos_id, generator=generator,
                      cuda_graphs=cuda_graphs, compile_accept=compile_accept,
                      gamma_chooser=gamma_chooser if mode != "plain" else None, draft_window=draft_window,
                      draft_vocab=draft_vocab if mode != "plain" else None, lookup=lookup if mode != "plain" else 0)


@torch.no_grad()
def speculative_generate(target: Transformer, draft: Transformer, prompt_ids, max_new_tokens: int,
                         gamma: int = 4, temperature: float = 0.0, topp: Optional[float] = None,
                         layer_map=None, selection: Optional[SelectionConfig] = None,
                         generator: Optional[torch.Generator] = None, eos_id: Optional[int] = None,
                         engine: Optional[SpecEngine] = None, progress: bool = False,
                         draft_window: Optional[int] = None, draft_vocab=None, lookup: Optional[int] = None):
    """Generate up to max_new_tokens after each prompt. prompt_ids: one list of ids, or a list
    of lists (a batch; rows may differ in length, and each accepts, stops and counts on its
    own). Returns (new ids: a list, or a list per row for a batch, SpecStats).

    temperature 0 is greedy: every row's output equals the target's own greedy decoding of
    it (with SpecAttn off, or topp=1), token for token in exact arithmetic and in the CPU
    tests' fp32; on a GPU a verify forward of γ + 1 tokens rounds differently from a one-token
    forward, so where the two best logits tie at the dtype's resolution the texts may part
    (README, "Generation on a GPU"). topp < 1 turns SpecAttn on (needs layer_map).
    engine: a SpecEngine to reuse (its captured graphs too); None builds one for this call.
    draft_window: see SpecEngine (None: the draft's training window). draft_vocab: the token
    ids the draft may propose (see SpecEngine; `draft_vocabulary` ranks them); None: all.
    lookup: rows propose from their own context where their newest `lookup` tokens occurred
    before (see SpecEngine; None: LOOKUP, 0: the draft alone).
    """
    prompts, single = _as_batch(prompt_ids)
    if topp is not None and layer_map is None:
        raise ValueError("SpecAttn (topp) needs a layer map: pass layer_map (see calibrate.py)")
    cfg = replace(selection or SelectionConfig(), **({"topp": topp} if topp is not None else {}))  # a copy
    if engine is None:
        mode = "specattn" if topp is not None and topp < 1 else "dense"
        engine = make_engine(mode, target, draft, prompts, max_new_tokens, gamma, temperature, layer_map, cfg,
                             eos_id, generator, draft_window=draft_window, draft_vocab=draft_vocab, lookup=lookup)
    out, stats = engine.generate(prompts, max_new_tokens, progress=progress)
    return (out[0] if single else out), stats


@torch.no_grad()
def greedy_generate(model: Transformer, prompt_ids, max_new_tokens: int, eos_id: Optional[int] = None):
    """Plain greedy decoding by the model alone, through the same engine (a 1-token verify
    step, no draft): the reference speculative decoding must equal, row by row."""
    prompts, single = _as_batch(prompt_ids)
    engine = make_engine("plain", model, None, prompts, max_new_tokens, 0, 0.0, None, SelectionConfig(),
                         eos_id)
    out, _ = engine.generate(prompts, max_new_tokens)
    return out[0] if single else out


# ----------------------------------------------------------------------------------------
# CLI


MODES = ("plain", "dense", "specattn")  # target alone; speculative, dense verification; SpecAttn
# The speculative modes' default SpecEngine.lookup: a row whose newest 3 tokens occurred before in its
# context proposes what followed them then.
LOOKUP = 3
# Generation's default for SelectionConfig.sparse_from (rows shorter than this verify densely).
# From docs/performance.md, "Why SpecAttn verifies densely below 4096 positions" (one H200,
# 2026-12-03, commit 39eaf67, batch 1, 8 prompts): sparse verification saved 0.01, 0.09 and 0.16 ms
# of verify time a step at 1k, 4k and 7.9k positions, while the draft's attention rows and the
# top-p cut added 0.06-0.07 ms a step.
SPARSE_FROM = 4096


def shared_vocab_size(target: Transformer, draft: Transformer) -> int:
    """The token ids both models score: the draft proposes among them, the target verifies."""
    return min(target.args.vocab_size, draft.args.vocab_size)


def pair_draft_vocab(tokenizer: Tokenizer, target: Transformer, draft: Transformer, size: int,
                     text=None) -> Optional[list[int]]:
    """SpecEngine's draft_vocab for a pair, as `--draft-vocab N` gives it: the `size` most
    frequent of the tokens both score (draft_vocabulary); 0, or every token of the draft's
    (as SpecEngine treats such a list): None, the draft's own head."""
    vocab_size = shared_vocab_size(target, draft)
    if not 0 <= size <= vocab_size:
        raise ValueError(f"--draft-vocab must be in 0..{vocab_size} (0: the whole vocabulary), got {size}")
    every = size == draft.args.vocab_size  # (a draft larger than the target keeps the shared tokens' head)
    return draft_vocabulary(tokenizer, size, vocab_size, text) if size and not every else None


def draft_vocabulary(tokenizer: Tokenizer, size: int, vocab_size: int, text=None) -> list[int]:
    """The `size` token ids a draft proposes from (SpecEngine's draft_vocab): the most frequent
    in `text` (a file; default the calibration book, as for the layer map), ties and tokens the
    text never uses ranked by id (a BPE vocabulary lists its earlier, more frequent merges
    first). Ascending ids. What a smaller draft vocabulary costs is the steps whose next token
    it leaves out: fewer draft tokens accepted (`python specattn.py --draft-vocab N` prints
    tokens per step beside the time a step takes)."""
    if not 1 <= size <= vocab_size:
        raise ValueError(f"the draft's vocabulary size must be in 1..{vocab_size}, got {size}")
    path = Path(text) if text is not None else calibration_book()
    counts = torch.bincount(torch.tensor(tokenizer.encode(path.read_text(encoding="utf-8"), bos=False)),
                            minlength=vocab_size)[:vocab_size]
    # a stable sort by count, most frequent first: equal counts keep their id order
    ranked = torch.sort(counts, descending=True, stable=True).indices[:size]
    return sorted(ranked.tolist())


def book_prompts(tokenizer: Tokenizer, batch: int, context: int) -> list[list[int]]:
    """`batch` prompts of `context` tokens cut from the demo books, at evenly spread offsets
    (each starting with BOS where the tokenizer adds one)."""
    books = sorted((demo_books() / "test").glob("*.txt"))
    ids = [i for book in books for i in tokenizer.encode(book.read_text(encoding="utf-8"), bos=False)]
    head = [tokenizer.bos_id] if tokenizer.add_bos else []
    n = context - len(head)
    if n < 1 or n > len(ids):
        raise ValueError(f"--context {context} must be in 1..{len(ids) + len(head)} (the demo books' tokens)")
    stride = (len(ids) - n) // max(1, batch - 1)
    return [head + ids[b * stride:b * stride + n] for b in range(batch)]


def run_modes(target, draft, prompts, max_new_tokens: int, gamma: int, temperature: float, layer_map,
              selection: SelectionConfig, modes=MODES, eos_id=None, seed: int = 0, progress: bool = False,
              warmup_tokens: int = 8, batch_size: Optional[int] = None, adaptive_gamma: bool = False,
              draft_window: Optional[int] = None, choose_verification: bool = False, refill: bool = True,
              rounds: int = 1, draft_vocab=None, lookup: Optional[int] = None,
              sparse_margin: float = SPARSE_MARGIN) -> dict:
    """Each mode's engine (batch_size rows, default one per prompt of a round): a short warm-up
    generation (captures the CUDA graphs, compiles; its wall time goes into the stats'
    seconds["warmup"]), then the timed one, serving more prompts than rows by continuous
    batching or, with refill=False, in fixed batches (SpecEngine.generate). adaptive_gamma: the
    speculative modes choose each step's γ in 1..gamma (GammaChooser, measured costs).
    choose_verification: SpecAttn's steps also choose sparse or dense verification
    (VerifyChooser with sparse_margin, measured costs; γ fixed unless adaptive_gamma).
    draft_window, draft_vocab, lookup: see SpecEngine (lookup None: LOOKUP).

    rounds=1: one mode after another, each engine freed before the next is built. rounds=R:
    the prompts are served in R equal parts, each part by every mode in turn (the modes' order
    rotating from part to part) before the next part, so that the machine's drift over the run
    (clocks, temperature, other work) falls on every mode alike; every mode's engine is built
    once and kept, its chooser going on from part to part. A mode's stats are summed over the
    parts; stats.round_rates holds its tokens/s in each part, for ratios paired by part.
    Returns {mode: (ids per prompt, SpecStats)}."""
    if rounds < 1 or len(prompts) % rounds:
        raise ValueError(f"rounds must be >= 1 and divide the {len(prompts)} prompts, got {rounds}")
    part = len(prompts) // rounds
    if batch_size and part < batch_size:
        raise ValueError(f"{rounds} rounds of {part} prompts do not fill {batch_size} batch rows; "
                         f"use at most {len(prompts) // batch_size} rounds")
    device = target.output.weight.device
    modes = list(modes)

    def build(mode):
        gen = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
        if mode == "specattn" and choose_verification:
            chooser = VerifyChooser(gamma, gamma_min=1 if adaptive_gamma else gamma, sparse_margin=sparse_margin)
        else:
            chooser = GammaChooser(gamma) if adaptive_gamma else None
        engine = make_engine(mode, target, draft, prompts, max_new_tokens, gamma, temperature, layer_map,
                             selection, eos_id, gen, batch_size=batch_size or part, gamma_chooser=chooser,
                             draft_window=draft_window, draft_vocab=draft_vocab, lookup=lookup)
        t0 = time.perf_counter()
        engine.generate(prompts[:engine.B], min(warmup_tokens, max_new_tokens))
        return engine, time.perf_counter() - t0  # generate returns after its last step is done

    engines, results = {}, {}
    for r in range(rounds):
        for mode in modes[r % len(modes):] + modes[:r % len(modes)]:
            if mode not in engines:
                engines[mode] = build(mode)
            engine, warmup_s = engines[mode]
            ids, stats = engine.generate(prompts[r * part:(r + 1) * part], max_new_tokens, progress=progress,
                                         refill=refill, reset_chooser=r == 0)
            stats.round_rates = [stats.decode_rate]
            if r == 0:
                stats.seconds["warmup"] = warmup_s
                results[mode] = ids, stats
            else:
                results[mode] = results[mode][0] + ids, results[mode][1] + stats
            if rounds == 1:  # its buffers go before the next mode's engine allocates its own
                del engines[mode], engine
    return {mode: results[mode] for mode in modes}


def results_table(results: dict, batch: int, context, prompts: Optional[int] = None,
                  sparse_from: int = 0, verification_chosen: bool = False) -> list[str]:
    """A markdown table of run_modes' results: speed, acceptance, KV reads, time per phase."""
    lines = ["| mode | batch | prompts | context | new tokens | tokens/s | vs plain | γ | tokens/step/row | "
             "steps | rows busy | sparse steps | KV reads saved | draft ms | select ms | verify ms "
             "| accept ms | prefill s | warm-up s |", "|" + "---|" * 19]
    rates = {mode: st.decode_rate for mode, (_, st) in results.items()}
    for mode, (_, st) in results.items():
        phase = [f"{st.seconds[k] / max(1, st.engine_steps) * 1e3:.3f}" if k in st.seconds else ""
                 for k in ("draft", "select", "verify", "accept")]
        vs_plain = f"{rates[mode] / rates['plain']:.2f}x" if "plain" in rates else ""
        saved = f"{st.summary()['kv_saved_all_layers']:.1%}" if mode != "plain" else ""
        sparse = f"{st.sparse_steps / max(1, st.engine_steps):.0%}" if mode.startswith("specattn") else ""
        gamma = f"{st.mean_gamma:.2f}".rstrip("0").rstrip(".") if mode != "plain" else ""
        warmup = f"{st.seconds['warmup']:.1f}" if "warmup" in st.seconds else ""
        busy = st.steps / max(1, st.engine_steps * batch)  # row-steps that served a prompt
        lines.append(f"| {mode} | {batch} | {prompts or batch} | {context} | {st.tokens} | {rates[mode]:.1f} "
                     f"| {vs_plain} | {gamma} | {st.mean_accepted + 1:.2f} | {st.engine_steps} | {busy:.0%} "
                     f"| {sparse} | {saved} "
                     f"| {' | '.join(phase)} | {st.seconds['prefill']:.2f} | {warmup} |")
    return lines + ["tokens/s: the tokens the decode steps made (each prompt's first comes from its "
                    "prefill), all rows, over the steps' wall time; tokens/step/row: tokens a running row "
                    "gains per step; γ: draft tokens proposed per step (the mean where each step chooses it); "
                    "steps: steps the engine ran, until the batch's last row was done; rows busy: the "
                    "share of the batch rows' steps that served a prompt (the rest: rows idle while "
                    "the last prompts finish, and the step the host runs before it sees a row done); "
                    "sparse steps: the share of the engine's steps that verified sparsely; "
                    "draft..accept: time per engine step (GPU time on CUDA); warm-up: the short "
                    "generation run before, untimed (on CUDA it captures the graphs and compiles)"
                    + (f"; SpecAttn verifies a row densely until it holds {sparse_from} positions "
                       "(--sparse-from)" if sparse_from and any(m.startswith("specattn") for m in results) else "")
                    + ("; past that, each SpecAttn step verifies sparsely or densely, whichever its measured "
                       "tokens per second favour, sparse only by a margin (VerifyChooser, --sparse-margin)"
                       if verification_chosen and "specattn" in results
                       else "")]


def parting_points(target, prompts, reference, rows) -> list[Optional[tuple[int, float]]]:
    """Where each row's tokens part from its reference (plain decoding's): (the index of the
    first token that differs, how far apart the target's two best logits were there, from one
    forward of the prompt and the reference's tokens before it, in the target's dtype), or None
    for a row equal to its reference over their common length. Greedy speculation equals plain
    decoding in exact arithmetic; rounding (bf16, or fp32 on a GPU) may part them where the two
    best logits tie at the dtype's resolution, and the gap shows whether they did."""
    device = target.output.weight.device
    points = []
    for prompt, ref, row in zip(prompts, reference, rows):
        i = next((i for i, (a, b) in enumerate(zip(row, ref)) if a != b), None)
        if i is None:
            points.append(None)
            continue
        tokens = torch.tensor(prompt + ref[:i], device=device)[None]  # [1, T]
        with torch.no_grad():
            best = target(tokens, logits_at=torch.tensor([tokens.shape[1] - 1], device=device))[0, -1].topk(2)
        points.append((i, float(best.values[0] - best.values[1])))
    return points


def check_engine(target, draft, tokenizer_prompts, layer_map, selection: SelectionConfig, gamma: int,
                 label: str, draft_window: Optional[int] = None, draft_vocab=None) -> None:
    """The graphed engine against the same engine run eagerly, on ragged prompts, every mode,
    greedy: token for token, and the same counters. SpecAttn runs five times: sparse from the
    first step; sparse from a length the rows reach while they generate (dense steps first,
    then sparse ones, from graphs captured at the first step); the same with each step's γ
    chosen by a GammaChooser with fixed costs (so its choices follow the tokens alone), and
    with γ and sparse or dense verification chosen by a VerifyChooser with fixed costs, once
    with the selection's own combine and once with the other of "first" and "union". With
    draft_vocab, dense speculation and SpecAttn run once more with the draft proposing from
    it. Every speculative run proposes from the context too (LOOKUP), but one dense run with
    the draft alone. Also reports how far the speculative modes follow plain decoding, and the gap between the
    target's two best logits where a row parts from it (parting_points)."""
    device = target.output.weight.device
    if device.type != "cuda":
        raise ValueError("--check compares CUDA graphs with eager runs: it needs --device cuda")
    prompts = tokenizer_prompts
    crossing = min(len(p) for p in prompts) + 24  # 48 new tokens take the shortest row past it
    crossed = replace(selection, sparse_from=crossing)
    other = "union" if selection.combine == "first" else "first"  # the last run selects the other way
    # (mode, selection, a fresh chooser for each of the two runs: fixed costs, so its choices follow the tokens)
    none = lambda: None  # noqa: E731
    # (the margin small enough for sparse verification 10% cheaper to win, so that both variants run)
    verify = lambda: VerifyChooser(gamma, costs={True: (0.25, 0.9), False: (0.25, 1.0)}, explore_every=8,  # noqa: E731
                                   sparse_margin=0.03)
    # (label, mode, selection, a fresh chooser for each of the two runs, the draft's vocabulary, lookup:
    # None is LOOKUP)
    runs = [("plain", "plain", selection, none, None, None), ("dense", "dense", selection, none, None, None),
            ("dense, the draft alone", "dense", selection, none, None, 0),
            ("specattn", "specattn", replace(selection, sparse_from=0), none, None, None),
            (f"specattn sparse from {crossing}", "specattn", crossed, none, None, None),
            (f"specattn sparse from {crossing}, γ chosen per step", "specattn", crossed,
             lambda: GammaChooser(gamma, costs=(0.25, 1.0)), None, None),
            (f"specattn sparse from {crossing}, γ and verification chosen per step", "specattn", crossed, verify,
             None, None),
            (f"specattn sparse from {crossing}, γ and verification chosen per step, combine={other}", "specattn",
             replace(crossed, combine=other), verify, None, None)]
    if draft_vocab is not None:
        runs += [(f"{mode}, the draft proposing from {len(draft_vocab)} tokens", mode, cfg, none, draft_vocab, None)
                 for mode, cfg in (("dense", selection), ("specattn", crossed))]
    plain = None
    for run, mode, cfg, new_chooser, vocab, lookup in runs:
        outs = []
        for graphs in (False, True):
            chooser = new_chooser()
            engine = make_engine(mode, target, draft, prompts, 48, gamma, 0.0, layer_map, cfg, cuda_graphs=graphs,
                                 gamma_chooser=chooser, draft_window=draft_window, draft_vocab=vocab,
                                 lookup=lookup)
            outs.append(engine.generate(prompts, 48))
        (eager, st_e), (graphed, st_g) = outs
        if eager != graphed or st_e.summary() != st_g.summary():
            raise AssertionError(f"{label} {run}: the graphed engine differs from the eager one: "
                                 f"{sum(a != b for a, b in zip(eager, graphed))} of {len(prompts)} rows")
        if engine.captures != engine.phase_graphs():
            raise AssertionError(f"{label} {run}: {engine.captures} captures "
                                 f"for {engine.phase_graphs()} phase graphs")
        plain = plain or graphed
        parted = parting_points(target, prompts, plain, graphed)
        same = [len(r) if at is None else at[0] for r, at in zip(graphed, parted)]
        gaps = ", ".join(f"row {b} at token {at[0]}: {at[1]:.3g}" for b, at in enumerate(parted) if at)
        print(f"check {label} {run}: graphed == eager on {len(prompts)} rows of {[len(p) for p in prompts]} "
              f"tokens; tokens equal to plain decoding before the first difference: {same}"
              + (f" (the target's two best logits there: {gaps} apart)" if gaps else ""), flush=True)


def random_model(args, device, dtype, seed: int) -> Transformer:
    """A random-weight model of these shapes (timing and checks need no trained weights)."""
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Transformer(args)  # ties the head to the embedding when args say so
    finally:
        torch.set_default_dtype(default)
    model.init_rope(device)
    return model.eval()


def random_pair_like(target: Transformer, draft: Transformer):
    """Random-weight models of the pair's shapes, on its device and in its dtype."""
    w = target.output.weight
    return [random_model(m.args, w.device, w.dtype, seed) for seed, m in enumerate((target, draft))]


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Speculative decoding with SpecAttn sparse verification, side by side with plain "
                    "decoding and dense speculative decoding. Defaults run the offline demo (SmolLM2-135M "
                    "and its trained 4-layer draft).", formatter_class=HelpFormatter)
    parser.add_argument("--prompt", action="append", help="text to continue; repeat for a batch of different "
                        "prompts (default: the opening of Alice's Adventures in Wonderland)")
    parser.add_argument("--context", type=int, help="instead of --prompt: prompts of this many tokens cut "
                        "from the demo books, one per batch row")
    parser.add_argument("--batch", type=int, default=1, help="batch rows (a single --prompt is repeated)")
    parser.add_argument("--requests", type=int, help="prompts served through the --batch rows: a row that "
                        "finishes takes the next waiting one (continuous batching); default: one per row")
    parser.add_argument("--fixed-batches", action="store_true", help="with --requests: serve them in fixed "
                        "batches of --batch instead, one after another, each running until its last row is "
                        "done (--requests a multiple of --batch)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate per row")
    parser.add_argument("--gamma", type=int, default=4, help="the most draft tokens a step proposes: each step "
                        "chooses its γ in 1..GAMMA from the acceptance so far and the measured step times "
                        "(GammaChooser); with --fixed-gamma, every step's")
    parser.add_argument("--fixed-gamma", action="store_true",
                        help="every step proposes --gamma draft tokens. Without it the γ a step proposes follows "
                             "measured times, and so do SpecAttn's and sampled text (greedy dense speculation "
                             "is the target's greedy text either way, up to rounding at ties); "
                             "SpecAttn's text also follows its measured choice of sparse or dense steps unless "
                             "--always-sparse")
    parser.add_argument("--draft-window", type=int,
                        help="the draft reads position 0 and its newest N - 1 positions, in its prefill and "
                             "every step (0: its whole cache). Default: the window it was trained on (the demo "
                             "draft's 512; none for a checkpoint without one). The target reads everything")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    parser.add_argument("--topp", type=float, default=0.9, help="SpecAttn top-p in (0, 1]")
    parser.add_argument("--dense-layers", type=int, default=2,
                        help="first target layers that always stay dense")
    parser.add_argument("--sparse-from", type=int, default=SPARSE_FROM,
                        help="SpecAttn: a row verifies densely until its cache holds this many positions "
                             "(below it, skipping reads saves less time than asking the draft for its "
                             "attention costs); 0: sparse from the first step")
    parser.add_argument("--draft-vocab", type=int, default=0, metavar="N",
                        help="the draft proposes only the N tokens most frequent in the calibration book "
                             "(its head computes N logits instead of the whole vocabulary's: a shorter draft "
                             "step, a few more rejected drafts; still lossless, the target verifies every "
                             "token). 0: the whole vocabulary")
    parser.add_argument("--lookup", type=int, default=LOOKUP, metavar="N",
                        help="a row whose newest N tokens occurred before in its prompt or output proposes "
                             "the tokens that followed them then, instead of the draft's (prompt lookup: text "
                             "repeats, and the guess costs one small launch a step; lossless). 0: the draft "
                             "alone")
    parser.add_argument("--always-sparse", action="store_true",
                        help="SpecAttn verifies sparsely at every step past --sparse-from. Without it each step "
                             "chooses sparse or dense verification, whichever gives more tokens per second as "
                             "measured so far (VerifyChooser), so where sparse reads do not pay, SpecAttn runs "
                             "as dense speculation")
    parser.add_argument("--sparse-margin", type=float, default=SPARSE_MARGIN, metavar="M",
                        help="without --always-sparse: a step verifies sparsely only where that promises more "
                             "than 1 + M times dense verification's tokens per second: a sparse step also "
                             "changes the text that follows, which its own acceptance does not show (see "
                             "SPARSE_MARGIN in specattn.py)")
    experiments = parser.add_argument_group("experiments", "variants of SpecAttn's selection")
    experiments.add_argument("--sinks", type=int, default=SelectionConfig.sinks,
                             help="always read the first N positions (attention sinks), whatever the "
                                  "draft says")
    experiments.add_argument("--combine", choices=COMBINE,
                             help="the union of every draft row's top-p set; the first draft row's top-p set "
                                  "alone (one attention row a step from the draft); or top-p of the rows' "
                                  "mean. Default: first where --requests refills rows (continuous batching), "
                                  "union otherwise, the faster of the two in each as measured")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="which to run, comma-separated: plain (the target alone), dense (speculative, "
                             "dense verification), specattn")
    add_pair_arguments(parser)
    parser.add_argument("--layer-map",
                        help="layer map JSON from calibrate.py (default: calibrate once, cached)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"],  # as eval_pg19.py spells them
                        help="weights and caches (default: bfloat16 on cuda, float32 on cpu); float32 on a GPU is "
                             "slower, for comparing modes without bf16 rounding (e.g. with --check)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--show", type=int, default=1, help="print the text of this many rows per mode")
    parser.add_argument("--check", action="store_true", help="GPU: check the graphed engine against the "
                        "eager one (this pair and a random-weight pair of its shapes), then exit")
    parser.add_argument("--out",
                        help="also write into this directory the table under the device and dtype it ran on "
                        "(generate.md) and, per mode, its "
                        "stats, tokens/s and each prompt's generated text (generate.json)")
    args = parser.parse_args(argv)
    try:
        modes = [m for m in args.modes.split(",") if m]
        if not modes or any(m not in MODES for m in modes):
            raise ValueError("--modes takes a comma-separated subset "
                             f"of {','.join(MODES)}, got {args.modes!r}")
        check_topp(args.topp, "--topp")
        if args.gamma < 1:
            raise ValueError(f"--gamma must be >= 1, got {args.gamma}")
        if args.batch < 1:
            raise ValueError(f"--batch must be >= 1, got {args.batch}")
        if args.requests is not None and args.requests < args.batch:
            raise ValueError(f"--requests must be >= --batch ({args.batch}), got {args.requests}")
        if args.fixed_batches and (args.requests or args.batch) % args.batch:
            raise ValueError(f"--fixed-batches needs --requests a multiple of --batch ({args.batch}), "
                             f"got {args.requests}")
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        if args.sparse_from < 0:
            raise ValueError(f"--sparse-from must be >= 0, got {args.sparse_from}")
        if not args.sparse_margin >= 0:
            raise ValueError(f"--sparse-margin must be >= 0, got {args.sparse_margin}")
        if args.draft_vocab < 0:  # before the pair loads (its size: after)
            raise ValueError(f"--draft-vocab must be >= 0 (0: the whole vocabulary), got {args.draft_vocab}")
        if args.lookup < 0:
            raise ValueError(f"--lookup must be >= 0 (0: the draft alone), got {args.lookup}")
        if args.draft_window is not None and args.draft_window < 0:
            raise ValueError(f"--draft-window must be >= 0 (0: the draft reads its whole cache), "
                             f"got {args.draft_window}")
        check_device(args.device)
        target, draft, tokenizer = load_pair(args.target, args.draft, parse_layers(args.draft_layers),
                                             device=args.device,
                                             dtype=getattr(torch, args.dtype) if args.dtype else None,
                                             bos=args.bos, sink_distance=args.sink_distance)
        n_prompts = args.requests or args.batch
        if args.context:
            prompts = book_prompts(tokenizer, n_prompts, args.context)
        else:
            texts = args.prompt or ["Alice was beginning to get very tired of sitting by her sister on the "
                                    "bank, and of having nothing to do:"]
            texts = texts * n_prompts if len(texts) == 1 else texts
            if any(not t for t in texts):
                raise ValueError("an empty --prompt: give some text to continue")
            prompts = [tokenizer.encode(t) for t in texts]
        # Do the prompts fit the model (the speculative modes' engines need 2γ positions more)? Before
        # the layer map is calibrated, which takes a while on a first run.
        engine_max_len(target, prompts, args.max_new_tokens, 0 if modes == ["plain"] else args.gamma)
        layer_map = layer_map_for(target, draft, tokenizer, args.layer_map)
        draft_vocab = pair_draft_vocab(tokenizer, target, draft, args.draft_vocab)
        continuous = n_prompts > args.batch and not args.fixed_batches
        selection = SelectionConfig(topp=args.topp, dense_layers=args.dense_layers, sinks=args.sinks,
                                    combine=args.combine or default_combine(continuous),
                                    sparse_from=args.sparse_from)
        if target.output.weight.is_cuda:
            use_gpu_kernels(True)
        if args.check:
            ragged = [p[:max(1, len(p) - 7 * b)] for b, p in enumerate((prompts * 3)[:3])]
            check_engine(target, draft, ragged, layer_map, selection, args.gamma, "pair", args.draft_window,
                         draft_vocab)
            check_engine(*random_pair_like(target, draft), ragged, layer_map, selection, args.gamma,
                         "random pair", args.draft_window, draft_vocab)
            print("engine check passed")
            return
        batch = min(args.batch, len(prompts)) if args.requests else len(prompts)
        results = run_modes(target, draft, prompts, args.max_new_tokens, args.gamma, args.temperature,
                            layer_map, selection, modes, eos_id=tokenizer.eos_id, seed=args.seed,
                            progress=True, batch_size=batch, adaptive_gamma=not args.fixed_gamma,
                            draft_window=args.draft_window, choose_verification=not args.always_sparse,
                            refill=not args.fixed_batches, draft_vocab=draft_vocab, lookup=args.lookup,
                            sparse_margin=args.sparse_margin)
    except (ValueError, FileNotFoundError, RuntimeError, MemoryError) as e:
        sys.exit(f"error: {e}")
    for mode, (ids, stats) in results.items():
        for b in range(min(args.show, len(ids))):
            print(f"=== {mode}, row {b}")
            print(tokenizer.decode(prompts[b][-200:]) + tokenizer.decode(ids[b]))
    weights = target.output.weight
    where = f"# {torch.cuda.get_device_name(weights.device) if weights.is_cuda else 'CPU'}, " \
            f"{str(weights.dtype).removeprefix('torch.')}"  # e.g. "# NVIDIA H100 80GB HBM3, bfloat16"
    if draft_vocab is not None:
        where += f", the draft proposing from its {len(draft_vocab)} most frequent tokens (--draft-vocab)"
    if args.lookup and modes != ["plain"]:
        where += f", rows proposing from their context after a repeat of {args.lookup} tokens (--lookup)"
    table = [where] + results_table(results, batch, args.context or "prompt", len(prompts), args.sparse_from,
                                    verification_chosen=not args.always_sparse)
    if "specattn" in modes:
        source = {"union": "the union of the draft rows' top-p sets", "first": "the draft's first row",
                  "mean": "the draft rows' mean"}[selection.combine]
        print(f"SpecAttn: top-p {args.topp}, selecting {source} (--combine {selection.combine}), "
              f"the first {args.dense_layers} layers dense")
    print("\n".join(table))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        payload = {mode: {**st.summary(), "tokens": st.tokens, "tokens_per_s": st.decode_rate,
                          "accepted_hist": st.accepted_hist, "seconds": st.seconds,
                          "texts": [tokenizer.decode(row) for row in ids]}  # each prompt's new text
                   for mode, (ids, st) in results.items()}
        write_atomic(out / "generate.json", json.dumps(payload, indent=1))
        write_atomic(out / "generate.md", "\n".join(table) + "\n")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted: generation writes its results at the end, so nothing was saved")
