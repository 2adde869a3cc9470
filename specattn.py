"""Speculative decoding with draft-guided sparse verification (SpecAttn).

The loop, in one picture (γ = gamma):

    draft : last -> d1 -> d2 -> ... -> dγ        γ cheap single-token steps; each step's
                                                attention over the context is kept
    select: for target layer j, draft layer layer_map[j]'s head-averaged attention,
            cut at top-p, says which cached positions the target reads
    target: [last, d1, ..., dγ] in ONE forward  (γ+1 queries, sparse in layers >= dense_layers)
    accept: the longest prefix of d1..dγ the target agrees with, plus one token of its own
    rewind: both caches forget the rejected positions, explicitly

`speculative_generate` is the loop; `draft_selection` turns draft attention into the
target's KV selection (also used by eval_pg19.py); `load_pair` loads a target and a
draft that share a tokenizer. Layer maps come from calibrate.py; the attention hooks
from model.py; `kernels.py` can serve the sparse attention on a GPU.

KV accounting, defined once: an "entry" is one (target layer, KV head, cached
position) that the target reads during a verification forward. The new block's own
γ+1 positions are always read and are not counted. Dense verification reads
n_layers × n_kv_heads × past_len entries per step; we report the fraction saved over all
layers and over the sparse layers alone.

Run `python specattn.py --prompt "..." --topp 0.9` (defaults: the offline demo).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch

from kernels import topp_mask
from model import Tokenizer, Transformer, draft_info, load_draft, load_model

# ----------------------------------------------------------------------------------------
# Loading a target/draft pair


def parse_layers(spec: Optional[str]) -> Optional[list[int]]:
    """'0-11' or '0,2,4' or '0-3,8' -> list of ints; None -> None (all layers)."""
    if not spec:
        return None
    out = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b) + 1) if b else [int(a)])
    return out


DEMO_DRAFT = Path(__file__).resolve().parent / "draft"  # train_draft.py's draft for the demo target


def add_pair_arguments(parser: argparse.ArgumentParser) -> None:
    """--target, --draft, --draft-layers: the command-line face of load_pair (here and in eval_pg19.py)."""
    parser.add_argument("--target", help="target HF checkpoint directory (default: demo SmolLM2-135M)")
    parser.add_argument("--draft", help="draft: an HF checkpoint directory, or a draft saved by train_draft.py "
                                        "(default with the demo target: its trained draft in draft/; otherwise "
                                        "the target)")
    parser.add_argument("--draft-layers", help="use only these layers of the draft checkpoint (with no --draft, of the "
                                               "target: 0-11 is the demo's self-speculative first-12-layers draft)")


def load_pair(target_path=None, draft_path=None, draft_layers=None, device=None, dtype=None):
    """(target, draft, tokenizer). Defaults: the demo target and its trained draft (draft/,
    made by train_draft.py); with draft_layers and no draft_path, the draft is the target's
    own first layers instead (the self-speculative draft, for comparison)."""
    if target_path is None:
        from demo import demo_target

        target_path = demo_target()
        if draft_path is None and draft_layers is None:
            draft_path = DEMO_DRAFT
            if not (DEMO_DRAFT / "config.json").exists():
                raise FileNotFoundError(f"the demo's trained draft {DEMO_DRAFT} is missing: restore the repo's "
                                        f"draft/ folder, make one with train_draft.py, or pass --draft-layers 0-11")
    draft_path = draft_path or target_path
    for name, path in (("--target", target_path), ("--draft", draft_path)):
        if not Path(path).is_dir():
            raise FileNotFoundError(f"{name} {path}: no such directory; pass a Hugging Face checkpoint directory")
    tokenizer = Tokenizer.from_pretrained(target_path)
    target = load_model(target_path, device=device, dtype=dtype)
    if draft_info(draft_path) is not None:  # shares the target's embedding, and so its tokenizer
        if draft_layers is not None:
            raise ValueError("--draft-layers picks layers of a full checkpoint; a draft from train_draft.py "
                             "is used whole")
        return target, load_draft(draft_path, target), tokenizer
    if Path(draft_path).resolve() != Path(target_path).resolve():
        check_same_tokenizer(tokenizer, Tokenizer.from_pretrained(draft_path), target_path, draft_path)
    draft = load_model(draft_path, device=device, dtype=dtype, layers=draft_layers)
    if draft.args.vocab_size != target.args.vocab_size:
        raise ValueError(f"draft vocab {draft.args.vocab_size} != target vocab {target.args.vocab_size}: "
                         f"use a draft trained with the target's tokenizer")
    return target, draft, tokenizer


def check_same_tokenizer(a: Tokenizer, b: Tokenizer, path_a, path_b) -> None:
    probe = "Speculative decoding, 2025: naïve café ☕ — 12345 tokens.\n\tEnd."
    if a.vocab_size != b.vocab_size or a.encode(probe) != b.encode(probe) or a.special != b.special:
        raise ValueError(f"draft tokenizer ({path_b}) differs from the target's ({path_a}); "
                         f"SpecAttn needs a draft that shares the target's tokenizer")


def load_layer_map(path, n_target_layers: int, n_draft_layers: int) -> list[int]:
    try:
        layer_map = json.loads(Path(path).read_text())["map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read the layer map {path} ({e}); make one with calibrate.py") from None
    if len(layer_map) != n_target_layers or not all(0 <= i < n_draft_layers for i in layer_map):
        raise ValueError(f"layer map {path} has {len(layer_map)} entries over draft layers "
                         f"{min(layer_map)}..{max(layer_map)}; this pair needs {n_target_layers} entries "
                         f"in 0..{n_draft_layers - 1} (recalibrate with calibrate.py)")
    return layer_map


# ----------------------------------------------------------------------------------------
# Draft attention -> target KV selection


@dataclass
class SelectionConfig:
    topp: float = 0.9
    dense_layers: int = 2  # the first layers always read everything
    combine: str = "union"  # how the draft's rows become one selection: "union" of top-p sets, or "mean" rows
    sinks: int = 0  # always read the first `sinks` positions
    recent: int = 0  # always read the last `recent` cached positions
    per_head: bool = False  # select per target KV head (needs draft heads == target heads)

    def __post_init__(self):
        if not (0 < self.topp <= 1):
            raise ValueError(f"top-p must be in (0, 1], got {self.topp}")
        if self.combine not in ("union", "mean"):
            raise ValueError(f"combine must be 'union' or 'mean', got {self.combine!r}")


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


def _select_from_rows(probs: torch.Tensor, n_kv_heads: int, cfg: SelectionConfig, causal: bool) -> torch.Tensor:
    B, Hd, T, S = probs.shape
    if cfg.per_head:
        if Hd % n_kv_heads:
            raise ValueError(f"per-head selection needs draft heads ({Hd}) to group into target KV heads ({n_kv_heads})")
        rows = probs.float().view(B, n_kv_heads, Hd // n_kv_heads, T, S).mean(2)  # [B, Hkv, T, S]
    else:
        rows = probs.float().mean(1, keepdim=True)  # [B, 1, T, S]: one selection for all heads
    if cfg.combine == "mean":  # average the rows (running average if causal), then one top-p cut
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
    if cfg.recent:
        keep[..., max(0, S - cfg.recent):] = True
    return keep.expand(B, n_kv_heads, keep.shape[2], S)


# ----------------------------------------------------------------------------------------
# Speculative decoding


@dataclass
class SpecStats:
    steps: int = 0
    accepted: list = field(default_factory=list)  # draft tokens accepted per step
    kv_read: int = 0  # entries read by the target in verification (see module doc)
    kv_dense: int = 0  # entries dense verification would read
    kv_read_sparse_layers: int = 0
    kv_dense_sparse_layers: int = 0

    @property
    def mean_accepted(self) -> float:
        return sum(self.accepted) / max(1, len(self.accepted))

    def summary(self) -> dict:
        return {
            "steps": self.steps, "mean_accepted": round(self.mean_accepted, 3),
            "tokens_per_step": round(self.mean_accepted + 1, 3),
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
    eligible for selection (default: those in `selection`)."""
    sparse_layers = set(selection) if sparse_layers is None else set(sparse_layers)
    dense_layer = batch * n_kv_heads * past_len
    read_per_layer = [int(selection[j].expand(batch, n_kv_heads, -1, -1).any(2).sum()) if j in selection
                      else dense_layer for j in range(n_layers)]
    read_sparse = sum(read_per_layer[j] for j in sparse_layers)
    return sum(read_per_layer), n_layers * dense_layer, read_sparse, len(sparse_layers) * dense_layer


def _probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits.float() / temperature, dim=-1)


@torch.no_grad()
def speculative_generate(target: Transformer, draft: Transformer, prompt_ids, max_new_tokens: int, gamma: int = 4,
                         temperature: float = 0.0, topp: Optional[float] = None, layer_map=None,
                         selection: Optional[SelectionConfig] = None, generator: Optional[torch.Generator] = None,
                         eos_id: Optional[int] = None):
    """Generate up to max_new_tokens after prompt_ids (batch 1). Returns (new token ids, SpecStats).

    temperature 0 is greedy: the output equals the target's own greedy decoding exactly
    (with SpecAttn off, or topp=1). topp < 1 turns SpecAttn on (needs layer_map).
    """
    device = target.output.weight.device
    prompt = torch.as_tensor(prompt_ids, device=device).view(1, -1)
    if prompt.shape[1] < 1:
        raise ValueError("the prompt needs at least one token")
    if topp is not None and layer_map is None:
        raise ValueError("SpecAttn (topp) needs a layer map: pass layer_map (see calibrate.py)")
    cfg = selection or SelectionConfig()
    if topp is not None:
        cfg = replace(cfg, topp=topp)  # a copy: the caller's config is left as it was
    use_specattn = topp is not None and topp < 1
    max_len = prompt.shape[1] + max_new_tokens + gamma + 2
    t_cache, d_cache = target.new_cache(max_len=max_len), draft.new_cache(max_len=max_len)
    args = target.args
    stats = SpecStats()

    # Prefill everything but the last prompt token: the loop feeds one "pending" token.
    if prompt.shape[1] > 1:
        target(prompt[:, :-1], cache=t_cache)
        draft(prompt[:, :-1], cache=d_cache)
    last = prompt[:, -1:]  # [1, 1]: the newest token, in neither cache yet
    draft_pending = last  # what the draft must read before proposing (1 or 2 tokens)
    out = []

    while len(out) < max_new_tokens:
        past_len = t_cache.length  # cached positions the target may select among

        # 1. Draft proposes γ tokens, one step at a time, keeping each step's attention.
        proposals, q_dists, rows = [], [], []
        inp = draft_pending
        for _ in range(gamma):
            if use_specattn:
                logits, probs = draft(inp, cache=d_cache, return_attn=True)
                rows.append([p[:, :, -1:, :past_len] for p in probs])  # per layer [1, Hd, 1, past_len]
            else:
                logits = draft(inp, cache=d_cache)
            logits = logits[:, -1]  # [1, V]
            if temperature == 0:
                tok = logits.argmax(-1, keepdim=True)
            else:
                q = _probs(logits, temperature)
                q_dists.append(q)
                tok = torch.multinomial(q, 1, generator=generator)
            proposals.append(tok)
            inp = tok
        drafted = torch.cat(proposals, dim=1)  # [1, γ]

        # 2. Target verifies [last, d1..dγ] in one forward. With SpecAttn, sparse layers read
        #    only what the draft's attention selects. This makes verification approximate:
        #    the target's distribution now depends on the draft's proposals through the
        #    selection, so at topp < 1 the output is no longer exactly the target's.
        select = None
        if use_specattn:
            draft_rows = [torch.cat([r[i] for r in rows], dim=2) for i in range(len(rows[0]))]  # [1, Hd, γ, past]
            chosen = draft_selection(draft_rows, past_len, layer_map, args.n_kv_heads, cfg)
            select = lambda layer, q, k: chosen.get(layer)  # noqa: E731
        else:
            chosen = {}
        block = torch.cat([last, drafted], dim=1)  # [1, γ+1]
        t_logits = target(block, cache=t_cache, select=select)[0]  # [γ+1, V]
        read, dense, read_sp, dense_sp = count_kv_reads(chosen, args.n_layers, args.n_kv_heads, past_len,
                                                        sparse_layers=range(cfg.dense_layers, args.n_layers))
        stats.kv_read += read
        stats.kv_dense += dense
        stats.kv_read_sparse_layers += read_sp
        stats.kv_dense_sparse_layers += dense_sp

        # 3. Accept. Greedy: keep d_i while it is the target's argmax. Sampling (Leviathan et
        #    al. 2023): keep d_i with probability min(1, p(d_i) / q(d_i)); at the first
        #    rejection draw from norm(max(0, p - q)). Then P(emit x) = min(p(x), q(x))
        #    [accepted] + (1 - Σ min(p, q)) · max(0, p(x) - q(x)) / Σ max(0, p - q) [resampled]
        #    = p(x), since Σ max(0, p - q) = 1 - Σ min(p, q). If all γ pass, the target's
        #    own distribution after dγ gives one bonus token.
        k = 0
        new_token = None
        while k < gamma:
            d = drafted[0, k]
            if temperature == 0:
                if t_logits[k].argmax() != d:
                    new_token = t_logits[k].argmax().view(1, 1)
                    break
            else:
                p, q = _probs(t_logits[k], temperature), q_dists[k][0]
                if torch.rand((), generator=generator, device=p.device) * q[d] > p[d]:
                    residual = (p - q).clamp(min=0)
                    new_token = torch.multinomial(residual / residual.sum(), 1, generator=generator).view(1, 1)
                    break
            k += 1
        if new_token is None:  # all γ accepted: a bonus token from the last target position
            bonus = t_logits[gamma]
            new_token = (bonus.argmax().view(1, 1) if temperature == 0 else
                         torch.multinomial(_probs(bonus, temperature), 1, generator=generator).view(1, 1))
        stats.steps += 1
        stats.accepted.append(k)

        # 4. Rewind. The target cached [last, d1..dγ]: keep [last, d1..dk], drop γ - k.
        #    The draft cached [pending.., d1..d(γ-1)]: keep through dk, drop γ-1-k; if all
        #    γ were accepted it never read dγ, so dγ goes into its next pending block.
        t_cache.rewind(gamma - k)
        if k < gamma:
            d_cache.rewind(gamma - 1 - k)
            draft_pending = new_token
        else:
            draft_pending = torch.cat([drafted[:, -1:], new_token], dim=1)
        emitted = drafted[0, :k].tolist() + [new_token.item()]
        for tok in emitted:
            out.append(tok)
            if tok == eos_id or len(out) == max_new_tokens:
                return out, stats
        last = new_token
    return out, stats


@torch.no_grad()
def greedy_generate(model: Transformer, prompt_ids, max_new_tokens: int) -> list[int]:
    """Plain greedy decoding with a cache: the reference speculative decoding must equal."""
    device = model.output.weight.device
    prompt = torch.as_tensor(prompt_ids, device=device).view(1, -1)
    cache = model.new_cache(max_len=prompt.shape[1] + max_new_tokens)
    logits = model(prompt, cache=cache)[:, -1]
    out = []
    for _ in range(max_new_tokens):
        tok = logits.argmax(-1, keepdim=True)
        out.append(tok.item())
        logits = model(tok, cache=cache)[:, -1]
    return out


# ----------------------------------------------------------------------------------------
# CLI


def main(argv=None):
    parser = argparse.ArgumentParser(description="Speculative decoding with SpecAttn sparse verification. "
                                     "Defaults run the offline demo (SmolLM2-135M and its trained 4-layer draft).")
    parser.add_argument("--prompt", default="Alice was beginning to get very tired of sitting by her sister on the "
                        "bank, and of having nothing to do:", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate")
    parser.add_argument("--gamma", type=int, default=4, help="draft tokens proposed per step")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    parser.add_argument("--topp", type=float, default=0.9, help="SpecAttn top-p in (0, 1]; 1 = dense verification")
    parser.add_argument("--dense-layers", type=int, default=2, help="first target layers that always stay dense")
    parser.add_argument("--sinks", type=int, default=SelectionConfig.sinks,
                        help="SpecAttn: always read the first N positions (attention sinks), whatever the draft says")
    parser.add_argument("--combine", choices=["union", "mean"], default="union",
                        help="union of the draft rows' top-p sets, or top-p of their mean")
    add_pair_arguments(parser)
    parser.add_argument("--layer-map", help="layer map JSON from calibrate.py (default: calibrate once, cached)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    args = parser.parse_args(argv)
    try:
        if not (0 < args.topp <= 1):
            raise ValueError(f"--topp must be in (0, 1], got {args.topp}")
        target, draft, tokenizer = load_pair(args.target, args.draft, parse_layers(args.draft_layers),
                                             device=args.device)
        from calibrate import layer_map_for

        layer_map = layer_map_for(target, draft, tokenizer, args.layer_map)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    prompt_ids = tokenizer.encode(args.prompt)
    device = target.output.weight.device
    results = {}
    for name, topp in (("dense verification", None), (f"SpecAttn p={args.topp}", args.topp)):
        gen = torch.Generator(device=device).manual_seed(args.seed)
        t0 = time.perf_counter()
        ids, stats = speculative_generate(target, draft, prompt_ids, args.max_new_tokens, gamma=args.gamma,
                                          temperature=args.temperature, topp=topp, layer_map=layer_map,
                                          selection=SelectionConfig(topp=args.topp, dense_layers=args.dense_layers,
                                                                    combine=args.combine, sinks=args.sinks),
                                          generator=gen, eos_id=tokenizer.eos_id)
        results[name] = (ids, stats, time.perf_counter() - t0)
    for name, (ids, stats, secs) in results.items():
        print(f"=== {name}")
        print(args.prompt + tokenizer.decode(ids))
        print(json.dumps({**stats.summary(), "tokens": len(ids), "tokens_per_s": round(len(ids) / secs, 2)}))


if __name__ == "__main__":
    main()
