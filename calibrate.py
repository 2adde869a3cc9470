"""Layer alignment: which draft layer's attention best predicts each target layer's.

Both models read the same calibration text. For every layer we take each query
position's attention distribution over its keys, averaged over heads, and score each
(target layer j, draft layer i) by the mean over query positions of KL(target_j || draft_i).
`align_layers` then picks, by dynamic programming, the monotone non-decreasing
(many-to-one) map j -> i of least total KL: deeper target layers look to deeper draft
layers, as the paper assumes. The map is saved as JSON and read by specattn.py and
eval_pg19.py.

    python calibrate.py --out layer_map.json            # the offline demo
    python calibrate.py --target T --draft D --text book.txt --out map.json --plot kl.png
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

from model import Tokenizer, Transformer, write_atomic


def align_layers(cost) -> list[int]:
    """Monotone non-decreasing map m (target layer j -> draft layer m[j]) minimising
    sum_j cost[j][m[j]]. cost: [n_target, n_draft].

    best[j][i] = least cost of mapping target layers 0..j with m[j] = i
               = cost[j][i] + min over i' <= i of best[j-1][i']
    The running minimum over i' makes the whole table O(n_target * n_draft).
    """
    cost = torch.as_tensor(cost, dtype=torch.float64)
    n_t, n_d = cost.shape
    best = cost[0].clone()
    choice = torch.zeros(n_t, n_d, dtype=torch.long)  # choice[j][i]: the i' that best[j][i] extends
    for j in range(1, n_t):
        running_min, arg = best.clone(), torch.arange(n_d)
        for i in range(1, n_d):  # prefix minimum of best[j-1] and where it is attained
            if running_min[i - 1] <= running_min[i]:
                running_min[i], arg[i] = running_min[i - 1], arg[i - 1]
        choice[j] = arg
        best = cost[j] + running_min
    mapping = [int(best.argmin())]
    for j in range(n_t - 1, 0, -1):
        mapping.append(int(choice[j][mapping[-1]]))
    return mapping[::-1]


@torch.no_grad()
def head_averaged_rows(model: Transformer, tokens: torch.Tensor, start: int, end: int, cache) -> list[torch.Tensor]:
    """Feed tokens[start:end] on top of `cache`; per layer the head-averaged attention rows
    [end - start, end] (fp32)."""
    _, probs = model(tokens[None, start:end], cache=cache, return_attn=True)
    return [p[0].mean(0) for p in probs]


@torch.no_grad()
def kl_matrix(target: Transformer, draft: Transformer, tokens: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """[n_target_layers, n_draft_layers]: mean over query positions of KL(target_j || draft_i)."""
    n = tokens.shape[0]
    t_cache, d_cache = target.new_cache(max_len=n), draft.new_cache(max_len=n)
    cross = torch.zeros(target.args.n_layers, draft.args.n_layers, dtype=torch.float64)
    neg_entropy = torch.zeros(target.args.n_layers, dtype=torch.float64)
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        t_rows = torch.stack(head_averaged_rows(target, tokens, start, end, t_cache))  # [Lt, q, end]
        d_rows = torch.stack(head_averaged_rows(draft, tokens, start, end, d_cache))  # [Ld, q, end]
        # KL(t || d) = sum t log t - sum t log d; zero-probability keys (the future) add 0.
        log_d = d_rows.clamp(min=1e-12).log()
        neg_entropy += (t_rows * t_rows.clamp(min=1e-12).log()).sum((1, 2)).double().cpu()
        cross += (t_rows.flatten(1) @ log_d.flatten(1).T).double().cpu()
    return (neg_entropy[:, None] - cross) / n


def calibration_tokens(tokenizer: Tokenizer, text_path, n_tokens: int, skip_tokens: int) -> torch.Tensor:
    """n_tokens of the text from skip_tokens on; BOS first where the tokenizer adds one, so the
    window starts the way every evaluated book and prompt does."""
    text = Path(text_path).read_text(encoding="utf-8", errors="replace")
    ids = tokenizer.encode(text, bos=False)
    head = [tokenizer.bos_id] if tokenizer.add_bos else []
    n = n_tokens - len(head)
    if len(ids) < skip_tokens + n:
        if len(ids) < n:
            raise ValueError(f"{text_path} has {len(ids)} tokens; calibration needs {n_tokens} (--tokens)")
        skip_tokens = len(ids) - n
    return torch.tensor(head + ids[skip_tokens:skip_tokens + n])


def calibrate(target, draft, tokens: torch.Tensor, chunk: int = 256) -> dict:
    device = target.output.weight.device
    kl = kl_matrix(target, draft, tokens.to(device), chunk=chunk)
    return {"map": align_layers(kl), "kl": [[round(v, 5) for v in row] for row in kl.tolist()],
            "tokens": int(tokens.shape[0]), "draft_layer_ids": draft.args.layer_ids}


def layer_map_for(target, draft, tokenizer, path=None, text=None, n_tokens: int = 2048, skip_tokens: int = 16384,
                  cache_dir=None) -> list[int]:
    """The layer map: read from `path`, or calibrated once on the demo text and cached."""
    from specattn import load_layer_map

    if path is not None:
        return load_layer_map(path, target.args.n_layers, draft.args.n_layers)
    if text is None:
        from demo import demo_books

        text = demo_books() / "test" / "11.txt"
    from demo import CACHE

    shapes = [tuple(p.shape) for p in draft.parameters()] + [tuple(p.shape) for p in target.parameters()]
    fingerprint = json.dumps([str(shapes), float(target.norm.weight.detach().float().sum()),
                              float(draft.norm.weight.detach().float().sum()),
                              draft.args.layer_ids, str(text), n_tokens, skip_tokens]
                             + (["bos"] if tokenizer.add_bos else []))  # BOS shifts the calibration window
    cache_file = Path(cache_dir or CACHE) / f"layer_map_{hashlib.sha1(fingerprint.encode()).hexdigest()[:12]}.json"
    if cache_file.exists():
        try:
            return load_layer_map(cache_file, target.args.n_layers, draft.args.n_layers)
        except ValueError as e:  # a broken cache is rebuilt, not reported
            print(f"[specattn] {e}: calibrating again", file=sys.stderr)
    print(f"[specattn] calibrating the layer map on {n_tokens} tokens of {text} (once; cached in {cache_file})",
          file=sys.stderr)
    result = calibrate(target, draft, calibration_tokens(tokenizer, text, n_tokens, skip_tokens))
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(cache_file, json.dumps(result))
    return result["map"]


def pyplot():
    """matplotlib.pyplot on a headless backend, or None (with a message) when not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib (pip install matplotlib); no plot written", file=sys.stderr)
        return None
    return plt


def plot_kl(kl, mapping, path):
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 7))
    im = ax.imshow(kl, aspect="auto", cmap="viridis")
    ax.plot(mapping, range(len(mapping)), "r.-", label="chosen map")
    ax.set_xlabel("draft layer")
    ax.set_ylabel("target layer")
    ax.set_title("mean KL(target || draft) of head-averaged attention")
    fig.colorbar(im)
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"saved {path}")


def main(argv=None):
    from specattn import add_pair_arguments, load_pair, parse_layers

    parser = argparse.ArgumentParser(description="Map each target layer to the draft layer whose attention best "
                                     "predicts it (least KL, monotone). Defaults: the offline demo.")
    add_pair_arguments(parser)
    parser.add_argument("--text", help="calibration text file (default: demo book 11, past the evaluated part)")
    parser.add_argument("--tokens", type=int, default=2048, help="calibration tokens")
    parser.add_argument("--skip-tokens", type=int, default=16384,
                        help="start this far into the text (keeps calibration off the evaluated tokens)")
    parser.add_argument("--chunk", type=int, default=256, help="query positions processed per forward")
    parser.add_argument("--out", default="layer_map.json", help="where to write the map and KL matrix (JSON)")
    parser.add_argument("--plot", help="also save a KL heat-map PNG here (needs matplotlib)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    args = parser.parse_args(argv)
    try:
        target, draft, tokenizer = load_pair(args.target, args.draft, parse_layers(args.draft_layers),
                                             device=args.device, bos=args.bos)
        if args.text is None:
            from demo import demo_books

            args.text = demo_books() / "test" / "11.txt"
        if args.tokens > target.args.max_seq_len:
            raise ValueError(f"--tokens {args.tokens} exceeds the model's {target.args.max_positions_text()}")
        tokens = calibration_tokens(tokenizer, args.text, args.tokens, args.skip_tokens)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    result = calibrate(target, draft, tokens, chunk=args.chunk)
    result.update(target=str(args.target or "demo"), draft=str(args.draft or args.target or "demo"),
                  text=str(args.text))
    write_atomic(args.out, json.dumps(result, indent=1))
    print("target layer -> draft layer:", " ".join(f"{j}:{i}" for j, i in enumerate(result["map"])))
    print(f"wrote {args.out}")
    if args.plot:
        plot_kl(result["kl"], result["map"], args.plot)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted: calibration writes the map at the end, so nothing was saved")
