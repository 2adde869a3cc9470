"""GPU benchmark of the generation engine that `specattn.py` runs (no parallel harness).

Every row below runs `specattn.SpecEngine`: the same fixed buffers, device-side cache
lengths and captured CUDA graphs a user's `python specattn.py --device cuda` runs.

(a) demo pair: SmolLM2-135M + its trained 4-layer draft (`draft/`), real weights, prompts
    cut from the demo books; batch 1, 8, 32, 64 x contexts 1k, 4k and the longest that
    fits the model's 8192 positions. Plain decoding (the target alone), dense speculative
    decoding, SpecAttn; tokens/s side by side (SpecAttn sparse from --sparse-from positions;
    each step's γ chosen up to --gamma and SpecAttn's verification, sparse or dense, chosen per
    step, as specattn.py runs; --gamma 2,3,4 --fixed-gamma also runs the speculative modes once
    per fixed γ, --also-always-sparse SpecAttn once with every step past --sparse-from sparse,
    --also-combine SpecAttn once more per other selection: the default is the draft's first
    row with continuous batching, the union otherwise, specattn.default_combine;
    --also-draft-vocab N dense speculation and SpecAttn once more with the draft proposing
    from N tokens (specattn.py --draft-vocab); --rounds R
    serves each row's prompts in R parts, plain, dense and SpecAttn taking turns on each part,
    and gives their ratios paired by part: where one mode's edge over another is a few percent,
    as at batch 1, this tells it from the GPU's drift over a run).
(b) random-weight Llama-3-8B / Llama-3.2-1B shapes at batch 1 / 128k and batch 8 / 32k:
    one whole speculative step (γ draft steps + selection + verification + acceptance) of
    the engine, dense verification vs SpecAttn at the p that keeps ~25% of the draft
    rows' positions. Random weights accept nothing, so this row times a step, not tokens.
(c) the peer: Hugging Face transformers `generate` with a static cache on the same demo
    target, batch 1 (transformers is on the GPU image; imported only here, optional), timed
    --peer-runs times per context: the median and the range (it varies from run to run).
(d) the kernels alone (`--parts kernels`, not in the default): top-p against the sort
    reference, the sparse attention against SDPA, the attention's launch choices; after
    `kernels.check_on_gpu`. Its last tables also run alone: (e) `--parts merge`, the
    attention's merge variants and its splits per KV head at the demo's batch-1 decode shapes;
    (f) `--parts window`, the draft's attention reading its whole cache or its window, without
    and with SpecAttn's row, and a prompt's prefill (the target's, the draft's whole and through
    its window); (i) `--parts linear`, below.
(g) `--parts cpu`, alone and with no GPU: the demo pair on the CPU, each forward and the
    generation with model.Linear's few-row matmul form against F.linear.
(h) `--parts profile --batches 1 --contexts 1024`: where a decode step's GPU time goes, kernel
    by kernel (torch.profiler over CUDA graph replays), for plain decoding, dense speculation
    and SpecAttn (sparse every step, reading about 20% of the cached positions, PROFILE_KEPT)
    at the demo pair's shapes (random weights).
(i) `--parts linear` (also in d): a decode step's matmuls with their prologues, 1-8 rows at the
    demo target's shapes, kernels.decode_linear (both forms) against the separate kernels it
    replaces; then its row-by-row form per launch (output columns and warps per program, a
    program per row or per column block).

    python bench.py --out DIR               # (a), (c), then (b)
    python bench.py --parts demo,hf         # some parts
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

import specattn as SA
import kernels as K
from calibrate import HelpFormatter, check_sink_distance, layer_map_for, load_pair
from kernels import topp_mask_reference
from model import ModelArgs, Transformer, cache_attention, write_atomic

TARGET_8B = ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=14336,
                      vocab_size=128256, rope_theta=500000.0, max_seq_len=131072 + 512)
DRAFT_1B = ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, hidden_dim=8192,
                     vocab_size=128256, rope_theta=500000.0, max_seq_len=131072 + 512,
                     tie_word_embeddings=True)
LAYER_MAP_8B = [j // 2 for j in range(32)]  # a monotone 32 -> 16 map, as calibrate.py would give
# The demo pair's shapes (SmolLM2-135M and its 4-layer draft), for the random-weight tables (f).
DEMO_TARGET = ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, hidden_dim=1536,
                        vocab_size=49152, rope_theta=1e5, max_seq_len=8192, tie_word_embeddings=True)
DEMO_DRAFT = replace(DEMO_TARGET, n_layers=4)


def random_model(args: ModelArgs, seed: int) -> Transformer:
    """A decode-ready random-weight model of these shapes, bf16 on the GPU."""
    return SA.random_model(args, "cuda", torch.bfloat16, seed)


def topp_for_fraction(rows: torch.Tensor, fraction: float) -> float:
    """The p at which top-p keeps about `fraction` of the positions of these rows."""
    lo, hi = 1e-4, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        kept = topp_mask_reference(rows, mid).float().mean().item()
        lo, hi = (mid, hi) if kept < fraction else (lo, mid)
    return (lo + hi) / 2


def time_steps(engine: SA.SpecEngine, steps: int) -> float:
    """ms per engine step (graph replays on a GPU), after the first (which captures)."""
    engine.step()
    if engine.t_cache.k.device.type != "cuda":
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        return (time.perf_counter() - start) * 1e3 / steps
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        engine.step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def filled_engine(target, draft, B: int, S: int, gamma: int, selection, use_specattn: bool,
                  cuda_graphs: bool = True, layer_map=LAYER_MAP_8B, room: int = 256) -> SA.SpecEngine:
    """An engine whose rows already hold S random cached positions and tokens (as after a
    prefill), with room for `room` more; draft None: plain decoding. The speculative engine
    looks up each row's context as generation does (SA.LOOKUP)."""
    engine = SA.SpecEngine(target, draft, batch_size=B, max_len=S + room, gamma=gamma, layer_map=layer_map,
                           selection=selection, use_specattn=use_specattn, cuda_graphs=cuda_graphs,
                           lookup=SA.LOOKUP if draft is not None else 0)
    filled = ((engine.t_cache, S),) + (((engine.d_cache, S - 1),) if draft is not None else ())
    for cache, n in filled:  # draft: all but prev (see SpecEngine)
        cache.k.normal_()
        cache.v.normal_()
        cache.set_lengths([n] * B)
    engine.last.random_(0, target.args.vocab_size)
    engine.prev.random_(0, target.args.vocab_size)
    if engine.lookup:
        engine.hist.random_(0, target.args.vocab_size)
    engine.done.zero_()
    engine.max_new.fill_(S)  # never reached in the timed steps
    return engine


def first_step_draft_rows(target, draft, B: int, S: int, gamma: int, combine: str, **engine_args) -> torch.Tensor:
    """The draft's attention rows of a first step on rows filled as filled_engine fills them,
    [used draft layers, B, γ or 1, S]: what SpecAttn's top-p cuts, so that a table can pick the p
    that keeps a given share of the positions (topp_for_fraction). engine_args: filled_engine's."""
    probe = filled_engine(target, draft, B, S, gamma, SA.SelectionConfig(topp=0.5, combine=combine), True,
                          cuda_graphs=False, **engine_args)
    probe._draft_phase()
    return probe.draft_rows[..., :S]


@torch.no_grad()
def bench_8b(say, configs=((1, 131072), (8, 32768)), gamma: int = 4, steps: int = 20) -> None:
    """(b): whole speculative steps of the engine on random 8B/1B-shaped weights. SpecAttn
    selects from the mean of the γ draft rows (combine="mean": one top-p launch) at the p
    that keeps ~25% of these draft rows' positions, found on the rows a step really makes."""
    target, draft = random_model(TARGET_8B, 0), random_model(DRAFT_1B, 1)
    say(f"## (b) whole speculative step through the engine, random 8B / 1B shapes, γ={gamma} "
        f"(ms per step, CUDA graph replays, mean of {steps})")
    say("| B | S | dense spec step | SpecAttn step | kept | speed-up |")
    say("|---|---|---|---|---|---|")
    for B, S in configs:
        rows = first_step_draft_rows(target, draft, B, S, gamma, "mean").mean(2)[:2]  # [2 draft layers, B, S]
        p = topp_for_fraction(rows, 0.25)
        rows = None
        times = {}
        for mode, cfg in (("dense", SA.SelectionConfig(combine="mean")),
                          ("specattn", SA.SelectionConfig(topp=p, combine="mean"))):
            engine = filled_engine(target, draft, B, S, gamma, cfg, mode == "specattn")
            times[mode] = time_steps(engine, steps)
            if mode == "specattn":
                kept = (engine.sel_count.float().mean() / S).item()
            engine = None  # the next engine's memory check collects it (specattn.check_engine_memory)
        say(f"| {B} | {S} | {times['dense']:.3f} | {times['specattn']:.3f} | {kept:.0%} | "
            f"{times['dense'] / times['specattn']:.2f}x |")


PROFILE_STEPS = 32  # steps bench_profile times and profiles
PROFILE_KEPT = 0.2  # the share of cached positions SpecAttn reads there: the demo's at 7.9k, p = 0.9 (80.7% saved)


def profile_room(steps: int, gamma: int) -> int:
    """Positions a profiled engine's rows grow by: a first step and `steps` more, γ + 1 each at most."""
    return (steps + 1) * (gamma + 1)


@torch.no_grad()
def bench_profile(say, batches, contexts, gamma: int, steps: int = PROFILE_STEPS, top: int = 12,
                  pair=None, kept: float = PROFILE_KEPT) -> dict:
    """(h): where a decode step's time goes, kernel by kernel. Plain decoding, dense
    speculation and SpecAttn (γ fixed; SpecAttn verifying sparsely every step, selecting from
    the first draft row at the top-p that keeps `kept` of the positions of the rows a step
    makes) on rows that already hold `context` random cached positions, at the demo pair's
    shapes with random weights (a kernel's time does not depend on the weights, and nothing is
    downloaded; the selection's size does depend on the draft's attention, hence `kept`).
    torch.profiler records `steps` steps (CUDA graph replays) after the first (which
    captures); each table groups the GPU's kernels by name, calls and µs per step, and sets
    their sum against the step's time measured without the profiler: the rest is the GPU
    waiting between kernels. pair=(target, draft): other models (the tests' tiny pair on a CPU,
    where the rows are the CPU's operators, self time).
    Returns {(mode, batch, context): {name: (calls per step, µs per step)}}."""
    from torch.profiler import ProfilerActivity, profile
    target, draft = pair or (random_model(DEMO_TARGET, seed=0),
                             random_model(replace(DEMO_DRAFT, sink_distance=512), seed=1))
    on_gpu = target.output.weight.is_cuda
    models = "the demo pair's shapes, random weights, bf16" if pair is None else "the given pair"
    say(f"## (h) where a decode step's time goes: {models}; {steps} steps profiled (torch.profiler, "
        f"{'CUDA graph replays' if on_gpu else 'CPU operators'}); the speculative modes propose γ={gamma} every step, "
        f"SpecAttn verifying sparsely every step, reading about {kept:.0%} of the cached positions")
    n_target, n_draft = target.args.n_layers, draft.args.n_layers
    layer_map = [j * n_draft // n_target for j in range(n_target)]  # monotone, as calibrate.py would give
    tables = {}
    for B, S, mode in itertools.product(batches, contexts, SA.MODES):
        g = 0 if mode == "plain" else gamma
        selection = SA.SelectionConfig()
        if mode == "specattn":  # the top-p that keeps `kept` of the positions, on the rows a first step makes
            rows = first_step_draft_rows(target, draft, B, S, g, "first", layer_map=layer_map,
                                         room=profile_room(steps, g))[:, :, 0]  # [used draft layers, B, S]
            selection = SA.SelectionConfig(topp=topp_for_fraction(rows, kept), combine="first")
            rows = None

        def build():  # rows with room for a first step (which captures) and `steps` more
            return filled_engine(target, draft if g else None, B, S, g, selection, mode == "specattn",
                                 cuda_graphs=None, layer_map=layer_map if mode == "specattn" else None,
                                 room=profile_room(steps, g))
        engine = build()
        step_us = time_steps(engine, steps) * 1e3  # the step's own time, the profiler off
        engine = None  # freed before the next one allocates
        engine = build()  # rows as new for the profiled steps
        engine.step()  # its capture, not profiled
        with profile(activities=[ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU],
                     acc_events=True) as prof:  # (one recording: without it, torch warns it keeps only the last)
            for _ in range(steps):
                engine.step()
            if on_gpu:
                torch.cuda.synchronize()
        reads = (f", SpecAttn reading {(engine.sel_count.float().mean() / S).item():.0%} of the cached positions "
                 f"(top-p {selection.topp:.3g} of the first draft row)" if mode == "specattn" else "")
        engine = None
        per_step = {}  # kernel -> (calls per step, µs per step)
        for e in prof.key_averages():
            us = e.self_device_time_total if on_gpu else e.self_cpu_time_total
            if us > 0:
                per_step[e.key] = (e.count / steps, us / steps)
        tables[mode, B, S] = per_step
        busy_us = sum(us for _, us in per_step.values())
        calls = sum(n for n, _ in per_step.values())
        say(f"### {mode}, batch {B}, {S} cached positions: a step {step_us:.1f} µs, "
            f"{calls:.0f} kernels busy for {busy_us:.1f} µs ({busy_us / step_us:.0%}){reads}")
        say("| kernel | calls per step | µs per call | µs per step | share of the step |")
        say("|---|---|---|---|---|")
        ranked = sorted(per_step.items(), key=lambda kv: -kv[1][1])
        rest = ranked[top:]
        for name, (n, us) in ranked[:top]:
            say(f"| `{name[:72]}` | {n:.1f} | {us / n:.2f} | {us:.1f} | {us / step_us:.1%} |")
        if rest:
            n_rest, us_rest = sum(n for _, (n, _) in rest), sum(us for _, (_, us) in rest)
            say(f"| {len(rest)} others | {n_rest:.1f} | | {us_rest:.1f} | {us_rest / step_us:.1%} |")
    return tables


@torch.no_grad()
def bench_demo(say, batches, contexts, max_new_tokens: int, gammas: list[int], topp: float, layer_map_path=None,
               prompts_per_row: int = 1, sparse_from: int = SA.SPARSE_FROM, fixed_gamma: bool = False,
               sink_distance=None, draft_window=None, also_always_sparse: bool = False,
               combine: str = "union", also_combine=(), refill: bool = True, rounds: int = 1,
               also_draft_vocab: int = 0, lookup: int = SA.LOOKUP, also_lookup=None, also_topp=(),
               sparse_margin: float = SA.SPARSE_MARGIN, also_sparse_margin=()) -> dict:
    """(a): the demo pair through run_modes, every (batch, context); with prompts_per_row > 1,
    each batch row serves that many prompts in turn (continuous batching; refill=False: fixed
    batches, one after another). Plain decoding runs once, the speculative modes once choosing
    each step's γ up to the largest of gammas, and SpecAttn each step's verification, sparse or
    dense (rows "dense", "specattn", as specattn.py runs them); with fixed_gamma, once more per
    γ in gammas with every step proposing it ("dense γ=2" and so on); with also_always_sparse,
    SpecAttn once more verifying sparsely every step past sparse_from ("specattn always
    sparse"); for each of also_combine, SpecAttn once more with that way of making the draft
    rows one selection ("specattn first": see specattn.COMBINE; `combine` is the other rows');
    with also_draft_vocab N, dense speculation and SpecAttn once more with the draft proposing
    from the N tokens most frequent in the calibration book ("dense vocab N": see
    specattn.draft_vocabulary). lookup: the speculative modes propose from a row's context after
    a repeat of this many tokens (specattn.SpecEngine; 0: the draft alone); with also_lookup N,
    dense speculation and SpecAttn once more with lookup N ("dense lookup N"); for each P of
    also_topp, SpecAttn once more cutting the draft rows at top-p P ("specattn p=P");
    sparse_margin: SpecAttn's VerifyChooser's, and for each M of also_sparse_margin, SpecAttn
    once more with that margin ("specattn margin M").
    sink_distance: the draft's (None: its config's, 512); draft_window: the draft's attention
    window (None: its training window, the same 512; see specattn.SpecEngine). rounds > 1:
    each row's prompts in that many parts, plain, dense and SpecAttn taking turns on each part
    (run_modes(rounds=...)), and after each table the ratios of those three paired by part:
    median and range over the parts. Returns {(batch, context): {label: tokens/s}}."""
    target, draft, tokenizer = load_pair(device="cuda", sink_distance=sink_distance)

    layer_map = layer_map_for(target, draft, tokenizer, layer_map_path)
    selection = SA.SelectionConfig(topp=topp, sparse_from=sparse_from, combine=combine)
    window = SA.draft_window_of(draft, draft_window)
    vocab = SA.pair_draft_vocab(tokenizer, target, draft, also_draft_vocab)
    fixed = f" and fixed at {','.join(map(str, gammas))}" if fixed_gamma else ""
    say(f"## (a) demo pair (SmolLM2-135M target, 4-layer draft), bf16, greedy, "
        f"γ chosen per step up to {max(gammas)}{fixed}, "
        f"SpecAttn p={topp} "
        f"(selecting from the draft rows: {combine}, --combine; sparse from {sparse_from} positions; "
        f"a sparse step where it promises {1 + sparse_margin:g}x dense's tokens/s, --sparse-margin), "
        f"the draft's sink at {draft.args.sink_distance} "
        f"(--sink-distance), its attention window "
        f"{window or 'off'} (--draft-window), {max_new_tokens} new tokens per prompt, "
        f"rows proposing from their context after a repeat of {lookup} tokens (--lookup; 0: off), "
        f"{prompts_per_row} prompt(s) per batch row"
        + ("" if prompts_per_row == 1 else " (continuous batching)" if refill else " (fixed batches, --fixed-batches)")
        + (f", in {rounds} rounds (--rounds: plain, dense and SpecAttn take turns on each round's prompts)"
           if rounds > 1 else ""))
    header_done = False
    rates = {}
    for context in contexts:
        for B in batches:
            prompts = SA.book_prompts(tokenizer, B * prompts_per_row, context)
            results = {}
            # (modes, the rows' tag, the run_modes arguments in which the run differs from the first)
            first = dict(gamma=max(gammas), selection=selection, adaptive_gamma=True, choose_verification=True,
                         draft_vocab=None, lookup=lookup, sparse_margin=sparse_margin)
            runs = [(SA.MODES, "", {})]
            runs += [(("dense", "specattn"), f" γ={g}", dict(gamma=g, adaptive_gamma=False))
                     for g in gammas if fixed_gamma]
            runs += [(("specattn",), " always sparse", dict(choose_verification=False))] * also_always_sparse
            runs += [(("specattn",), f" {c}", dict(selection=replace(selection, combine=c))) for c in also_combine]
            if also_draft_vocab:  # (every token: vocab None, the draft's whole head)
                runs += [(("dense", "specattn"), f" vocab {also_draft_vocab}", dict(draft_vocab=vocab))]
            if also_lookup is not None:
                runs += [(("dense", "specattn"), f" lookup {also_lookup}", dict(lookup=also_lookup))]
            runs += [(("specattn",), f" p={p}", dict(selection=replace(selection, topp=p))) for p in also_topp]
            runs += [(("specattn",), f" margin {m}", dict(sparse_margin=m)) for m in also_sparse_margin]
            for modes, tag, differs in runs:
                run = {**first, **differs}
                for mode, result in SA.run_modes(target, draft, prompts, max_new_tokens, run.pop("gamma"), 0.0,
                                                 layer_map, run.pop("selection"), modes, batch_size=B,
                                                 draft_window=window, refill=refill, rounds=rounds, **run).items():
                    results[mode + ("" if mode == "plain" else tag)] = result
            table = SA.results_table(results, B, context, len(prompts), sparse_from, verification_chosen=True)
            for line in (table[:-1] if not header_done else table[2:-1]):
                say(line)
            header_done = True
            if rounds > 1:
                say(f"| ↳ paired by round (batch {B}, context {context}): "
                    + "; ".join(f"{a} / {b} {round_ratios(results[a][1], results[b][1])}"
                                for a, b in [("dense", "plain"), ("specattn", "dense")]
                                + [(f"specattn γ={g}", f"dense γ={g}") for g in gammas if fixed_gamma]
                                + [(f"specattn {c}", "dense") for c in also_combine]
                                + [(f"{m} vocab {also_draft_vocab}", m) for m in ("dense", "specattn")
                                   if also_draft_vocab]
                                + [(m, f"{m} lookup {also_lookup}") for m in ("dense", "specattn")
                                   if also_lookup is not None]
                                + [(f"specattn p={p}", "dense") for p in also_topp]
                                + [(f"specattn margin {m}", "dense") for m in also_sparse_margin])
                    + " |")
            rates[(B, context)] = {mode: st.decode_rate for mode, (_, st) in results.items()}
            torch.cuda.empty_cache()
    say(table[-1])
    return rates


def round_ratios(a: SA.SpecStats, b: SA.SpecStats) -> str:
    """a's tokens/s over b's, round by round (the same prompts, served one after the other):
    the median and the range over the rounds."""
    ratios = [x / y for x, y in zip(a.round_rates, b.round_rates)]
    return f"{statistics.median(ratios):.3f}x ({min(ratios):.3f}-{max(ratios):.3f}, {len(ratios)} rounds)"


@torch.no_grad()
def bench_hf(say, contexts, max_new_tokens: int, runs: int = 3, device: str = "cuda",
             dtype=torch.bfloat16) -> dict:
    """(c): transformers' generate with a static cache on the demo target, batch 1, greedy.
    Each context is timed `runs` times after the warm-up: its speed varies from run to run
    far more than the engine's, so the table gives the median and the range, and the
    ratios use the median. Returns {context: (median tokens/s, [every run's])}."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        why = ("is not installed" if importlib.util.find_spec("transformers") is None else
               f"failed to import ({e}): from 5.25 on it imports Hugging Face's `kernels` package, "
               "whose name kernels.py here shadows; pip install 'transformers<5.25'")
        say(f"(c) transformers {why}: no peer row")
        return {}
    from demo import demo_target

    path = demo_target()
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    tokenizer = SA.Tokenizer.from_pretrained(path)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    say("## (c) peer: transformers generate(cache_implementation=\"static\"), same target, batch 1, greedy")
    say(f"| context | new tokens | tokens/s (median of {runs} runs) | range |")
    say("|---|---|---|---|")
    rates = {}
    for context in contexts:
        ids = torch.tensor(SA.book_prompts(tokenizer, 1, context), device=device)
        def timed(n: int) -> tuple[float, int]:
            sync()
            t0 = time.perf_counter()
            out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              cache_implementation="static", pad_token_id=tokenizer.eos_id)
            sync()
            return time.perf_counter() - t0, out.shape[1] - ids.shape[1]

        for n in (1, max_new_tokens, 1, max_new_tokens):  # compile and warm up both cache sizes
            timed(n)
        # As for the engine: the tokens after the first over the time past the prefill (the
        # prefill and first token timed alone, then subtracted from a whole generation).
        each = []
        for _ in range(runs):
            for _attempt in range(5):  # a busy machine can make the short run the slower one
                first_s, _ = timed(1)
                whole_s, n = timed(max_new_tokens)
                if whole_s > first_s:
                    break
            else:
                raise RuntimeError(f"the peer's {max_new_tokens}-token generate was no slower than its 1-token "
                                   "one five times over: timing noise dominates; use more --max-new-tokens")
            each.append((n - 1) / (whole_s - first_s))
        median = statistics.median(each)
        rates[context] = (median, each)
        say(f"| {context} | {n} | {median:.1f} | {min(each):.1f}-{max(each):.1f} |")
    return rates


def hbm_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus written."""
    from triton.testing import do_bench

    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), return_mode="median")
    return 2 * x.numel() / (ms * 1e-3)



def graphed(fn):
    """Capture fn's launches in a CUDA graph; returns a replay function. Timing replays
    measures the GPU work alone, without Python's per-launch overhead."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay



def bench_kernels(out_dir=None):
    """(d): the kernels alone: top-p against the sort reference, the sparse attention against SDPA,
    and the attention's launch choices. Checks the kernels first (kernels.check_on_gpu)."""
    from triton.testing import do_bench

    assert torch.cuda.is_available(), "--parts kernels needs a CUDA GPU"
    dev = "cuda"
    lines = []

    def say(s=""):
        print(s, flush=True)
        lines.append(s)

    bw = hbm_bandwidth()
    say(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {K.triton.__version__}")
    say(f"# HBM copy bandwidth (read + write): {bw / 1e12:.2f} TB/s")

    topp_shapes = ((32, 4096), (32, 32768), (32, 131072), (120, 32768), (15, 131072))  # (rows, N)
    K.check_on_gpu(topp_shapes)
    say("# correctness: top-p (mask, counts) and sparse attention (bf16, "
        "rel err < 1e-2) match the references")

    say()
    say("## top-p, fp32, p=0.9: ms, median; eager (Python launches) / CUDA graph (GPU work alone)")
    say("120 rows of 32k and 15 of 128k are what bench.py selects on at batch 8 / 32k and batch 1 / 128k")
    say("| rows | N | sort reference | Triton mask | Triton select (idx+count) "
        "| speed-up, graph (mask / select) | read-once floor |")
    say("|---|---|---|---|---|---|---|")
    for rows, n in topp_shapes:
        w = torch.softmax(4 * torch.randn(rows, n, device=dev), -1)
        times = []
        for fn in (lambda: K.topp_mask_reference(w, 0.9), lambda: K.topp_mask(w, 0.9),
                   lambda: K.topp_select(w, 0.9)):
            times.append((do_bench(fn, return_mode="median"), do_bench(graphed(fn), return_mode="median")))
        floor = w.numel() * 4 / bw * 1e3
        cells = " | ".join(f"{e:.4f} / {g:.4f}" for e, g in times)
        say(f"| {rows} | {n} | {cells} | {times[0][1] / times[1][1]:.1f}x / {times[0][1] / times[2][1]:.1f}x "
            f"| {floor:.4f} |")

    say()
    say("## verification attention: 8 queries, 32 q-heads / 8 KV heads, D=128, bf16, batch 1")
    say("ms, median, CUDA graph replays; GB/s on the bytes each variant must read (K+V rows read, idx)")
    say("| S | SDPA dense | kernel dense | kernel 25% | kernel 10% | 25% vs kernel dense | 25% vs SDPA | "
        "GB/s dense | GB/s 25% | GB/s 10% |")
    say("|---|---|---|---|---|---|---|---|---|---|")
    T, Hq, Hkv, D = 8, 32, 8, 128
    for S in (8192, 32768, 131072):
        q = torch.randn(1, Hq, T, D, device=dev, dtype=torch.bfloat16)
        kc = torch.randn(1, Hkv, S + T, D, device=dev, dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        mask = torch.ones(T, S + T, dtype=torch.bool, device=dev)
        mask[:, S:] = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
            q, kc, vc, attn_mask=mask, enable_gqa=True)
        row = [do_bench(graphed(sdpa), return_mode="median"),
               do_bench(graphed(lambda: K.sparse_attention(q, kc, vc, S)), return_mode="median")]
        gbs = [(S + T) * Hkv * D * 2 * 2 / (row[1] * 1e-3) / 1e9]
        for frac in (0.25, 0.10):
            idx, count = K.random_selection(1, Hkv, S, frac, dev)
            t = do_bench(graphed(lambda: K.sparse_attention(q, kc, vc, S, idx, count)), return_mode="median")
            read = (count.sum().item() + Hkv * T) * D * 2 * 2 + count.sum().item() * 4
            row.append(t)
            gbs.append(read / (t * 1e-3) / 1e9)
        say(f"| {S} | {row[0]:.4f} | {row[1]:.4f} | {row[2]:.4f} | {row[3]:.4f} | {row[1] / row[2]:.1f}x | "
            f"{row[0] / row[2]:.1f}x | {gbs[0]:.0f} | {gbs[1]:.0f} | {gbs[2]:.0f} |")
    say()
    bench_launch(say)
    say()
    bench_merge(say)
    say()
    bench_draft_window(say)
    say()
    bench_decode_linear(say)
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        write_atomic(Path(out_dir) / "kernels_bench.md", "\n".join(lines) + "\n")


def decode_attention_us(T: int, S: int, variants: dict, window: int = 0, layers: int = 30) -> list[float]:
    """SmolLM2's decode attention at batch 1 (9 q-heads / 3 KV heads, D=64, bf16; T queries, S
    cached positions, one row length on the device, RoPE and the cache write in the launch;
    window: the draft's): each of `variants` ({name: sparse_attention keyword arguments}) first
    checked against the reference (bf16 vs fp32, rel err < 1e-2), then timed in a CUDA graph of
    `layers` calls on as many caches, as a step runs them. µs per call, in variants' order."""
    from triton.testing import do_bench

    dev, Hq, Hkv, D = "cuda", 9, 3, 64
    kc = [torch.randn(1, Hkv, S + 138, D, device=dev, dtype=torch.bfloat16) for _ in range(layers)]
    vc = [torch.randn_like(k) for k in kc]
    q = torch.randn(1, Hq, T, D, device=dev, dtype=torch.bfloat16)
    new_kv = tuple(torch.randn(2, 1, Hkv, T, D, device=dev, dtype=torch.bfloat16))
    angles = torch.rand(1, T, D, device=dev) * 100
    block = dict(new_kv=new_kv, rope=(angles.cos(), angles.sin()), window=window)
    lengths = torch.full((1,), S, dtype=torch.int32, device=dev)
    ref = K.sparse_attention_reference(q.float(), kc[0].float(), vc[0].float(), lengths,
                                       **{**block, "new_kv": tuple(x.float() for x in new_kv)})
    for name, kw in variants.items():
        got = K.sparse_attention(q, kc[0], vc[0], lengths, **block, **kw).float()
        err = ((got - ref).norm() / ref.norm()).item()
        assert err < 1e-2, f"attention {name}, {T} queries, {S} positions: rel err {err:.2e}"

    def step(kw):
        return lambda: [K.sparse_attention(q, kc[i], vc[i], lengths, **block, **kw) for i in range(layers)]
    return [1e3 * do_bench(graphed(step(kw)), return_mode="median") / layers for kw in variants.values()]


def launch_selection(B: int, S: int, frac, device="cpu", generator=None):
    """bench_launch's selection for B rows of S cached positions, one list per row shared by the
    KV heads (idx [B, 1, S], count [B, 1], as SpecAttn selects): frac 1.0 reads everything
    ((None, None)); a float keeps that share in every row; (low, high) keeps low..high, evenly
    spread over the rows. Returns (selection, the table's label)."""
    if frac == 1.0:
        return (None, None), "100%"
    if isinstance(frac, tuple):  # each row keeps its own share
        rows = [K.random_selection(1, 1, S, f, device, generator) for f in torch.linspace(*frac, B).tolist()]
        return tuple(torch.cat(parts) for parts in zip(*rows)), f"{frac[0]:.0%}-{frac[1]:.0%}"
    return K.random_selection(B, 1, S, frac, device, generator), f"{frac:.0%}"


def bench_launch(say) -> None:
    """(j): sparse_attention's launch choices (splits per KV head, keys per block) at the 8B
    target's heads and the demo target's, each against the default the kernel picks (each
    launch's output checked against the default's first)."""
    from triton.testing import do_bench
    assert torch.cuda.is_available(), "--parts launch needs a CUDA GPU"
    dev = "cuda"
    say("## launch choices: 5 queries (γ=4), bf16, one selection per batch row; the 8B target's heads "
        "(32 q / 8 KV, D=128) and the demo target's (9 q / 3 KV, D=64)")
    say("µs, median, CUDA graph replays. default = the choices sparse_attention makes; splits per head from")
    say("programs per multiprocessor (/SM), then block_n. kept a-b%: the batch rows keep a% to b% (evenly "
        "spread), as a step's rows differ")
    per_sm = (0.5, 1, 2, 3, 8)
    say("| heads | B | S | kept | default | " + " | ".join(
        f"{ps:g}/SM, {bn}" for ps in per_sm for bn in (64, 128)) + " |")
    say("|---|---|---|---|---|" + "---|" * 2 * len(per_sm))
    sm = K._sm_count(torch.device(dev))
    eight_b, demo = (32, 8, 128), (9, 3, 64)
    for (Hq, Hkv, D), B, S, frac in ((demo, 1, 7900, 0.1), (demo, 8, 7900, 0.1), (demo, 8, 7900, (0.05, 0.2)),
                                     (demo, 32, 4096, 0.1), (demo, 32, 7900, 1.0), (demo, 32, 7900, 0.1),
                                     (demo, 32, 7900, (0.05, 0.2)), (demo, 64, 7900, 0.1),
                                     (demo, 64, 7900, (0.05, 0.2)),
                                     (eight_b, 1, 8192, 1.0), (eight_b, 1, 8192, 0.25), (eight_b, 1, 32768, 0.25),
                                     (eight_b, 1, 131072, 0.25), (eight_b, 8, 8192, 0.25), (eight_b, 8, 32768, 0.25)):
        q = torch.randn(B, Hq, 5, D, device=dev, dtype=torch.bfloat16)
        kc = torch.randn(B, Hkv, S + 5, D, device=dev, dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        sel, kept = launch_selection(B, S, frac, dev)
        variants = [{}] + [
            {"n_splits": K.triton.cdiv(int(ps * sm), B * Hkv), "block_n": bn}
            for ps in per_sm for bn in (64, 128)]
        default = K.sparse_attention(q, kc, vc, S, *sel).float()
        for kw in variants[1:]:  # every launch computes the same attention, up to rounding
            err = (K.sparse_attention(q, kc, vc, S, *sel, **kw).float() - default).abs().max().item()
            assert err < 2e-2, f"launch {kw} at B={B} S={S}: max abs error {err:.3g} against the default's output"
        cells = [1e3 * do_bench(graphed(lambda: K.sparse_attention(q, kc, vc, S, *sel, **kw)),
                                return_mode="median") for kw in variants]
        say(f"| {Hq}/{Hkv}, {D} | {B} | {S} | {kept} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")


def bench_merge(say) -> None:
    """(e): the attention's merge at SmolLM2's batch-1 decode shapes (decode_attention_us), then
    its splits per KV head (bench_attention_splits)."""
    variants = {"rows": dict(merge="rows", merge_parts=1), "rows, 4 a load": dict(merge="rows", merge_parts=4),
                "flat": dict(merge="flat"), "default": {}}
    say("## the merge at SmolLM2's decode shapes: 9 q-heads / 3 KV heads, D=64, bf16, batch 1, one row length "
        "on the device, RoPE and the cache write in the launch")
    say("µs per call, median, a CUDA graph of 30 calls on 30 caches (one per layer, as a step runs them); "
        "queries: 1 (plain decoding, a draft step), 2 (a draft's first step), 5 (verification, γ=4); "
        "partials loaded per round trip: rows 1 (one ahead) or 4, flat 8; default: flat for one query, "
        "rows 4 a load for more")
    say("| queries | S | " + " | ".join(f"merge {v}" if v != "default" else v for v in variants) + " |")
    say("|---|---|" + "---|" * len(variants))
    for T in (1, 2, 5):
        for S in (1024, 4096, 7900):
            say(f"| {T} | {S} | " + " | ".join(f"{c:.2f}" for c in decode_attention_us(T, S, variants)) + " |")
    say()
    bench_attention_splits(say)


def bench_attention_splits(say, splits=(1, 2, 4, 8, 16), window: int = 512) -> None:
    """The attention's splits per KV head at SmolLM2's batch-1 decode shapes: sparse_attention's
    own choice against fixed n_splits (a call there reads ~1-12 MB: each split is a program whose
    partial the merge folds in, so fewer splits shorten the chain and more keep more loads in
    flight). The target's rows read the whole cache, the draft's (queries 1 and 2) through its
    window. Each variant checked, then timed, by decode_attention_us."""
    variants = {"default": {}, **{f"{n} splits": {"n_splits": n} for n in splits}}
    say(f"## splits per KV head at SmolLM2's decode shapes: 9 q-heads / 3 KV heads, D=64, bf16, batch 1, RoPE "
        f"and the cache write in the launch")
    say("µs per call, median, a CUDA graph of 30 calls on 30 caches; default: sparse_attention's choice; "
        f"window: the draft reading position 0 and its newest {window} positions")
    say("| queries | S | reads | default | " + " | ".join(f"{n} split{'s' * (n > 1)}" for n in splits) + " |")
    say("|---|---|---|---|" + "---|" * len(splits))
    cases = [(T, S, 0) for T in (1, 2, 5) for S in (1024, 4096, 7900)] + [(T, 4096, window) for T in (1, 2)]
    for T, S, win in cases:
        cells = decode_attention_us(T, S, variants, window=win)
        say(f"| {T} | {S} | {f'window {win}' if win else 'all'} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")


# The row-by-row form's launches that `--parts linear` compares: (output columns per program,
# warps per program, a program per row: row_grid); columns and warps both None: decode_linear's
# own choice; columns None alone: its default columns (8, 16 for weights over 1M entries).
LINEAR_LAUNCHES = ((None, None, False), (None, 4, False), (8, 2, False), (4, 1, False), (None, None, True),
                   (None, 4, True), (8, 2, True))


def bench_decode_linear(say, rows=(1, 2, 3, 4, 5, 8), layers: int = 30, device="cuda",
                        launches=LINEAR_LAUNCHES) -> None:
    """(i): kernels.decode_linear, in both forms (one row at a time; tensor_cores), against what
    it replaces, at the demo target's layer shapes: the compiled residual add + RMSNorm (or
    SwiGLU) kernel, then cuBLAS's matmul (F.linear); then the row-by-row form at each of
    `launches` (block_n, num_warps, row_grid), at the same rows.
    Each case is checked against the reference first (bf16 against fp32, rel err < 1e-2),
    then timed in a CUDA graph of `layers` calls on as many weights, as a step runs them (each
    call after one of its own kind: what a programmatic launch overlaps is its own kind).
    device="cpu" (the tests, under TRITON_INTERPRET=1): fp32, each case timed once, eagerly."""
    import model as M
    dev, dt = device, torch.bfloat16 if device == "cuda" else torch.float32

    def us(fn) -> float:  # µs for one run of fn
        if dev == "cuda":
            from triton.testing import do_bench
            return 1e3 * do_bench(graphed(fn), return_mode="median")
        t0 = time.perf_counter()
        fn()
        return 1e6 * (time.perf_counter() - t0)
    shapes = ((r"q\|k\|v after add + RMSNorm", 960, 576, "norm"), ("output", 576, 576, None),
              (r"gate\|up after add + RMSNorm", 3072, 576, "norm"), ("down after SwiGLU", 576, 1536, "swiglu"))
    weights = {name: [torch.randn(N, width, device=dev, dtype=dt) / width ** 0.5 for _ in range(layers)]
               for name, N, width, _ in shapes}

    def case(name, width, prologue, r):
        """(x, kwargs, checked(**launch)) for r rows: checked runs decode_linear once and asserts
        it matches the fp32 reference."""
        x = torch.randn(r, 2 * width if prologue == "swiglu" else width, device=dev, dtype=dt)
        delta = torch.randn(r, width, device=dev, dtype=dt)
        norm_weight = (1 + 0.1 * torch.randn(width, device=dev)).to(dt)
        kw = (dict(delta=delta, norm_weight=norm_weight, eps=1e-5) if prologue == "norm" else
              dict(swiglu=True) if prologue == "swiglu" else {})
        ref = K.decode_linear_reference(x.float(), weights[name][0].float(),
                                        **{k: v.float() if torch.is_tensor(v) else v for k, v in kw.items()})
        ref = ref[1] if prologue == "norm" else ref

        def checked(**launch):
            got = K.decode_linear(x, weights[name][0], **kw, **launch)
            got = got[1] if prologue == "norm" else got
            err = ((got.float() - ref).norm() / ref.norm()).item()
            assert err < 1e-2, f"decode_linear {name}, {r} rows, {launch}: rel err {err:.2e}"
        return x, kw, checked

    say("## a decode step's matmul with its prologue: kernels.decode_linear against the separate kernels")
    say(f"µs per call, median, a CUDA graph of {layers} calls on {layers} weights; the demo target's shapes, bf16; "
        "separate: the compiled add + RMSNorm or SwiGLU kernel, then cuBLAS (F.linear); decode_linear one row at "
        f"a time, then on the tensor cores (tensor_cores=True: K whole up to {K.DECODE_LINEAR_WHOLE_K} columns, "
        "wider in chunks of 256); the engine runs decode_linear one row at a time "
        f"up to {K.DECODE_LINEAR_ROWS} rows (kernels.decode_linear_suits)")
    say("| matmul | N x K | " + " | ".join(f"{r} rows: separate / one at a time / tensor cores" for r in rows) + " |")
    say("|---|---|" + "---|" * len(rows))
    for name, N, width, prologue in shapes:
        cells = []
        for r in rows:
            x, kw, checked = case(name, width, prologue, r)
            checked()
            checked(tensor_cores=True)

            def separate(w):
                if prologue == "norm":
                    h = M.Pointwise.add_rms_norm(x, kw["delta"], kw["norm_weight"], kw["eps"])[1]
                    return torch.nn.functional.linear(h, w)
                if prologue == "swiglu":
                    return torch.nn.functional.linear(M.Pointwise.swiglu(*x.chunk(2, -1)), w)
                return torch.nn.functional.linear(x, w)
            times = [us(lambda: [fn(w) for w in weights[name]]) / layers
                     for fn in (separate, lambda w: K.decode_linear(x, w, **kw),
                                lambda w: K.decode_linear(x, w, tensor_cores=True, **kw))]
            cells.append(" / ".join(f"{t:.2f}" for t in times))
        say(f"| {name} | {N} x {width} | " + " | ".join(cells) + " |")

    say("## decode_linear one row at a time, per launch: output columns per program x warps per program, a "
        "program per row or per column block")
    say("µs per call as above; 'its choice': decode_linear's own launch (block_n and num_warps None); 'default "
        "columns': 8, or 16 for weights over 1M entries; 'a program per row': row_grid=True; each launch checked "
        "against the reference first")

    def label(block_n, num_warps, row_grid):
        launch = "its choice" if block_n is None and num_warps is None else \
            f"{block_n or 'default'} columns, {num_warps} warps"
        return launch + (", a program per row" if row_grid else "")
    say("| matmul | rows | " + " | ".join(label(*launch) for launch in launches) + " |")
    say("|---|---|" + "---|" * len(launches))
    for name, N, width, prologue in shapes:
        for r in rows:  # past DECODE_LINEAR_ROWS too: where a program per row might take over from cuBLAS
            x, kw, checked = case(name, width, prologue, r)
            times = []
            for block_n, num_warps, row_grid in launches:
                launch = dict(block_n=block_n, num_warps=num_warps, row_grid=row_grid)
                checked(**launch)
                times.append(us(lambda: [K.decode_linear(x, w, **launch, **kw) for w in weights[name]]) / layers)
            say(f"| {name} | {r} | " + " | ".join(f"{t:.2f}" for t in times) + " |")


def bench_draft_window(say, window: int = 512) -> None:
    """The draft's attention at the demo draft's shapes, reading its whole cache or through its
    window (kernels.sparse_attention, window=), without and with SpecAttn's row over every
    position (return_last_row: with a window the same launch scores every position and reads
    values only in the window). Each variant is checked against the reference first."""
    from triton.testing import do_bench

    dev = "cuda"
    say(f"## the draft's attention: 9 q-heads / 3 KV heads, D=64, bf16, each row's length on the device, "
        f"RoPE and the cache write in the launch; whole cache vs window {window}")
    say("µs per call, median, a CUDA graph of 4 calls on 4 caches (the demo draft's 4 layers); queries: 1 (a "
        "draft step), 2 (a draft's first step); + row: also the last query's attention over every position")
    say("| B | queries | S | whole cache | window | whole + row | window + row |")
    say("|---|---|---|---|---|---|---|")
    layers, Hq, Hkv, D = DEMO_DRAFT.n_layers, DEMO_DRAFT.n_heads, DEMO_DRAFT.n_kv_heads, DEMO_DRAFT.head_dim
    for B, T, S in itertools.product((1, 8), (1, 2), (1024, 4096, 7900)):
        kc = [torch.randn(B, Hkv, S + 8, D, device=dev, dtype=torch.bfloat16) for _ in range(layers)]
        vc = [torch.randn_like(k) for k in kc]
        q = torch.randn(B, Hq, T, D, device=dev, dtype=torch.bfloat16)
        new_kv = tuple(torch.randn(2, B, Hkv, T, D, device=dev, dtype=torch.bfloat16))
        angles = torch.rand(B, T, D, device=dev) * 100
        block = dict(new_kv=new_kv, rope=(angles.cos(), angles.sin()))
        lengths = torch.full((B,), S, dtype=torch.int32, device=dev)
        variants = (dict(), dict(window=window), dict(return_last_row=True, last_row_mean=True),
                    dict(window=window, return_last_row=True, last_row_mean=True))
        for kw in variants:
            got = K.sparse_attention(q, kc[0], vc[0], lengths, **block, **kw)
            ref = K.sparse_attention_reference(q.float(), kc[0].float(), vc[0].float(), lengths,
                                               **{**block, "new_kv": tuple(x.float() for x in new_kv)}, **kw)
            got, ref = (got, ref) if isinstance(got, tuple) else ((got,), (ref,))
            for g, r in zip(got, ref):
                err = ((g.float() - r).norm() / r.norm()).item()
                assert err < 1e-2, f"draft attention {kw}, B={B} T={T} S={S}: rel err {err:.2e}"

        def calls(kw):
            return lambda: [K.sparse_attention(q, kc[i], vc[i], lengths, **block, **kw) for i in range(layers)]
        cells = [1e3 * do_bench(graphed(calls(kw)), return_mode="median") / layers for kw in variants]
        say(f"| {B} | {T} | {S} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    bench_prefill(say, window)


@torch.no_grad()
def bench_prefill(say, window: int = 512, reps: int = 5) -> None:
    """A prompt's prefill, as SpecEngine runs it, at the demo pair's shapes (random bf16
    weights): the target's and the draft's (one forward through cache_attention), and the
    draft's through its window (specattn.window_prefill: one forward, the attention in chunks
    of PREFILL_BLOCK queries, every chunk at once). Checked first: the windowed prefill's cache
    equals forwards of PREFILL_BLOCK tokens each (their definition)."""
    target = random_model(DEMO_TARGET, seed=0)
    draft = random_model(replace(DEMO_DRAFT, sink_distance=window), seed=1)
    tokens = torch.randint(0, DEMO_TARGET.vocab_size, (8, 7900), device="cuda")
    one, blocks = draft.new_cache(batch_size=1, max_len=2048), draft.new_cache(batch_size=1, max_len=2048)
    SA.window_prefill(draft, tokens[:1, :2000], one, window)
    for t0 in range(0, 2000, SA.PREFILL_BLOCK):
        draft(tokens[:1, t0:t0 + SA.PREFILL_BLOCK], cache=blocks, attend=SA.window_attention(window, draft))
    err = (one.k[:, :, :, 1:2000].float() - blocks.k[:, :, :, 1:2000].float()).abs().max().item()
    assert err < 0.1, f"window_prefill vs forwards of {SA.PREFILL_BLOCK} tokens: max |Δk| {err:.3g}"
    say(f"## a prompt's prefill at the demo pair's shapes (random bf16 weights): ms, median of {reps}; "
        f"the draft's window {window} (check: cache equal to forwards of {SA.PREFILL_BLOCK} tokens, "
        f"max |Δk| {err:.2g})")
    say("| B | prompt | target | draft, whole cache | draft, window |")
    say("|---|---|---|---|---|")
    first = torch.zeros(8, dtype=torch.long, device="cuda")
    for B, T in itertools.product((1, 8), (1024, 4096, 7900)):
        runs = {"target": lambda c: target(tokens[:B, :T], cache=c, logits_at=first[:B], attend=cache_attention),
                "draft": lambda c: draft(tokens[:B, :T], cache=c, logits_at=first[:B], attend=cache_attention),
                "window": lambda c: SA.window_prefill(draft, tokens[:B, :T], c, window)}
        cells = []
        for name, run in runs.items():
            cache = (target if name == "target" else draft).new_cache(batch_size=B, max_len=T)
            times = []
            for _ in range(reps + 1):  # the first run compiles and allocates: not counted
                cache.reset()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                run(cache)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            cells.append(1e3 * statistics.median(times[1:]))
        say(f"| {B} | {T} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")


@torch.no_grad()
def bench_cpu(say, context: int, max_new_tokens: int, reps: int = 15) -> None:
    """(g): the demo pair on this machine's CPU (fp32), its matmuls written both ways:
    model.Linear's few-row form (W · xᵀ)ᵀ (model.FEW_ROWS rows at most) and F.linear
    throughout (model.CPU_FEW_ROWS_FORM set to each in turn, then back to Linear's own
    choice). First each model's forward of 1-5 tokens through a cache of `context` positions
    (median of `reps`, the variants interleaved), then generation through the engine
    (specattn.run_modes: plain, dense speculation, SpecAttn) on one prompt of `context`
    tokens cut from the demo books, with each form."""
    import model as M
    from kernels import attention_slot

    target, draft, tokenizer = load_pair(device="cpu")
    prompt = SA.book_prompts(tokenizer, 1, context)
    chosen = M.cpu_few_rows_form()  # what Linear uses on this machine (measured once, remembered)
    forms = {f"(W·xᵀ)ᵀ up to {M.FEW_ROWS} rows": True, "F.linear": False}
    say(f"## (g) the demo pair on the CPU: {torch.get_num_threads()} threads, fp32, torch {torch.__version__}")
    say(f"ms per forward of T tokens after {context} cached positions, median of {reps}; the forms interleaved; "
        f"model.Linear's own choice on this machine: {'(W·xᵀ)ᵀ' if chosen else 'F.linear'}")
    say("| model | T | " + " | ".join(forms) + " | ratio |")
    say("|---|---|" + "---|" * (len(forms) + 1))
    for name, model in (("target", target), ("draft", draft)):
        cache = model.new_cache(batch_size=1, max_len=context + 8)
        model(torch.tensor(prompt), cache=cache)
        for T in range(1, 6):
            block = torch.tensor([prompt[0][:T]])
            times = {form: [] for form in forms}
            for _ in range(reps):
                for form, few in forms.items():
                    M.CPU_FEW_ROWS_FORM = few
                    t0 = time.perf_counter()
                    model(block, cache=cache, attend=attention_slot)
                    times[form].append(time.perf_counter() - t0)
                    cache.rewind(T)  # the next forward writes the same positions
            ms = [1e3 * statistics.median(v) for v in times.values()]
            say(f"| {name} | {T} | " + " | ".join(f"{m:.1f}" for m in ms) + f" | {ms[1] / ms[0]:.2f}x |")
    selection = SA.SelectionConfig(topp=0.9, sparse_from=SA.SPARSE_FROM)
    layer_map = layer_map_for(target, draft, tokenizer, None)
    for form, few in forms.items():
        M.CPU_FEW_ROWS_FORM = few
        say(f"generation, matmuls {form}: {max_new_tokens} new tokens, γ chosen per step up to 4")
        results = SA.run_modes(target, draft, prompt, max_new_tokens, 4, 0.0, layer_map, selection,
                               adaptive_gamma=True)
        for line in SA.results_table(results, 1, context, 1, SA.SPARSE_FROM)[:-1]:
            say(line)
    M.CPU_FEW_ROWS_FORM = chosen


def int_list(text: str, name: str) -> list[int]:
    """"1,8,32" -> [1, 8, 32], or a one-line error naming the option."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise SystemExit(f"error: --{name} takes comma-separated whole numbers >= 1, got {text!r}")
    return values


def main(argv=None):
    parser = argparse.ArgumentParser(description="Time the generation engine (specattn.SpecEngine) on a GPU.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--parts", default="demo,hf,8b", help="which parts to run, comma-separated: demo "
                        "(a), 8b (b), hf (c), kernels (d: the kernels alone, written to kernels_bench.md), "
                        "merge (e: the attention's merge at the demo's decode shapes, also in d), window (f: the "
                        "draft's attention, whole cache vs its window, also in d), cpu (g: the demo pair on the "
                        "CPU, the matmul forms of model.Linear; needs no GPU, runs alone), profile (h: where a "
                        "plain, a dense speculative and a SpecAttn step's GPU time goes, kernel by kernel, at each "
                        "--batches x --contexts), linear (i: a decode step's matmuls, kernels.decode_linear "
                        "against the separate kernels, also in d), launch (j: the attention's launch choices, "
                        "splits per KV head and keys per block, also in d)")
    parser.add_argument("--batches", default="1,8,32,64", help="demo (and profile) batch sizes")
    parser.add_argument("--contexts", default="1024,4096,7900", help="demo prompt lengths (tokens; profile: cached "
                        "positions); the demo model has 8192 positions, which also hold the new tokens")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per prompt")
    parser.add_argument("--prompts-per-row", type=int, default=1, help="demo: prompts each batch row serves "
                        "in turn (continuous batching: a finished row takes the next waiting prompt)")
    parser.add_argument("--fixed-batches", action="store_true", help="demo: serve the --prompts-per-row "
                        "prompts of each row in fixed batches instead, one after another, each running until "
                        "its last row is done")
    parser.add_argument("--rounds", type=int, default=1, help="demo: serve each row's --prompts-per-row "
                        "prompts in this many parts, plain, dense and SpecAttn taking turns on each part (their "
                        "order rotating), so that the GPU's drift over the run falls on each mode alike; the "
                        "ratios paired by part follow each table. Keeps the three engines in memory at once")
    parser.add_argument("--gamma", default="4", help="demo: the most draft tokens a step proposes; the "
                        "speculative modes choose each step's γ up to the largest value, as specattn.py does "
                        "(rows 'dense', 'specattn')")
    parser.add_argument("--fixed-gamma", action="store_true", help="demo: the speculative modes also run once "
                        "per --gamma value with every step proposing it (rows 'dense γ=4' and so on)")
    parser.add_argument("--also-always-sparse", action="store_true", help="demo: SpecAttn also runs once "
                        "verifying sparsely every step past --sparse-from (row 'specattn always sparse'); the "
                        "row 'specattn' chooses sparse or dense verification per step, as specattn.py does")
    parser.add_argument("--topp", type=float, default=0.9, help="SpecAttn top-p for the demo rows")
    parser.add_argument("--also-topp", default="", metavar="P,...",
                        help="demo: SpecAttn also runs once per top-p here (comma-separated, each in (0, 1]; rows "
                             "'specattn p=P', paired against dense speculation with --rounds)")
    parser.add_argument("--sparse-margin", type=float, default=SA.SPARSE_MARGIN, metavar="M",
                        help="demo: SpecAttn verifies a step sparsely only where that promises more than 1 + M "
                             "times dense verification's tokens per second (specattn.py --sparse-margin)")
    parser.add_argument("--also-sparse-margin", default="", metavar="M,...",
                        help="demo: SpecAttn also runs once per margin here (comma-separated, each >= 0; rows "
                             "'specattn margin M', paired against dense speculation with --rounds)")
    parser.add_argument("--combine", choices=SA.COMBINE, help="demo: how SpecAttn makes the draft's attention "
                        "rows one selection, as specattn.py --combine (default: first with --prompts-per-row > 1 "
                        "and continuous batching, union otherwise)")
    parser.add_argument("--also-combine", default="", help="demo: SpecAttn also runs once per value here "
                        "(comma-separated, from --combine's choices) selecting that way (rows 'specattn "
                        "first' and so on, paired against dense speculation with --rounds)")
    parser.add_argument("--also-draft-vocab", type=int, default=0, metavar="N",
                        help="demo: dense speculation and SpecAttn also run once with the draft proposing from "
                             "the N tokens most frequent in the calibration book (rows 'dense vocab N', "
                             "'specattn vocab N'; specattn.py --draft-vocab; 49152, the whole vocabulary: every "
                             "token). 0: not")
    parser.add_argument("--lookup", type=int, default=SA.LOOKUP, metavar="N",
                        help="demo: the speculative modes propose from a row's own context where its newest N "
                             "tokens occurred before (specattn.py --lookup); 0: the draft alone")
    parser.add_argument("--also-lookup", type=int, metavar="N",
                        help="demo: dense speculation and SpecAttn also run once with --lookup N (rows 'dense "
                             "lookup N', 'specattn lookup N'; 0: the draft alone), paired with the rows above")
    parser.add_argument("--sparse-from", type=int, default=SA.SPARSE_FROM, help="demo: SpecAttn verifies a "
                        "row densely until it holds this many positions (0: sparse from the first step)")
    parser.add_argument("--sink-distance", type=int, metavar="N", help="demo: the draft reads its attention "
                        "sink as if N positions back (default: the draft's config, 512; 0: true positions)")
    parser.add_argument("--draft-window", type=int, metavar="N", help="demo: the draft reads position 0 and "
                        "its newest N - 1 positions (default: its training window, 512; 0: its whole cache)")
    parser.add_argument("--peer-runs", type=int, default=3, help="hf: timed runs of the peer per context "
                        "(the table gives their median and range; the ratios use the median)")
    parser.add_argument("--layer-map",
                        help="the demo pair's layer map JSON (default: calibrated once, cached)")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="directory for the report: bench.md "
                        "(bench_cpu.md with --parts cpu), rewritten as each line prints, so a run cut short "
                        "keeps its tables; bench.json (tokens/s per row) when the run ends; kernels_bench.md "
                        "with --parts kernels")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    if args.rounds < 1 or args.prompts_per_row % args.rounds:
        raise SystemExit(f"error: --rounds must divide --prompts-per-row ({args.prompts_per_row}), "
                         f"got {args.rounds}")
    if args.peer_runs < 1:
        raise SystemExit(f"error: --peer-runs must be >= 1, got {args.peer_runs}")
    if args.sparse_from < 0:
        raise SystemExit(f"error: --sparse-from must be >= 0, got {args.sparse_from}")
    if args.draft_window is not None and args.draft_window < 0:
        raise SystemExit(f"error: --draft-window must be >= 0 (0: the draft reads its whole cache), "
                         f"got {args.draft_window}")
    if args.lookup < 0 or (args.also_lookup is not None and args.also_lookup < 0):
        raise SystemExit(f"error: --lookup and --also-lookup must be >= 0 (0: the draft alone), got "
                         f"{args.lookup} and {args.also_lookup}")
    if not 0 <= args.also_draft_vocab <= DEMO_TARGET.vocab_size:
        raise SystemExit(f"error: --also-draft-vocab must be in 0..{DEMO_TARGET.vocab_size} (the demo "
                         f"vocabulary), got {args.also_draft_vocab}")
    try:
        check_sink_distance(args.sink_distance)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if not parts or parts - {"demo", "8b", "hf", "kernels", "merge", "window", "cpu", "profile", "linear", "launch"}:
        raise SystemExit("error: --parts takes a comma-separated subset of "
                         f"demo,8b,hf,kernels,merge,window,cpu,profile,linear,launch, got {args.parts!r}")
    batches, contexts, gammas = (int_list(getattr(args, name), name) for name in ("batches", "contexts", "gamma"))
    also_combine = [c for c in args.also_combine.split(",") if c]
    try:
        K.check_topp(args.topp, "--topp")
        also_topp = [K.check_topp(float(p), "each --also-topp value") for p in args.also_topp.split(",") if p]
    except ValueError as e:
        raise SystemExit(f"error: {e} (--also-topp takes comma-separated numbers)") from None
    try:
        also_sparse_margin = [float(m) for m in args.also_sparse_margin.split(",") if m]
    except ValueError:
        raise SystemExit(f"error: --also-sparse-margin takes comma-separated numbers, "
                         f"got {args.also_sparse_margin!r}") from None
    if not all(m >= 0 for m in [args.sparse_margin, *also_sparse_margin]):
        raise SystemExit(f"error: --sparse-margin and each --also-sparse-margin value must be >= 0, "
                         f"got {args.sparse_margin} and {args.also_sparse_margin!r}")
    if any(c not in SA.COMBINE for c in also_combine):
        raise SystemExit(f"error: --also-combine takes values from {','.join(SA.COMBINE)}, got {args.also_combine!r}")
    room = profile_room(PROFILE_STEPS, max(gammas))
    if "profile" in parts and max(contexts) + room > DEMO_TARGET.max_seq_len:
        raise SystemExit(f"error: --parts profile takes --contexts up to {DEMO_TARGET.max_seq_len - room} (the demo "
                         f"model's {DEMO_TARGET.max_seq_len} positions less the {room} its steps may add), "
                         f"got {max(contexts)}")
    if "cpu" in parts and len(parts) > 1:
        raise SystemExit("error: --parts cpu runs alone (the other parts need a GPU)")
    if parts != {"cpu"} and not torch.cuda.is_available():
        raise SystemExit("error: bench.py times the engine on a CUDA GPU; none is visible here")
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    report = out / ("bench_cpu.md" if parts == {"cpu"} else "bench.md") if out else None
    lines = []

    def say(s=""):
        print(s, flush=True)
        lines.append(s)
        if report:  # rewritten after every line: a run cut short (a time limit, ^C) keeps what it printed
            write_atomic(report, "\n".join(lines) + "\n")

    if parts == {"cpu"}:
        say(f"# CPU, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
        bench_cpu(say, contexts[0], args.max_new_tokens)
        return
    SA.use_gpu_kernels(True)
    say(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    demo, hf = {}, {}
    if "demo" in parts:
        demo = bench_demo(say, batches, contexts, args.max_new_tokens, gammas, args.topp, args.layer_map,
                          args.prompts_per_row, args.sparse_from, args.fixed_gamma, args.sink_distance,
                          args.draft_window, args.also_always_sparse,
                          args.combine or SA.default_combine(args.prompts_per_row > 1 and not args.fixed_batches),
                          also_combine,
                          refill=not args.fixed_batches, rounds=args.rounds,
                          also_draft_vocab=args.also_draft_vocab, lookup=args.lookup, also_lookup=args.also_lookup,
                          also_topp=also_topp, sparse_margin=args.sparse_margin,
                          also_sparse_margin=also_sparse_margin)
    if "hf" in parts:
        hf = bench_hf(say, contexts, args.max_new_tokens, runs=args.peer_runs)
    if demo and hf:
        say("## ratios at batch 1: engine plain decoding vs transformers (static cache)")
        tag = [""] + [f" γ={g}" for g in gammas] * args.fixed_gamma
        say("| context | plain / transformers | " + " | ".join(f"dense spec{t} / plain | SpecAttn{t} / dense spec{t}"
                                                           for t in tag) + " |")
        say("|---|---|" + "---|---|" * len(tag))
        for c in contexts:
            if (1, c) in demo and c in hf:
                r = demo[(1, c)]
                say(f"| {c} | {r['plain'] / hf[c][0]:.2f}x | " + " | ".join(
                    f"{r['dense' + t] / r['plain']:.2f}x | {r['specattn' + t] / r['dense' + t]:.2f}x" for t in tag)
                    + " |")
    if "8b" in parts:
        bench_8b(say)
    if "profile" in parts:
        bench_profile(say, batches, contexts, max(gammas))
    if "kernels" in parts:
        bench_kernels(out_dir=args.out)
    else:
        if "launch" in parts:
            bench_launch(say)
        if "merge" in parts:
            bench_merge(say)
        if "window" in parts:
            bench_draft_window(say)
        if "linear" in parts:
            bench_decode_linear(say)
    if out:
        write_atomic(out / "bench.json", json.dumps({"demo": {f"{b}x{c}": r for (b, c), r in demo.items()},
                                                        "hf": {c: {"median": m, "runs": each}
                                                               for c, (m, each) in hf.items()}}, indent=1))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted: the tables printed so far are all there is (also in --out's bench.md)")
