"""PG-19 perplexity against KV reads: SpecAttn, an oracle and four baselines, same tokens.

    python eval_pg19.py --topp 0.9                 # the offline demo (fetched once)
    python eval_pg19.py --data pg19/ --target Llama-2-7b --draft TinyLlama --topp 0.8 0.9 0.95
    torchrun --nproc-per-node 8 eval_pg19.py --data pg19/ ...   # books sharded over 8 GPUs

Protocol ("paper", after the SpecAttn paper): per book, the first --max-tokens (2048)
tokens; the first 10% is prefill (dense); the rest is scored teacher-forced in blocks of
γ tokens. For each block the draft reads the block and returns its attention, every
method chooses which cached positions each target layer reads, and the target scores
the block with that sparse attention. Perplexity = exp(mean NLL) over scored tokens.

Causality. The selection used to predict token x[t+1] may depend only on what a real
decoder would have when predicting it: draft rows of queries <= t. Draft row t+1 has
read x[t+1], the label, so query t uses the running union (or mean) of rows block-start..t,
never the whole block's. The same rule holds for every method (the oracle uses the
target's own row t; Quest scores pages with query t). A block's KV reads are the union
over its rows (see specattn.py for the accounting).

Methods (the first --dense-layers target layers stay dense for all of them):
  dense         every cached position
  specattn      the mapped draft layer's attention, top-p (one run per --topp value)
  oracle        top-p on the target's own attention in that layer: the ceiling for any predictor
  quest         pages of 16 tokens (--quest-page) ranked by the min/max key bound on q·k
                (Quest, 2024); --quest-pin first|first-last takes the sink's page (and the
                newest) first, a diagnostic
  streamingllm  4 attention sinks + the most recent positions (StreamingLLM, 2023)
  h2o           heavy hitters by accumulated attention + the most recent positions (H2O, 2023);
                re-chosen every block from the target's own accumulated attention, never
                evicted for good, so it upper-bounds H2O's quality at the same budget.
Quest, StreamingLLM and H2O are given, for every layer and query, the number of
positions SpecAttn kept there at the same p: rows compare at equal KV budget.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels import topp_mask
from specattn import SelectionConfig, add_pair_arguments, count_kv_reads, draft_selection, load_pair, parse_layers

METHODS = ("dense", "specattn", "oracle", "quest", "streamingllm", "h2o")
BUDGETED = ("quest", "streamingllm", "h2o")
SINKS = 4

# ----------------------------------------------------------------------------------------
# Data


def load_books(data, split: str = "test", limit=None) -> list[dict]:
    """[{id, title, text}] from a PG-19 directory, a .txt file, or a .jsonl/.parquet file."""
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"--data {path}: not found; pass a PG-19 directory or a .txt/.jsonl/.parquet file")
    if path.is_dir():
        folder = path / split if (path / split).is_dir() else path
        files = sorted(folder.glob("*.txt"), key=lambda f: (not f.stem.isdigit(), int(f.stem) if f.stem.isdigit()
                                                             else 0, f.stem))
        if not files:
            raise FileNotFoundError(f"--data {path}: no {split}/*.txt books found")
        titles = {}
        meta = path / "metadata.csv"
        if meta.exists():
            with open(meta, newline="", encoding="utf-8") as f:
                for row in csv.reader(f):
                    if len(row) >= 2 and row[0] != "id":
                        titles[row[0]] = row[1]
        books = [{"id": f.stem, "title": titles.get(f.stem, f.stem),
                  "text": f.read_text(encoding="utf-8", errors="replace")} for f in files]
    elif path.suffix == ".txt":
        books = [{"id": path.stem, "title": path.stem, "text": path.read_text(encoding="utf-8", errors="replace")}]
    elif path.suffix in (".jsonl", ".parquet"):
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise RuntimeError("reading .parquet needs pyarrow: pip install pyarrow") from None
            rows = pq.read_table(path).to_pylist()
        if rows and "text" not in rows[0]:
            raise ValueError(f"--data {path}: rows have no 'text' column (columns: {sorted(rows[0])})")
        books = [{"id": str(r.get("id", i)), "title": str(r.get("short_book_title", r.get("title", i))),
                  "text": r["text"]} for i, r in enumerate(rows)]
    else:
        raise ValueError(f"--data {path}: expected a directory, .txt, .jsonl or .parquet")
    return books[:limit] if limit else books


# ----------------------------------------------------------------------------------------
# Selections (all per target layer: bool [1, Hkv, T, past], row t for query t)


def budget_mask(scores: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """Keep the `budget` highest scores of each row. scores [..., S], budget int [...]."""
    S = scores.shape[-1]
    k_max = int(budget.max().clamp(max=S)) if budget.numel() else 0
    keep = torch.zeros_like(scores, dtype=torch.bool)
    if k_max == 0:
        return keep
    top = scores.topk(k_max, dim=-1).indices  # [..., k_max]
    rank_ok = torch.arange(k_max, device=scores.device) < budget[..., None]
    return keep.scatter(-1, top, rank_ok)


def streaming_selection(budget: torch.Tensor, past: int) -> torch.Tensor:
    """Sinks + recent window with `budget` positions per row. budget [1, Hkv, T] -> [1, Hkv, T, past]."""
    pos = torch.arange(past, device=budget.device)
    sinks = budget.clamp(max=SINKS)[..., None]
    recent = (budget[..., None] - sinks)
    return (pos < sinks) | (pos >= past - recent)


QUEST_PINS = ("none", "first", "first-last")


@dataclass(frozen=True)
class QuestConfig:
    page: int = 16  # keys per page, as in the Quest paper
    pin: str = "none"  # a diagnostic, not Quest: see quest_selection


def quest_selection(q: torch.Tensor, k_past: torch.Tensor, budget: torch.Tensor,
                    cfg: QuestConfig = QuestConfig()) -> torch.Tensor:
    """Quest: per page of cfg.page keys, the upper bound sum_d max(q_d min_d, q_d max_d) of
    q·k; the top round(budget / page) pages per KV head and query (bounds summed over the
    group). cfg.pin: pages taken first, inside the same page budget, whatever their bound:
    "first" (the attention sink's page), "first-last" (and then the newest page).
    Reading each page's min and max costs 2 / page of the keys' bytes on top of the pages
    read; the KV reads we report leave it out."""
    B, Hq, T, D = q.shape
    Hkv, past = k_past.shape[1], k_past.shape[2]
    page = cfg.page
    n_pages = math.ceil(past / page)
    pad = n_pages * page - past
    k = F.pad(k_past.float(), (0, 0, 0, pad), value=float("nan")).view(B, Hkv, n_pages, page, D)
    k_min = k.nan_to_num(float("inf")).amin(3)  # [B, Hkv, P, D]; padding never wins a min or max
    k_max = k.nan_to_num(float("-inf")).amax(3)
    qg = q.float().view(B, Hkv, Hq // Hkv, T, 1, D)
    bound = torch.maximum(qg * k_min[:, :, None, None], qg * k_max[:, :, None, None]).sum(-1)  # [B, Hkv, G, T, P]
    n_sel = (budget.float() / page).round().clamp(min=1).long()
    n_sel = torch.where(budget >= past, n_pages, n_sel)  # a full budget reads every page, the partial last too
    bound = bound.sum(2)  # [B, Hkv, T, P]
    if cfg.pin in ("first", "first-last"):
        bound[..., 0] = float("inf")
    if cfg.pin == "first-last":  # after the first page, before every other
        bound[..., -1] = torch.finfo(bound.dtype).max
    pages = budget_mask(bound, n_sel)  # [B, Hkv, T, P]
    return pages.repeat_interleave(page, dim=-1)[..., :past]


def h2o_selection(scores: torch.Tensor, budget: torch.Tensor, past: int) -> torch.Tensor:
    """Half the budget for the most recent positions, half for the largest accumulated attention
    among the older ones. scores [1, Hkv, past]; budget [1, Hkv, T]."""
    recent = budget // 2
    pos = torch.arange(past, device=budget.device)
    is_recent = pos >= past - recent[..., None]  # [1, Hkv, T, past]
    older = scores[:, :, None, :].expand(*is_recent.shape).masked_fill(is_recent, float("-inf"))
    return is_recent | budget_mask(older, budget - recent)


def oracle_selection(q: torch.Tensor, k_past: torch.Tensor, n_kv_heads: int, cfg: SelectionConfig) -> torch.Tensor:
    """Top-p on the target's own attention of query t over the cached positions (head-averaged,
    or per KV head with cfg.per_head), as unnormalised weights exp(s - max)."""
    B, Hq, T, D = q.shape
    k = k_past.float().repeat_interleave(Hq // n_kv_heads, 1)  # [B, Hq, past, D]
    s = q.float() @ k.transpose(-1, -2) / math.sqrt(D)  # [B, Hq, T, past]
    w = (s - s.amax(-1, keepdim=True)).exp()
    w = w / w.sum(-1, keepdim=True)  # each head's row weighs the same
    w = w.view(B, n_kv_heads, Hq // n_kv_heads, T, -1).mean(2) if cfg.per_head else w.mean(1, keepdim=True)
    return topp_mask(w, cfg.topp).expand(B, n_kv_heads, T, k.shape[2])


# ----------------------------------------------------------------------------------------
# Scoring one book: every method in lockstep over the same blocks


@dataclass
class Run:
    """One row of the results table: a method at one p (None for dense)."""
    method: str
    topp: float | None

    @property
    def name(self) -> str:
        return self.method if self.topp is None else f"{self.method}@{self.topp}"


def make_runs(methods, topps) -> list[Run]:
    runs = [Run("dense", None)] if "dense" in methods else []
    for p in topps:
        runs += [Run(m, p) for m in methods if m != "dense"]
    return runs


@torch.no_grad()
def score_book(target, draft, tokens: torch.Tensor, runs: list[Run], layer_map, cfg: SelectionConfig, gamma: int,
               prefill: int, progress=None, keep_logits: bool = False, quest: QuestConfig = QuestConfig()) -> dict:
    """Teacher-forced NLL of tokens[prefill + 1:] for every run.

    The runs go through the target side by side as one batch (row b = runs[b], each with
    its own KV cache row and its own selection), so the weights are read once per block
    for all of them; on a CPU that is most of the cost. Returns {run name: {nll, tokens,
    kv_read, kv_dense, kv_read_sparse, kv_dense_sparse, select_s, [logits]}} plus
    "_acceptance" (draft/target expected acceptance Σ min(p, q), temperature 1) and
    "_forward_s" (time in the shared draft and target forwards). quest: see quest_selection."""
    n = tokens.shape[0]
    device = target.output.weight.device
    x = tokens.to(device)[None]  # [1, n]
    args = target.args
    hkv, B = args.n_kv_heads, len(runs)
    need_draft_attn = {r.topp for r in runs if r.method in ("specattn",) + BUDGETED}
    has_h2o = any(r.method == "h2o" for r in runs)

    d_cache = draft.new_cache(max_len=n)
    t_cache = target.new_cache(batch_size=B, max_len=n)
    h2o_scores = [torch.zeros(B, hkv, n, device=device) for _ in range(args.n_layers)] if has_h2o else None
    stats = {r.name: dict(nll=0.0, tokens=0, kv_read=0, kv_dense=0, kv_read_sparse=0, kv_dense_sparse=0,
                          select_s=0.0, **({"logits": []} if keep_logits else {})) for r in runs}
    acceptance_sum, acceptance_n, forward_s = 0.0, 0, 0.0

    # Prefill, dense and unscored. H2O accumulates attention from it, in chunks small
    # enough that the attention maps of a long prefill stay in memory.
    t0 = time.perf_counter()
    draft(x[:, :prefill], cache=d_cache)
    chunk = max(16, (1 << 24) // (B * args.n_heads * prefill)) if has_h2o else prefill
    for s0 in range(0, prefill, chunk):
        out = target(x[:, s0:min(prefill, s0 + chunk)].expand(B, -1), cache=t_cache, return_attn=has_h2o)
        if has_h2o:
            _accumulate(h2o_scores, out[1], hkv)
    forward_s += time.perf_counter() - t0

    blocks = range(prefill, n - 1, gamma)
    for start in (progress(blocks) if progress else blocks):
        end = min(start + gamma, n - 1)
        block, labels = x[:, start:end], x[0, start + 1:end + 1]
        T, past = end - start, start

        # The draft reads the block once; its attention rows serve every p and method.
        t0 = time.perf_counter()
        if need_draft_attn:
            d_logits, d_probs = draft(block, cache=d_cache, return_attn=True)
        else:
            d_logits = draft(block, cache=d_cache)
        forward_s += time.perf_counter() - t0
        specattn_sel = {}
        for p in need_draft_attn:
            t0 = time.perf_counter()
            specattn_sel[p] = draft_selection(d_probs, past, layer_map, hkv, _with_p(cfg, p), causal=True)
            if f"specattn@{p}" in stats:  # baselines use this selection's budget; its time is SpecAttn's
                stats[f"specattn@{p}"]["select_s"] += time.perf_counter() - t0

        selections = [{} for _ in runs]  # per run: layer -> bool [1, Hkv, T, past]

        def select(layer, q, k_past):
            if layer < cfg.dense_layers:
                return None
            rows = []
            for b, r in enumerate(runs):
                t0 = time.perf_counter()
                if r.method == "dense":
                    keep = torch.ones(1, hkv, T, past, dtype=torch.bool, device=device)
                elif r.method == "specattn":
                    keep = specattn_sel[r.topp][layer]
                elif r.method == "oracle":
                    keep = oracle_selection(q[b:b + 1], k_past[b:b + 1], hkv, _with_p(cfg, r.topp))
                else:
                    budget = specattn_sel[r.topp][layer].sum(-1)  # [1, Hkv, T]: SpecAttn's count per row
                    if r.method == "quest":
                        keep = quest_selection(q[b:b + 1], k_past[b:b + 1], budget, quest)
                    elif r.method == "streamingllm":
                        keep = streaming_selection(budget, past)
                    else:
                        keep = h2o_selection(h2o_scores[layer][b:b + 1, :, :past], budget, past)
                stats[r.name]["select_s"] += time.perf_counter() - t0
                if r.method != "dense":
                    selections[b][layer] = keep
                rows.append(keep.expand(1, hkv, T, past))
            return torch.cat(rows)  # [B, Hkv, T, past]

        t0 = time.perf_counter()
        out = target(block.expand(B, -1), cache=t_cache, select=select, return_attn=has_h2o)
        forward_s += time.perf_counter() - t0
        logits = out[0] if has_h2o else out  # [B, T, V]
        if has_h2o:
            _accumulate(h2o_scores, out[1], hkv)
        nll = F.cross_entropy(logits.flatten(0, 1), labels.repeat(B), reduction="none").view(B, T).sum(1)
        for b, r in enumerate(runs):
            st = stats[r.name]
            st["nll"] += nll[b].item()
            st["tokens"] += T
            read, dense, read_sp, dense_sp = count_kv_reads(selections[b], args.n_layers, hkv, past,
                                                            sparse_layers=range(cfg.dense_layers, args.n_layers))
            st["kv_read"] += read
            st["kv_dense"] += dense
            st["kv_read_sparse"] += read_sp
            st["kv_dense_sparse"] += dense_sp
            if keep_logits:
                st["logits"].append(logits[b].cpu())
            if r.method == "dense":
                p_t, q_d = logits[b].softmax(-1), d_logits[0].float().softmax(-1)
                acceptance_sum += torch.minimum(p_t, q_d).sum().item()
                acceptance_n += T
    for st in stats.values():
        if keep_logits:
            st["logits"] = torch.cat(st["logits"])
    stats["_acceptance"] = acceptance_sum / acceptance_n if acceptance_n else None
    stats["_forward_s"] = forward_s
    return stats


def _with_p(cfg: SelectionConfig, p: float) -> SelectionConfig:
    return dataclasses.replace(cfg, topp=p)


def _accumulate(scores, probs, hkv):
    """Add each layer's attention [B, Hq, T, S] (keys 0..S-1) into per-KV-head totals [B, Hkv, n]."""
    for layer, p in enumerate(probs):
        B, Hq, T, S = p.shape
        scores[layer][..., :S] += p.view(B, hkv, Hq // hkv, T, S).sum((2, 3))


# ----------------------------------------------------------------------------------------
# Results


def summarize(books: list[dict], runs: list[Run]) -> list[dict]:
    """One row per run, NLL and counts summed over books (not averaged per book)."""
    rows, dense_ppl = [], None
    for r in runs:
        tot = {k: sum(b["runs"][r.name][k] for b in books)
               for k in ("nll", "tokens", "kv_read", "kv_dense", "kv_read_sparse", "kv_dense_sparse", "select_s")}
        ppl = math.exp(tot["nll"] / tot["tokens"])
        if r.method == "dense":
            dense_ppl = ppl
        rows.append({"method": r.method, "topp": r.topp, "ppl": ppl, "tokens": tot["tokens"],
                     "kv_saved": 1 - tot["kv_read"] / tot["kv_dense"],
                     "kv_saved_sparse_layers": 1 - tot["kv_read_sparse"] / tot["kv_dense_sparse"]
                     if tot["kv_dense_sparse"] else 0.0,
                     "select_s": tot["select_s"]})
    for row in rows:
        row["ppl_increase_pct"] = 100 * (row["ppl"] / dense_ppl - 1) if dense_ppl else None
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| method | p | perplexity | Δ vs dense | KV reads saved (all / sparse layers) | tokens | "
             "selection time (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        delta = "" if r["ppl_increase_pct"] is None else f"{r['ppl_increase_pct']:+.2f}%"
        lines.append(f"| {r['method']} | {'' if r['topp'] is None else r['topp']} | {r['ppl']:.3f} | {delta} | "
                     f"{100 * r['kv_saved']:.1f}% / {100 * r['kv_saved_sparse_layers']:.1f}% | {r['tokens']} | "
                     f"{r['select_s']:.1f} |")
    return "\n".join(lines)


def plot_pareto(rows: list[dict], path):
    from calibrate import pyplot

    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((100 * r["kv_saved"], r["ppl_increase_pct"]) for r in rows if r["method"] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=method)
    ax.set_xlabel("KV reads saved, all layers (%)")
    ax.set_ylabel("perplexity increase vs dense (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"saved {path}")


# ----------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Perplexity vs KV reads on PG-19 for SpecAttn, the oracle and baselines. "
                    "With no flags: the offline demo (SmolLM2-135M, its trained 4-layer draft, two Gutenberg books).")
    parser.add_argument("--topp", type=float, nargs="+", default=[0.9], help="SpecAttn top-p value(s) in (0, 1]")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help=f"subset of {' '.join(METHODS)}")
    parser.add_argument("--data", help="PG-19 directory (test/*.txt, metadata.csv), a .txt book, or .jsonl/.parquet "
                        "with a 'text' column (default: the demo books)")
    parser.add_argument("--split", default="test", help="PG-19 split folder")
    parser.add_argument("--books", type=int, help="evaluate only the first N books")
    add_pair_arguments(parser)
    parser.add_argument("--layer-map", help="layer map JSON from calibrate.py (default: calibrated once, cached)")
    parser.add_argument("--protocol", choices=["paper", "long"], default="paper",
                        help="paper: first 2048 tokens per book, books shorter are skipped; long: up to "
                             "--max-tokens per book")
    parser.add_argument("--max-tokens", type=int, help="tokens per book (paper: 2048; long: 32768)")
    parser.add_argument("--prefill-frac", type=float, default=0.1, help="leading fraction read densely, not scored")
    parser.add_argument("--gamma", type=int, default=4, help="block size (draft tokens per speculative step)")
    parser.add_argument("--dense-layers", type=int, default=2, help="first target layers kept dense for all methods")
    parser.add_argument("--sinks", type=int, default=SelectionConfig.sinks,
                        help="SpecAttn: always read the first N positions (attention sinks), whatever the draft says")
    parser.add_argument("--quest-page", type=int, default=QuestConfig.page,
                        help="Quest: keys per page (its paper: 16); each page's min and max cost 2/page of the "
                             "keys' bytes, not counted in the KV reads")
    parser.add_argument("--quest-pin", choices=QUEST_PINS, default="none",
                        help="diagnostic: Quest always takes its first page (first) or its first and newest "
                             "pages (first-last) inside the same page budget; none is Quest as published")
    parser.add_argument("--combine", choices=["union", "mean"], default="union",
                        help="SpecAttn: running union of the draft rows' top-p sets, or top-p of their running mean")
    parser.add_argument("--per-head", action="store_true", help="select per KV head (draft heads must group into "
                        "the target's KV heads)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--out", default="results.json", help="results JSON, rewritten after every book")
    parser.add_argument("--plot", help="save perplexity increase vs KV reads saved to this PNG (needs matplotlib)")
    args = parser.parse_args(argv)
    for p in args.topp:
        if not (0 < p <= 1):
            parser.error(f"--topp must be in (0, 1], got {p}")
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {' '.join(METHODS)}")
    if "dense" not in args.methods:
        args.methods = ["dense"] + args.methods  # every row is reported against dense
    if args.quest_page < 1:
        parser.error("--quest-page must be >= 1")
    if not (0 <= args.prefill_frac < 1) or args.gamma < 1:
        parser.error("--prefill-frac must be in [0, 1) and --gamma >= 1")
    args.max_tokens = args.max_tokens or (2048 if args.protocol == "paper" else 32768)
    return args


STORE_TIMEOUT = timedelta(days=7)  # how long rank 0 may wait for the others' last books


def init_distributed(device):
    """(rank, world size, device, store). Under `torchrun --nproc-per-node N`: N processes,
    each on GPU LOCAL_RANK when there are GPUs, that meet only through torch.distributed's
    key-value store (the one torchrun hosts), and only to hand their results to rank 0.
    Books need no collectives, so there is no process group and nothing to tear down:
    with a gloo group, the two-process test failed now and then with a rank aborting
    (SIGABRT), even with a barrier before destroy_process_group.
    Without torchrun: a single process, rank 0 of 1, no store."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, device, None
    import torch.distributed as dist

    store, rank, world = next(dist.rendezvous("env://", timeout=STORE_TIMEOUT))
    if torch.cuda.is_available() and device != "cpu":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    return rank, world, device or "cpu", store


def main(argv=None):
    args = parse_args(argv)
    rank, world, args.device, store = init_distributed(args.device)
    try:
        if args.data is None:
            from demo import demo_books

            args.data = demo_books()
        books = load_books(args.data, args.split, args.books)
        dtype = getattr(torch, args.dtype) if args.dtype else None
        target, draft, tokenizer = load_pair(args.target, args.draft, parse_layers(args.draft_layers),
                                             device=args.device, dtype=dtype, bos=args.bos)
        if args.max_tokens > target.args.max_seq_len:
            raise ValueError(f"--max-tokens {args.max_tokens} exceeds the target's "
                             f"{target.args.max_positions_text()}; use --max-tokens {target.args.max_seq_len} or less")
        from calibrate import layer_map_for

        if rank != 0:  # rank 0 calibrates (and caches) first; the others then read its cache
            store.wait(["layer_map"])
        layer_map = layer_map_for(target, draft, tokenizer, args.layer_map)
        if rank == 0 and world > 1:
            store.set("layer_map", "ready")
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"error: {e}")

    from tqdm import tqdm

    cfg = SelectionConfig(topp=args.topp[0], dense_layers=args.dense_layers, combine=args.combine, sinks=args.sinks,
                          per_head=args.per_head)
    runs = make_runs(args.methods, args.topp)
    min_tokens = args.max_tokens if args.protocol == "paper" else 16 * args.gamma
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    config["bos"] = tokenizer.add_bos  # what --bos resolved to: was BOS put before each book
    results = {"config": config,
               "layer_map": layer_map, "books": [], "summary": []}
    # With several processes, process r scores books r, r + N, ... and writes its own file as
    # it goes; rank 0 merges them at the end (NLL and counts summed over books, in book order).
    out = Path(args.out) if world == 1 else Path(args.out).with_suffix(f".rank{rank}.json")
    for order, book in tqdm(list(enumerate(books))[rank::world], desc="books", file=sys.stderr, disable=rank > 0):
        ids = tokenizer.encode(book["text"])  # with BOS in front where the checkpoint (or --bos) says
        if len(ids) < min_tokens:
            tqdm.write(f"warning: skipping book {book['id']} ({book['title']}): {len(ids)} tokens, the "
                       f"{args.protocol} protocol needs {min_tokens}", file=sys.stderr)
            continue
        tokens = torch.tensor(ids[:args.max_tokens])
        prefill = max(1, int(args.prefill_frac * len(tokens)))
        stats = score_book(target, draft, tokens, runs, layer_map, cfg, args.gamma, prefill,
                           progress=lambda it: tqdm(it, desc=f"book {book['id']}", leave=False, file=sys.stderr,
                                                    disable=rank > 0),
                           quest=QuestConfig(page=args.quest_page, pin=args.quest_pin))
        results["books"].append({"id": book["id"], "title": book["title"], "order": order, "tokens": len(tokens),
                                 "prefill": prefill, "expected_acceptance": stats.pop("_acceptance"),
                                 "forward_s": stats.pop("_forward_s"), "runs": stats})
        results["summary"] = summarize(results["books"], runs)
        out.write_text(json.dumps(results, indent=1))
    if world > 1:  # every rank posts its books; rank 0 waits for all of them and merges
        store.set(f"books/{rank}", json.dumps(results["books"]))
        if rank != 0:
            return
        keys = [f"books/{r}" for r in range(world)]
        store.wait(keys)
        parts = [json.loads(store.get(key)) for key in keys]
        results["books"] = sorted((b for part in parts for b in part), key=lambda b: b["order"])
        if results["books"]:
            results["summary"] = summarize(results["books"], runs)
            Path(args.out).write_text(json.dumps(results, indent=1))
    if not results["books"]:
        sys.exit(f"error: no book has the {min_tokens} tokens the {args.protocol} protocol needs; "
                 f"use longer books or a smaller --max-tokens")
    acc = [b["expected_acceptance"] for b in results["books"]]
    print(format_table(results["summary"]))
    forward = sum(b["forward_s"] for b in results["books"])
    print(f"\n{len(results['books'])} book(s), {args.protocol} protocol, {args.max_tokens} tokens, "
          f"prefill {args.prefill_frac:.0%}, γ={args.gamma}; draft/target expected acceptance "
          f"Σmin(p,q) = {sum(acc) / len(acc):.3f}; shared draft + target forwards {forward:.0f} s "
          f"(all runs batched){f', {world} processes' if world > 1 else ''}"
          f"{f'; Quest pages of {args.quest_page}' if args.quest_page != QuestConfig.page else ''}"
          f"{f'; Quest with --quest-pin {args.quest_pin} (a diagnostic)' if args.quest_pin != 'none' else ''}. "
          f"Results: {args.out}")
    if args.plot:
        plot_pareto(results["summary"], args.plot)


if __name__ == "__main__":
    main()
