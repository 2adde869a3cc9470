"""PG-19 perplexity against KV reads: SpecAttn, an oracle and four baselines, same tokens.

    python eval_pg19.py --topp 0.9                 # the offline demo (fetched once)
    python eval_pg19.py --data pg19/ --target Llama-2-7b --draft TinyLlama --topp 0.8 0.9 0.95
    torchrun --nproc-per-node 8 eval_pg19.py --data pg19/ ...   # books sharded over 8 GPUs

Protocol ("paper", after the SpecAttn paper): per book, the first --max-tokens (2048)
tokens; the first 10% is prefill (dense); the rest is scored teacher-forced in blocks of
γ tokens. For each block the draft reads the block and returns its attention, every
method chooses which cached positions each target layer reads, and the target scores
the block with that sparse attention. Perplexity = exp(mean NLL) over scored tokens; beside it,
the share of scored positions where the target's argmax is the dense target's (where greedy
verification through that selection would emit the exact target's token), and where it is the
draft's (where greedy verification would keep the draft's token: each method's acceptance).

Causality. The selection used to predict token x[t+1] may depend only on what a real
decoder would have when predicting it: draft rows of queries <= t. Draft row t+1 has
read x[t+1], the label, so query t uses the running union (or mean) of rows block-start..t
(or, with --combine first, row block-start alone), never the whole block's. The same rule
holds for every method (the oracle uses the target's own row t; Quest scores pages with
query t). A block's KV reads are the union over its rows (see specattn.py for the accounting).

Methods (the first --dense-layers target layers stay dense for all of them):
  dense         every cached position
  specattn      the mapped draft layer's attention, top-p (one run per --topp value)
  oracle        top-p on the target's own attention in that layer: the ceiling for any predictor
  quest         pages of 16 tokens (--quest-page) ranked by the min/max key bound on q·k
                (Quest, 2024)
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
import functools
import hashlib
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

from calibrate import DEMO_DRAFT, add_pair_arguments, check_device, layer_map_for, load_pair, parse_layers
from demo import demo_books, demo_target
from kernels import check_topp, topp_mask
from model import check_memory, kv_cache_bytes, write_atomic
from specattn import (COMBINE, SelectionConfig, acceptance_probability, count_kv_reads, draft_selection,
                      window_attention, window_prefill)

METHODS = ("dense", "specattn", "oracle", "quest", "streamingllm", "h2o")
BUDGETED = ("quest", "streamingllm", "h2o")
SINKS = 4

# ----------------------------------------------------------------------------------------
# Data


def load_books(data, split: str = "test", limit=None) -> tuple[list[dict], list[dict]]:
    """(books [{id, title, text, sha1}], skipped [{id, title, reason}]) from a PG-19
    directory (split/*.txt + metadata.csv), a .txt file, or a .jsonl/.parquet file with a
    'text' column. Files are read as Python reads text (universal newlines: the demo books'
    \r\n line ends become \n). Books that cannot be evaluated (empty, not UTF-8 text, a
    duplicate) are skipped with a one-line warning, never an exception; `limit` counts books kept."""
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"--data {path}: not found; pass a PG-19 directory or a "
                                ".txt/.jsonl/.parquet file")
    entries = []  # (id, title, text or bytes or None, where)
    if path.is_dir():
        folder = path / split if (path / split).is_dir() else path
        # numbered books (PG-19 ids) first, in numeric order, then the rest by name
        files = sorted(folder.glob("*.txt"),
                       key=lambda f: (not f.stem.isdigit(), int(f.stem) if f.stem.isdigit() else 0, f.stem))
        if not files:
            raise FileNotFoundError(f"--data {path}: no {split}/*.txt books found")
        titles = _pg19_titles(path / "metadata.csv")
        entries = [(f.stem, titles.get(f.stem, f.stem), f.read_bytes(), f.name) for f in files]
    elif path.suffix == ".txt":
        entries = [(path.stem, path.stem, path.read_bytes(), path.name)]
    elif path.suffix in (".jsonl", ".parquet"):
        for i, row in enumerate(_table_rows(path)):
            if isinstance(row, str):  # a line that is not a JSON object: its reason
                entries.append((str(i), str(i), None, row))
                continue
            text = row.get("text")
            entries.append((str(row.get("id", i)), str(row.get("short_book_title", row.get("title", i))),
                            text if isinstance(text, str) else None,
                            f"row {i}" + ("" if isinstance(text, str) else " has no 'text' string")))
    else:
        raise ValueError(f"--data {path}: expected a directory, .txt, .jsonl or .parquet")

    books, skipped, seen_ids, seen_text = [], [], set(), {}
    for book_id, title, text, where in entries:
        if limit and len(books) >= limit:
            break
        reason = None
        if isinstance(text, bytes):
            try:  # as Python reads text files: \r\n and \r line ends become \n
                text = text.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
            except UnicodeDecodeError as e:
                reason = f"{where} is not UTF-8 text (byte {e.start}); convert it to UTF-8"
        if reason is None and text is None:
            reason = where
        elif reason is None:
            text = text.lstrip("\ufeff")  # a byte-order mark is not text
            sha = hashlib.sha1(text.encode("utf-8")).hexdigest()
            if "\x00" in text:
                reason = f"{where} holds NUL bytes: binary data, not a book"
            elif not text.strip():
                reason = f"{where} is empty"
            elif book_id in seen_ids:
                reason = f"a second book with id {book_id}"
            elif sha in seen_text:
                reason = f"the same text as book {seen_text[sha]}"
        if reason:
            print(f"warning: skipping book {book_id} ({title}): {reason}", file=sys.stderr)
            skipped.append({"id": book_id, "title": title, "reason": reason})
            continue
        seen_ids.add(book_id)
        seen_text[sha] = book_id
        books.append({"id": book_id, "title": title, "text": text, "sha1": sha})
    return books, skipped


def _pg19_titles(meta: Path) -> dict:
    """{id: title} from PG-19's metadata.csv (id, title, ...); {} with a warning if unreadable."""
    if not meta.exists():
        return {}
    try:
        with open(meta, newline="", encoding="utf-8") as f:
            return {row[0]: row[1] for row in csv.reader(f) if len(row) >= 2 and row[0] != "id"}
    except (csv.Error, UnicodeDecodeError, OSError) as e:
        print(f"warning: {meta} is unreadable ({type(e).__name__}: {e}); books are titled by their ids",
              file=sys.stderr)
        return {}


def _table_rows(path: Path) -> list:
    """The rows of a .jsonl or .parquet file as dicts (a line that is not a JSON object: a
    string saying so, for load_books to skip)."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise RuntimeError("reading .parquet needs pyarrow: pip install pyarrow") from None
        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow's errors for a file that is not parquet
            raise ValueError(f"--data {path}: not a readable parquet file ({type(e).__name__})") from None
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            rows.append(row if isinstance(row, dict) else f"line {n} is not a JSON object")
    return rows


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


@dataclass(frozen=True)
class QuestConfig:
    page: int = 16  # keys per page, as in the Quest paper


def quest_selection(q: torch.Tensor, k_past: torch.Tensor, budget: torch.Tensor,
                    cfg: QuestConfig = QuestConfig()) -> torch.Tensor:
    """Quest: per page of cfg.page keys, the upper bound sum_d max(q_d min_d, q_d max_d) of
    q·k; the top round(budget / page) pages per KV head and query (bounds summed over the
    group). Reading each page's min and max costs 2 / page of the keys' bytes on top of the pages
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
    # [B, Hkv, G, T, P]: per query head and page, the largest q·k any key of the page could give
    bound = torch.maximum(qg * k_min[:, :, None, None], qg * k_max[:, :, None, None]).sum(-1)
    n_sel = (budget.float() / page).round().clamp(min=1).long()
    n_sel = torch.where(budget >= past, n_pages, n_sel)  # a full budget reads every page, the last too
    bound = bound.sum(2)  # [B, Hkv, T, P]
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


def oracle_selection(q: torch.Tensor, k_past: torch.Tensor, n_kv_heads: int,
                     cfg: SelectionConfig) -> torch.Tensor:
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
def score_book(target, draft, tokens: torch.Tensor, runs: list[Run], layer_map, cfg: SelectionConfig,
               gamma: int, prefill: int, progress=None, keep_logits: bool = False,
               quest: QuestConfig = QuestConfig(), draft_window: int = 0) -> dict:
    """Teacher-forced NLL of tokens[prefill + 1:] for every run.

    The runs go through the target side by side as one batch (row b = runs[b], each with
    its own KV cache row and its own selection), so the weights are read once per block
    for all of them; on a CPU that is most of the cost. Returns {run name: {nll, tokens,
    kv_read, kv_dense, kv_read_sparse, kv_dense_sparse, same_argmax (positions where its
    argmax is the dense run's; None without a dense run), draft_argmax (positions where its
    argmax is the draft's: greedy verification through it keeps the draft's token there),
    select_s, [logits]}} plus
    "_acceptance" (draft/target expected acceptance Σ min(p, q), temperature 1) and
    "_forward_s" (time in the shared draft and target forwards). quest: see quest_selection.
    draft_window: the draft reads position 0 and its newest draft_window - 1 positions
    (specattn.window_attention; 0: every position); its attention rows, from which SpecAttn
    selects, still cover every position."""
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
    dense_row = next((b for b, r in enumerate(runs) if r.method == "dense"), None)
    stats = {r.name: dict(nll=0.0, tokens=0, kv_read=0, kv_dense=0, kv_read_sparse=0, kv_dense_sparse=0,
                          same_argmax=0 if dense_row is not None else None, draft_argmax=0, select_s=0.0,
                          **({"logits": []} if keep_logits else {})) for r in runs}
    acceptance_sum, acceptance_n, forward_s = 0.0, 0, 0.0

    # Prefill, unscored: the target dense, the draft through its window if it has one. H2O
    # accumulates attention from the target's, in chunks small enough that the attention maps
    # of a long prefill stay in memory.
    t0 = time.perf_counter()
    draft_attend = window_attention(draft_window, draft) if draft_window else None  # None: the model's own slot
    if draft_window:
        window_prefill(draft, x[:, :prefill], d_cache, draft_window)
    else:
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
            d_logits, d_probs = draft(block, cache=d_cache, return_attn=True, attend=draft_attend)
        else:
            d_logits = draft(block, cache=d_cache, attend=draft_attend)
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
        # Where a run's greedy choice is the dense target's: what greedy verification would emit
        # (a sparse run's other choices are tokens its speculative decoding emits that the exact
        # target's would not).
        top = logits.argmax(-1)  # [B, T]
        same_argmax = (top == top[dense_row]).sum(1).tolist() if dense_row is not None else None
        draft_argmax = (top == d_logits[0].argmax(-1)).sum(1).tolist()  # greedy acceptance, per position
        for b, r in enumerate(runs):
            st = stats[r.name]
            st["nll"] += nll[b].item()
            st["tokens"] += T
            sparse = range(cfg.dense_layers, args.n_layers)
            read, dense, read_sp, dense_sp = count_kv_reads(selections[b], args.n_layers, hkv, past,
                                                            sparse_layers=sparse)
            st["kv_read"] += read
            st["kv_dense"] += dense
            st["kv_read_sparse"] += read_sp
            st["kv_dense_sparse"] += dense_sp
            if same_argmax is not None:
                st["same_argmax"] += same_argmax[b]
            st["draft_argmax"] += draft_argmax[b]
            if keep_logits:
                st["logits"].append(logits[b].cpu())
            if r.method == "dense":
                acceptance_sum += acceptance_probability(logits[b], d_logits[0]).sum().item()
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
               for k in ("nll", "tokens", "kv_read", "kv_dense", "kv_read_sparse", "kv_dense_sparse")}
        ppl = math.exp(tot["nll"] / tot["tokens"])
        if r.method == "dense":
            dense_ppl = ppl
        # (None where a book was scored without a dense run beside it, or read from a results
        # file that lacks the count)
        same = [b["runs"][r.name].get("same_argmax") for b in books]
        draft_same = [b["runs"][r.name].get("draft_argmax") for b in books]
        rows.append({"method": r.method, "topp": r.topp, "ppl": ppl, "tokens": tot["tokens"],
                     "kv_saved": 1 - tot["kv_read"] / tot["kv_dense"],
                     "kv_saved_sparse_layers": 1 - tot["kv_read_sparse"] / tot["kv_dense_sparse"]
                     if tot["kv_dense_sparse"] else 0.0,
                     "argmax_as_dense": None if None in same else sum(same) / tot["tokens"],
                     "argmax_as_draft": None if None in draft_same else sum(draft_same) / tot["tokens"]})
    for row in rows:
        row["ppl_increase_pct"] = 100 * (row["ppl"] / dense_ppl - 1) if dense_ppl else None
    return rows


def format_table(rows: list[dict], select_s: dict | None = None) -> str:
    """The summary as a markdown table; select_s: {run name: seconds choosing positions} in this run."""
    select_s = select_s or {}
    lines = ["| method | p | perplexity | Δ vs dense | KV reads saved (all / sparse layers) | argmax = dense's "
             "| argmax = draft's | tokens | selection time (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        delta = "" if r["ppl_increase_pct"] is None else f"{r['ppl_increase_pct']:+.2f}%"
        share = {k: "" if r.get(k) is None else f"{100 * r[k]:.1f}%" for k in ("argmax_as_dense", "argmax_as_draft")}
        lines.append(f"| {r['method']} | {'' if r['topp'] is None else r['topp']} | {r['ppl']:.3f} | {delta} "
                     f"| {100 * r['kv_saved']:.1f}% / {100 * r['kv_saved_sparse_layers']:.1f}% "
                     f"| {share['argmax_as_dense']} | {share['argmax_as_draft']} "
                     f"| {r['tokens']} | {select_s.get(Run(r['method'], r['topp']).name, 0.0):.1f} |")
    return "\n".join(lines)


def plot_pareto(rows: list[dict], path):
    from calibrate import pyplot

    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = [r for r in rows if r["method"] != "dense"]  # dense is the origin: 0% saved, +0%
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((100 * r["kv_saved"], r["ppl_increase_pct"]) for r in rows if r["method"] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=method)
    # Increases span three decades (the oracle's +2% to Quest's +2500%): a log axis shows them
    # all (symmetric-log if a method ever scores below dense, itself a red flag).
    if all(r["ppl_increase_pct"] > 0 for r in rows):
        ax.set_yscale("log")
    else:
        ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xlabel("KV reads saved, all layers (%)")
    ax.set_ylabel("perplexity increase over dense (%)")
    ax.legend(title="lower right is better")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"saved {path}")


# ----------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Perplexity vs KV reads on PG-19 for SpecAttn, the oracle and baselines. With no flags: "
                    "the offline demo (SmolLM2-135M, its trained 4-layer draft, two Gutenberg books).")
    parser.add_argument("--topp", type=float, nargs="+", default=[0.9],
                        help="SpecAttn top-p value(s) in (0, 1]")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help=f"subset of {' '.join(METHODS)}")
    parser.add_argument("--data", help="PG-19 directory (test/*.txt, metadata.csv), a .txt book, or "
                        ".jsonl/.parquet with a 'text' column (default: the demo books)")
    parser.add_argument("--split", default="test", help="PG-19 split folder")
    parser.add_argument("--books", type=int, help="evaluate only the first N books")
    add_pair_arguments(parser)
    parser.add_argument("--layer-map",
                        help="layer map JSON from calibrate.py (default: calibrated once, cached)")
    parser.add_argument("--protocol", choices=["paper", "long"], default="paper",
                        help="paper: first 2048 tokens per book, books shorter are skipped; long: up to "
                             "--max-tokens per book")
    parser.add_argument("--max-tokens", type=int, help="tokens per book (paper: 2048; long: 32768)")
    parser.add_argument("--prefill-frac", type=float, default=0.1,
                        help="leading fraction read densely, not scored")
    parser.add_argument("--gamma", type=int, default=4, help="block size (draft tokens per speculative step)")
    parser.add_argument("--dense-layers", type=int, default=2,
                        help="first target layers kept dense for all methods")
    parser.add_argument("--draft-window", type=int, default=0, metavar="N",
                        help="the draft reads position 0 and its newest N - 1 positions, as generation's draft "
                             "does by default with its training window (specattn.py --draft-window); its "
                             "attention rows still cover every position. 0: the draft reads every position")
    experiments = parser.add_argument_group(
        "experiments", "variants of SpecAttn's selection and of a baseline; the defaults are "
                       "the methods as described")
    experiments.add_argument("--sinks", type=int, default=SelectionConfig.sinks,
                             help="SpecAttn: always read the first N positions (attention sinks), "
                                  "whatever the draft says")
    experiments.add_argument("--quest-page", type=int, default=QuestConfig.page,
                             help="Quest: keys per page (its paper: 16); each page's min and max cost "
                                  "2/page of the keys' bytes, not counted in the KV reads")
    experiments.add_argument("--combine", choices=COMBINE, default="union",
                             help="SpecAttn: running union of the draft rows' top-p sets, top-p of their "
                                  "running mean, or the block's first row's top-p set for every query")
    experiments.add_argument("--per-head", action="store_true",
                             help="SpecAttn: select per KV head (draft heads must group into the "
                                  "target's KV heads)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--out", default="results.json",
                        help="results JSON, rewritten (atomically) after every book. Rerunning the same "
                             "command resumes it: books already in it are not scored again. Timings go to "
                             "<out>.timings.json, so that the results of equal runs are identical")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out even if it holds results of other settings (default: refuse)")
    parser.add_argument("--plot",
                        help="save perplexity increase vs KV reads saved to this PNG (needs matplotlib)")
    args = parser.parse_args(argv)
    for p in args.topp:
        try:
            check_topp(p, "--topp")
        except ValueError as err:
            parser.error(str(err))
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {' '.join(METHODS)}")
    if "dense" not in args.methods:
        args.methods = ["dense"] + args.methods  # every row is reported against dense
    if args.quest_page < 1:
        parser.error("--quest-page must be >= 1")
    if args.draft_window < 0:
        parser.error("--draft-window must be >= 0 (0: the draft reads every position)")
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


def checkpoint_identity(path) -> str:
    """A checkpoint's name and a digest of its config.json and weight files' names and sizes
    (cheap, and enough to tell one checkpoint from another)."""
    path = Path(path).resolve()
    digest = hashlib.sha1((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        digest.update(f"{f.name}:{f.stat().st_size}".encode())
    return f"{path.name}@{digest.hexdigest()[:12]}"


def run_settings(args, target, draft, layer_map, tokenizer) -> dict:
    """Everything a book's results depend on. A results file is resumed only under equal settings."""
    target_dir = args.target or demo_target()
    demo_draft = args.target is None and args.draft_layers is None
    draft_dir = args.draft or (DEMO_DRAFT if demo_draft else target_dir)
    keys = ("draft_layers", "protocol", "max_tokens", "prefill_frac", "gamma", "dense_layers", "sinks",
            "combine", "per_head", "methods", "topp", "quest_page", "split")
    return {"target": checkpoint_identity(target_dir), "draft": checkpoint_identity(draft_dir),
            "layer_map": layer_map, **{k: getattr(args, k) for k in keys},
            "dtype": str(target.output.weight.dtype).removeprefix("torch."), "bos": tokenizer.add_bos,
            "sink_distance": draft.args.sink_distance,
            **({"draft_window": args.draft_window} if args.draft_window else {})}  # files without it: 0


def previous_results(out: Path, settings: dict, books: list[dict]) -> list[dict]:
    """Books already scored in `out` (and in the per-process files of an interrupted torchrun)
    under these settings. Results written under other settings are never mixed in: that is
    a one-line error naming the first setting that differs."""
    found = {}
    for file in [out] + sorted(out.parent.glob(f"{out.stem}.rank*.json")):
        if not file.exists():
            continue
        try:
            prev = json.loads(file.read_text(encoding="utf-8"))
            prev_settings, prev_books = prev["settings"], prev["books"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{file} is not a results file of this program ({type(e).__name__}); pass "
                             "--overwrite to replace it, or another --out") from None
        for key in settings:
            if prev_settings.get(key) != settings[key]:
                raise ValueError(f"{file} holds results with {key}={prev_settings.get(key)!r}, and this run "
                                 f"has {key}={settings[key]!r}; pass --overwrite to "
                                 "replace them, or another --out")
        found.update({b["id"]: b for b in prev_books})
    by_id = {b["id"]: b for b in books}
    for book_id, b in found.items():
        if book_id in by_id and b.get("sha1") != by_id[book_id]["sha1"]:
            raise ValueError(f"{out}: book {book_id} was scored from another text than --data now holds; "
                             "pass --overwrite to replace the results, or another --out")
    return [found[b["id"]] for b in books if b["id"] in found]


def eval_memory(target, draft, n_runs: int, max_tokens: int, gamma: int, has_h2o: bool) -> int:
    """Bytes score_book allocates: the KV caches (a target row per run, one draft row), H2O's
    score tables, and a block's logits and attention maps."""
    elem = target.output.weight.element_size()
    caches = kv_cache_bytes(target.args, n_runs, max_tokens, target.output.weight.dtype) + \
        kv_cache_bytes(draft.args, 1, max_tokens, draft.output.weight.dtype)
    h2o = 4 * target.args.n_layers * n_runs * target.args.n_kv_heads * max_tokens if has_h2o else 0
    block = 4 * (n_runs + 1) * gamma * target.args.vocab_size * 3 + \
        4 * target.args.n_layers * (n_runs + 1) * target.args.n_heads * gamma * max_tokens
    return caches + h2o + block + 2 * elem * n_runs * gamma * target.args.hidden_dim


def main(argv=None):
    args = parse_args(argv)
    rank, world, args.device, store = init_distributed(args.device)
    out = Path(args.out)
    try:
        check_device(args.device)
        if args.data is None:
            args.data = demo_books()
        books, skipped = load_books(args.data, args.split, args.books)
        if not books:
            raise ValueError(f"--data {args.data}: no book to evaluate ({len(skipped)} skipped, "
                             "the warnings above say why)")
        dtype = getattr(torch, args.dtype) if args.dtype else None
        target, draft, tokenizer = load_pair(args.target, args.draft, parse_layers(args.draft_layers),
                                             device=args.device, dtype=dtype, bos=args.bos,
                                             sink_distance=args.sink_distance)
        if args.max_tokens > target.args.max_seq_len:
            raise ValueError(f"--max-tokens {args.max_tokens} exceeds the "
                             f"target's {target.args.max_positions_text()}; use "
                             f"--max-tokens {target.args.max_seq_len} or less")
        runs = make_runs(args.methods, args.topp)
        has_h2o = any(r.method == "h2o" for r in runs)
        need = eval_memory(target, draft, len(runs), args.max_tokens, args.gamma, has_h2o)
        fits = next((n for n in (16384, 8192, 4096, 2048, 1024, 512) if n < args.max_tokens and
                     eval_memory(target, draft, len(runs), n, args.gamma, has_h2o) <= need / 2), None)
        check_memory(need, target.output.weight.device, f"scoring {len(runs)} runs "
                                                        f"over {args.max_tokens} tokens",
                     f"use fewer --topp values or --methods{f', or --max-tokens {fits}' if fits else ''}")
        if rank != 0:  # rank 0 calibrates (and caches) first; the others then read its cache
            store.wait(["layer_map"])
        layer_map = layer_map_for(target, draft, tokenizer, args.layer_map)
        if rank == 0 and world > 1:
            store.set("layer_map", "ready")
        settings = run_settings(args, target, draft, layer_map, tokenizer)
        done = [] if args.overwrite else previous_results(out, settings, books)
    except (ValueError, FileNotFoundError, RuntimeError, MemoryError, OSError) as e:
        sys.exit(f"error: {e}")

    from tqdm import tqdm

    cfg = SelectionConfig(topp=args.topp[0], dense_layers=args.dense_layers, combine=args.combine,
                          sinks=args.sinks, per_head=args.per_head)
    min_tokens = args.max_tokens if args.protocol == "paper" else 16 * args.gamma
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "overwrite"}
    config["bos"] = tokenizer.add_bos  # what --bos resolved to: was BOS put before each book
    config["sink_distance"] = draft.args.sink_distance  # what --sink-distance resolved to
    results = {"config": config, "settings": settings, "layer_map": layer_map, "books": [], "skipped": [],
               "summary": []}
    timings = {}  # book id -> seconds; kept apart from the results, so that reruns give identical JSON
    done_ids = {b["id"] for b in done}
    if done and rank == 0:
        print(f"resuming {out}: {len(done)} of {len(books)} books already scored", file=sys.stderr)
    # With several processes, process r scores books r, r + N, ... and writes its own file as
    # it goes; rank 0 merges them at the end (NLL and counts summed over books, in book order).
    own = out if world == 1 else out.with_name(f"{out.stem}.rank{rank}.json")
    results["books"] = list(done) if world == 1 else []
    todo = [(order, b) for order, b in list(enumerate(books))[rank::world] if b["id"] not in done_ids]
    try:
        for order, book in tqdm(todo, desc="books", file=sys.stderr, disable=rank > 0):
            ids = tokenizer.encode(book["text"])  # with BOS in front where the checkpoint (or --bos) says
            if len(ids) < min_tokens:
                reason = f"{len(ids)} tokens, the {args.protocol} protocol needs {min_tokens}"
                tqdm.write(f"warning: skipping book {book['id']} "
                           f"({book['title']}): {reason}", file=sys.stderr)
                results["skipped"].append({"id": book["id"], "title": book["title"], "reason": reason})
                continue
            tokens = torch.tensor(ids[:args.max_tokens])
            prefill = max(1, int(args.prefill_frac * len(tokens)))
            bar = functools.partial(tqdm, desc=f"book {book['id']}", leave=False, file=sys.stderr,
                                    disable=rank > 0)
            stats = score_book(target, draft, tokens, runs, layer_map, cfg, args.gamma, prefill, progress=bar,
                               quest=QuestConfig(page=args.quest_page), draft_window=args.draft_window)
            timings[book["id"]] = {"forward_s": stats.pop("_forward_s"),
                                   "select_s": {name: st.pop("select_s") for name, st in stats.items()
                                                if isinstance(st, dict)}}
            results["books"].append({"id": book["id"], "title": book["title"], "sha1": book["sha1"],
                                     "order": order, "tokens": len(tokens), "prefill": prefill,
                                     "expected_acceptance": stats.pop("_acceptance"), "runs": stats})
            results["books"].sort(key=lambda b: b["order"])
            results["summary"] = summarize(results["books"], runs)
            write_atomic(own, json.dumps(results, indent=1))
    except KeyboardInterrupt:
        n = len(results["books"]) if world == 1 else len(done) + len(results["books"])
        sys.exit(f"interrupted: {n} book(s) scored are saved in {own}; rerun the same command to resume")
    if world > 1:  # every rank posts its books; rank 0 waits for all of them and merges
        store.set(f"books/{rank}", json.dumps({"books": results["books"], "skipped": results["skipped"],
                                               "timings": timings, "device": str(args.device)}))
        if rank != 0:
            return
        keys = [f"books/{r}" for r in range(world)]
        store.wait(keys)
        parts = [json.loads(store.get(key)) for key in keys]
        merged = {b["id"]: b for b in done} | {b["id"]: b for part in parts for b in part["books"]}
        results["books"] = sorted(merged.values(), key=lambda b: b["order"])
        results["skipped"] = [s for part in parts for s in part["skipped"]]
        timings = {k: v for part in parts for k, v in part["timings"].items()}
        results["config"]["device"] = [part["device"] for part in parts]  # rank r's device
    results["skipped"] = skipped + sorted(results["skipped"], key=lambda s: s["id"])
    if results["books"]:
        results["summary"] = summarize(results["books"], runs)
        write_atomic(out, json.dumps(results, indent=1))
    if timings:
        write_atomic(out.with_name(f"{out.stem}.timings.json"), json.dumps(timings, indent=1))
    for f in out.parent.glob(f"{out.stem}.rank*.json") if world > 1 else []:
        f.unlink(missing_ok=True)  # merged into out
    if not results["books"]:
        sys.exit(f"error: no book has the {min_tokens} tokens the {args.protocol} protocol needs; "
                 f"use longer books or a smaller --max-tokens")
    acc = [b["expected_acceptance"] for b in results["books"]]
    select_s = {}
    for t in timings.values():
        for name, sec in t["select_s"].items():
            select_s[name] = select_s.get(name, 0.0) + sec
    print(format_table(results["summary"], select_s))
    forward = sum(t["forward_s"] for t in timings.values())
    print(f"\n{len(results['books'])} book(s) ({len(timings)} scored in this run, "
          f"{len(results['skipped'])} skipped), "
          f"{args.protocol} protocol, {args.max_tokens} tokens, "
          f"prefill {args.prefill_frac:.0%}, γ={args.gamma}; draft/target expected acceptance "
          f"Σmin(p,q) = {sum(acc) / len(acc):.3f}; shared draft + target forwards {forward:.0f} s "
          f"(all runs batched){f', {world} processes' if world > 1 else ''}"
          f"{f'; Quest pages of {args.quest_page}' if args.quest_page != QuestConfig.page else ''}. "
          f"Results: {args.out}")
    if args.plot:
        plot_pareto(results["summary"], args.plot)


if __name__ == "__main__":
    main()
