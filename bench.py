"""GPU benchmark: is SpecAttn verification faster than dense, end to end? (H200, random weights)

Times one target verification step (γ+1 tokens) of a Llama-3-8B-shaped target with the
draft attention of a Llama-3.2-1B-shaped draft, and a whole speculative step (γ draft
steps + verification). Timing needs no trained weights: shapes and bytes decide it.

Variants of the verification step, each captured once as a CUDA graph and replayed
(no Python in the timed region, no host sync anywhere in the step):
  sdpa          dense, PyTorch SDPA (model.subset_attention)
  kd plain      dense, kernels.sparse_attention with every position, on the model as
                loaded (eager pointwise ops, separate wq/wk/wv and w1/w3 matmuls)
  kd            the same on the decode-ready model, as every other column: pointwise ops
                compiled (model.compile_pointwise) and projections stacked
                (model.fuse_projections)
  specattn X%   top-p selection on the draft rows (kernels.topp_select, all sparse layers
                in one batched call) + kernels.sparse_attention on what it keeps; the
                selection is inside the timed region

Next to every time: its bytes floor = (target weights + KV entries actually read) /
measured HBM bandwidth. At batch 1 the 15 GB of weights bound what sparsity can save.

    python bench.py               # all configurations, about 2 minutes on one H200
    python bench.py --quick       # batch 1 at 8k only
    python bench.py --profile     # where one verification step's GPU time goes
"""

from __future__ import annotations

import argparse
import os
from typing import Optional

import torch
from triton.testing import do_bench

import kernels
from kernels import sparse_attention, topp_mask_reference, topp_select
from model import ModelArgs, Transformer, compile_pointwise, fuse_projections, subset_attention

MAX_LEN = 131072 + 64
TARGET_8B = ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=14336,
                      vocab_size=128256, rope_theta=500000.0, max_seq_len=MAX_LEN)
DRAFT_1B = ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, hidden_dim=8192,
                     vocab_size=128256, rope_theta=500000.0, max_seq_len=MAX_LEN, tie_word_embeddings=True)
DENSE_LAYERS = 2
LAYER_MAP = [j // 2 for j in range(32)]  # a monotone 32 -> 16 map, as calibrate.py would give
# The draft layers the sparse target layers read: a contiguous range, since the map is monotone.
USED_DRAFT = slice(LAYER_MAP[DENSE_LAYERS], LAYER_MAP[-1] + 1)


def kernel_attention(q, k, v, past_len, keep=None, return_probs=False, new_kv=None):
    """model.py's attention slot, served by the Triton kernel; `keep` is (idx, count) or None;
    new_kv, the block's keys and values, are written to the cache by the same launch.
    With return_probs (the draft side) it returns only what SpecAttn needs, the last query's
    head-averaged attention on the cached positions, as [B, 1, 1, past_len]."""
    if return_probs:  # the kernel averages over the heads itself: no small ops per layer on the row
        out, row = sparse_attention(q, k, v, past_len, return_last_row=True, new_kv=new_kv, last_row_mean=True)
        return out, row[:, None, None, :]  # [B, past] -> [B, 1, 1, past] (a view)
    idx, count = keep if keep is not None else (None, None)
    return sparse_attention(q, k, v, past_len, idx, count, new_kv=new_kv), None


def batched_selection(draft_rows: torch.Tensor, topp: float) -> dict:
    """draft_rows [n_draft_layers, B, S] (head-averaged) -> {target layer: (idx, count)}.

    One topp_select call for the draft layers the map uses (USED_DRAFT: a view, no copy);
    each target layer then reads its draft layer's selection for all of its KV heads (a
    stride-0 head dimension)."""
    idx, count = topp_select(draft_rows[USED_DRAFT], topp)  # [used, B, S], [used, B]
    first = USED_DRAFT.start
    return {j: (idx[i - first][:, None, :], count[i - first][:, None])
            for j, i in enumerate(LAYER_MAP) if j >= DENSE_LAYERS}


def weight_bytes_read(model: Transformer) -> int:
    """Bytes of weights one forward step reads: every parameter once, except an untied
    embedding table, of which a step reads only its tokens' rows (counted as nothing here;
    with 8 x 9 tokens that is 0.6 MB of Llama-3's 1.05 GB table). A tied table is the
    output head too, so it is read whole."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if not model.args.tie_word_embeddings:
        total -= model.tok_embeddings.weight.numel() * model.tok_embeddings.weight.element_size()
    return total


def verify_step(model: Transformer, cache, block: torch.Tensor, past_len: int, variant: str,
                draft_rows: Optional[torch.Tensor] = None, topp: Optional[float] = None):
    """One verification forward of `block` [B, γ+1] after `past_len` cached positions.
    variant: "sdpa" (dense, PyTorch SDPA), "kernel" (dense, kernels.sparse_attention) or
    "specattn" (top-p on draft_rows at topp, then the kernel on what it keeps)."""
    cache.length = past_len  # every replay verifies the same block at the same place
    select = None
    if variant == "sdpa":
        model.subset_attention = subset_attention
    else:
        model.subset_attention = kernel_attention
        if variant == "specattn":
            chosen = batched_selection(draft_rows, topp)
            select = lambda layer, q, k: chosen.get(layer)  # noqa: E731
    return model(block, cache=cache, select=select)


def random_model(args: ModelArgs) -> Transformer:
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = Transformer(args)
    torch.set_default_dtype(default)
    model.init_rope("cuda")
    return model.eval()


def random_cache(model: Transformer, B: int, S: int):
    """A KV cache with room for S cached positions and a block, filled with random keys and
    values (timing reads them; their values do not matter)."""
    cache = model.new_cache(batch_size=B, max_len=S + 16)
    cache.k.normal_()
    cache.v.normal_()
    return cache


def graphed_ms(fn) -> float:
    return do_bench(kernels._graphed(fn), return_mode="median")


def topp_for_fraction(rows: torch.Tensor, fraction: float) -> float:
    """The p at which top-p keeps about `fraction` of the positions of these rows."""
    lo, hi = 1e-4, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        kept = topp_mask_reference(rows, mid).float().mean().item()
        lo, hi = (mid, hi) if kept < fraction else (lo, mid)
    return (lo + hi) / 2


@torch.no_grad()
def profile_verify(target: Transformer, B: int, S: int, gamma: int, topp_fraction: float = 0.25, top: int = 12):
    """Print where one verification step's GPU time goes (kernels grouped by name), dense
    kernel and SpecAttn at `topp_fraction` kept, pointwise ops compiled."""
    cache = random_cache(target, B, S)
    rows = torch.softmax(3 * torch.randn(DRAFT_1B.n_layers, B, S, device="cuda"), -1)
    p = topp_for_fraction(rows[:2], topp_fraction)
    block = torch.randint(0, TARGET_8B.vocab_size, (B, gamma + 1), device="cuda")
    compile_pointwise(True)
    fuse_projections(target)
    for name, variant in (("kernel dense", "kernel"), (f"specattn {topp_fraction:.0%}", "specattn")):
        def step():
            return verify_step(target, cache, block, S, variant, rows, p)
        print_profile(f"{name}, B={B}, S={S}, γ={gamma}", step, top)


@torch.no_grad()
def profile_draft_step(draft: Transformer, B: int, S: int, top: int = 12):
    """Print where one draft step's GPU time goes (one token, the dense kernel), without and
    with the attention row SpecAttn asks of it."""
    cache = random_cache(draft, B, S)
    tok = torch.randint(0, DRAFT_1B.vocab_size, (B, 1), device="cuda")
    draft.subset_attention = kernel_attention
    compile_pointwise(True)
    fuse_projections(draft)
    for name, rows in (("draft step", False), ("draft step with its attention row", True)):
        def step():
            cache.length = S
            return draft(tok, cache=cache, return_attn=rows)
        print_profile(f"{name}, B={B}, S={S}", step, top)


def print_profile(title: str, step, top: int):
    """Warm `step` up, print its CUDA kernel time by kernel over 5 eager steps, and the time
    of one step replayed as a CUDA graph."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):  # compile and warm up
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:  # eager launches; kernel times are the same
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(f"## {title}: CUDA kernel time by kernel, 5 steps; one step as a CUDA graph takes {graphed_ms(step):.3f} ms")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=top))


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description="Time SpecAttn verification against dense on a GPU.")
    parser.add_argument("--quick", action="store_true", help="batch 1 at 8k only")
    parser.add_argument("--accepted", type=float, default=3.0,
                        help="mean accepted draft tokens per step assumed for tokens/s")
    parser.add_argument("--no-compile", action="store_true", help="keep the pointwise ops eager in every column")
    parser.add_argument("--profile", action="store_true",
                        help="instead of the tables: where one verification step's time goes "
                             "(batch 1 at 8k and 128k, batch 8 at 32k), and one draft step's (batch 1, 8k)")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="directory for the markdown table")
    args = parser.parse_args()
    if args.profile:
        target = random_model(TARGET_8B)
        for B, S in ((1, 8192), (1, 131072), (8, 32768)):
            profile_verify(target, B=B, S=S, gamma=4)
        target = None
        profile_draft_step(random_model(DRAFT_1B), B=1, S=8192)
        return
    bw = kernels._hbm_bandwidth()
    # The plain model is kept for the `kd plain` column; every other column runs on fused ones.
    plain, target, draft = random_model(TARGET_8B), fuse_projections(random_model(TARGET_8B)), \
        fuse_projections(random_model(DRAFT_1B))
    weight_bytes, draft_bytes = weight_bytes_read(target), weight_bytes_read(draft)
    lines = []

    def say(s=""):
        print(s, flush=True)
        lines.append(s)

    say(f"# {torch.cuda.get_device_name()}; HBM {bw / 1e12:.2f} TB/s; weights read per step: target "
        f"{weight_bytes / 1e9:.2f} GB, draft {draft_bytes / 1e9:.2f} GB (bf16, random weights)")
    say("## one verification step (ms, CUDA graph); floor = (weights + KV read) / HBM; achieved = floor / time")
    say("kd = kernel dense. Every column but `kd plain`: pointwise ops compiled (model.compile_pointwise), "
        "projections stacked (model.fuse_projections)")
    say("| B | S | γ | sdpa | kd plain | kd | specattn 25% | specattn 10% | 25% vs sdpa | 25% vs kd "
        "| achieved/floor (kd, 25%, 10%) |")
    say("|---|---|---|---|---|---|---|---|---|---|---|")
    configs = [(1, 8192)] if args.quick else [(1, 8192), (1, 32768), (1, 65536), (1, 131072), (8, 8192), (8, 32768)]
    step_rows = []
    for B, S in configs:
        t_cache, d_cache = random_cache(target, B, S), random_cache(draft, B, S)
        # Heavy-tailed draft rows, and the p that keeps 25% / 10% of them.
        draft_rows = torch.softmax(3 * torch.randn(DRAFT_1B.n_layers, B, S, device="cuda"), -1)
        p25, p10 = topp_for_fraction(draft_rows[:2], 0.25), topp_for_fraction(draft_rows[:2], 0.10)
        kv_entry = TARGET_8B.head_dim * 2 * 2  # K and V rows, bf16
        for gamma in (4, 8):
            block = torch.randint(0, TARGET_8B.vocab_size, (B, gamma + 1), device="cuda")

            def verify(variant, topp=None, model=target):
                return verify_step(model, t_cache, block, S, variant, draft_rows, topp)

            compile_pointwise(False)
            t_plain = graphed_ms(lambda: verify("kernel", model=plain))
            compile_pointwise(not args.no_compile)
            times = [graphed_ms(lambda: verify("sdpa")), graphed_ms(lambda: verify("kernel"))]
            reads = [S * TARGET_8B.n_layers * TARGET_8B.n_kv_heads * B]
            for p in (p25, p10):
                times.append(graphed_ms(lambda: verify("specattn", p)))
                _, count = topp_select(draft_rows, p)
                sparse = sum(count[i].sum().item() for j, i in enumerate(LAYER_MAP) if j >= DENSE_LAYERS)
                reads.append((DENSE_LAYERS * S * B + sparse) * TARGET_8B.n_kv_heads)
            floors = [(weight_bytes + r * kv_entry) / bw * 1e3 for r in reads]
            ach = ", ".join(f"{f / t:.3f}" for f, t in zip(floors, times[1:]))
            say(f"| {B} | {S} | {gamma} | {times[0]:.3f} | {t_plain:.3f} | {times[1]:.3f} | {times[2]:.3f} | "
                f"{times[3]:.3f} | {times[0] / times[2]:.2f}x | {times[1] / times[2]:.2f}x | {ach} |")

        # A whole speculative step at γ=4: γ draft steps + verify, all on the kernel.
        gamma = 4
        first = torch.randint(0, TARGET_8B.vocab_size, (B, 1), device="cuda")

        def spec_step(mode: str, topp: float = 1.0, rows_out=None):
            # dense: plain speculative decoding. all: every draft step also returns its head-averaged
            # attention row (the kernel's fused last-row pass), and their mean is cut at top-p, as in
            # specattn.py. last: only the last draft step returns its row (timing only: the quality
            # of selecting from one row is not measured here).
            d_cache.length, t_cache.length = S, S
            draft.subset_attention = target.subset_attention = kernel_attention
            tok, proposals, rows = first, [first], []
            for step in range(gamma):
                if mode == "dense" or (mode == "last" and step < gamma - 1):
                    logits = draft(tok, cache=d_cache)
                else:
                    logits, probs = draft(tok, cache=d_cache, return_attn=True)
                    rows.append(torch.stack([p[:, 0, -1, :S] for p in probs]))  # [Ld, B, S]; one "head": the mean
                tok = logits[:, -1].argmax(-1, keepdim=True)
                proposals.append(tok)
            block = torch.cat(proposals, 1)
            if mode == "dense":
                return target(block, cache=t_cache)
            draft_rows = torch.stack(rows).mean(0)
            if rows_out is not None:
                rows_out.append(draft_rows)
            chosen = batched_selection(draft_rows, topp)
            return target(block, cache=t_cache, select=lambda layer, q, k: chosen.get(layer))

        # The random-weight draft's own rows are far flatter than the synthetic ones above, so
        # the p that keeps ~25% of positions is found on the rows this step really produces.
        p_step, kept = {}, {}
        for mode in ("all", "last"):
            got = []
            spec_step(mode, 1.0, got)
            p_step[mode] = topp_for_fraction(got[0][USED_DRAFT], 0.25)
            _, count = topp_select(got[0][USED_DRAFT], p_step[mode])
            kept[mode] = count.float().mean().item() / S
        t_dense = graphed_ms(lambda: spec_step("dense"))
        t_all = graphed_ms(lambda: spec_step("all", p_step["all"]))
        t_last = graphed_ms(lambda: spec_step("last", p_step["last"]))
        per_step = args.accepted + 1
        step_rows.append(f"| {B} | {S} | {t_dense:.3f} | {t_all:.3f} | {t_last:.3f} | "
                         f"{kept['all']:.0%} / {kept['last']:.0%} | "
                         f"{B * per_step / t_dense * 1e3:.0f} | {B * per_step / t_all * 1e3:.0f} | "
                         f"{B * per_step / t_last * 1e3:.0f} | {t_dense / t_all:.2f}x | {t_dense / t_last:.2f}x |")
        t_cache = d_cache = None  # free this configuration's caches before the next one
        torch.cuda.empty_cache()
    say()
    say(f"## whole speculative step, γ=4 (ms, CUDA graph, decode-ready models); tokens/s at {args.accepted:g} "
        f"accepted draft tokens per step. SpecAttn selects at the p keeping ~25% of these draft rows' positions "
        f"(kept: the fraction actually kept), from the rows of all γ draft steps or (timing only) of the last one")
    say("| B | S | dense spec step | SpecAttn (all rows) | SpecAttn (last row) | kept (all / last) | dense tok/s "
        "| SpecAttn tok/s (all) | SpecAttn tok/s (last) | speed-up (all) | speed-up (last) |")
    say("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in step_rows:
        say(row)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_verify.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
