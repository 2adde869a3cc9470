"""Layer alignment: which draft layer's attention best predicts each target layer's.

Both models read the same calibration text. For every layer we take each query
position's attention distribution over its keys, averaged over heads, and score each
(target layer j, draft layer i) by the mean over query positions of KL(target_j || draft_i).
`align_layers` then picks, by dynamic programming, the monotone non-decreasing
(many-to-one) map j -> i of least total KL: deeper target layers look to deeper draft
layers, as the paper assumes. The map is saved as JSON and read by specattn.py and
eval_pg19.py.

This file is also the home of a pair and its map: `load_pair` loads a target and a draft
that share a tokenizer (`add_pair_arguments` is its command-line face), `load_layer_map`
reads a map, `layer_map_for` reads one or calibrates it once (cached); `load_draft` reads
the drafts train_draft.py saves (their own layers; the target's embedding borrowed). It
imports only model.py and demo.py; specattn.py, eval_pg19.py and train_draft.py build on it.

    python calibrate.py --out layer_map.json            # the offline demo
    python calibrate.py --target T --draft D --text book.txt --out map.json --plot kl.png
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Optional

import torch

from demo import CACHE, demo_books, demo_target
from model import Tokenizer, Transformer, load_model, write_atomic


# ----------------------------------------------------------------------------------------
# A target/draft pair and its layer map


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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help unless it has no default (None, or "": an
    empty comma-separated list) or its help already says what the default is (so no
    "(default: None)" after "default: the demo target")."""

    def _get_help_string(self, action):
        if action.default in (None, "") or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_pair_arguments(parser: argparse.ArgumentParser) -> None:
    """--target, --draft, --draft-layers: the command-line face of load_pair (here and in eval_pg19.py)."""
    parser.add_argument("--target", help="target HF checkpoint directory (default: demo SmolLM2-135M)")
    parser.add_argument("--draft", help="draft: an HF checkpoint directory, or a draft saved by "
                                        "train_draft.py (default with the demo target: its trained draft in "
                                        "draft/; otherwise the target)")
    parser.add_argument("--draft-layers", help="use only these layers of the draft checkpoint (with no "
                                               "--draft, of the target: 0-11 is the demo's "
                                               "self-speculative first-12-layers draft)")
    parser.add_argument("--sink-distance", type=int, metavar="N",
                        help="the draft reads its first position (the attention sink) as if it sat N positions "
                             "before each block it forwards, once the context is longer (model.ModelArgs."
                             "sink_distance; 0: true positions). Default: the draft's own setting, the training "
                             "window for a draft saved by train_draft.py (512 for the demo's), else 0")
    parser.add_argument("--bos", choices=["auto", "on", "off"], default="auto",
                        help="put the tokenizer's BOS token before each text; auto: as the checkpoint says "
                             "(tokenizer_config.json add_bos_token: on for Llama-2, TinyLlama, "
                             "Mistral; off for SmolLM2)")


def check_device(name: Optional[str]) -> None:
    """A one-line error for a --device that is not cpu/cuda[:n], or cuda where there is no GPU."""
    if name is None:
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA GPU here; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")


def check_sink_distance(n: Optional[int]) -> None:
    """A one-line error for a --sink-distance below 0 (None: the draft's own setting)."""
    if n is not None and n < 0:
        raise ValueError(f"--sink-distance must be >= 0 (0: true positions), got {n}")


def load_pair(target_path=None, draft_path=None, draft_layers=None, device=None, dtype=None, bos="auto",
              sink_distance=None):
    """(target, draft, tokenizer). Defaults: the demo target and its trained draft (draft/,
    made by train_draft.py); with draft_layers and no draft_path, the draft is the target's
    own first layers instead (the self-speculative draft, for comparison). `bos` (auto, on,
    off) sets `tokenizer.add_bos`, which every encode follows. sink_distance: the draft's
    ModelArgs.sink_distance (None: as its config says)."""
    check_sink_distance(sink_distance)
    if target_path is None:
        target_path = demo_target()
        if draft_path is None and draft_layers is None:
            draft_path = DEMO_DRAFT
            if not (DEMO_DRAFT / "config.json").exists():
                raise FileNotFoundError(f"the demo's trained draft {DEMO_DRAFT} is missing: restore the "
                                        "repo's draft/ folder, make one with train_draft.py, or "
                                        "pass --draft-layers 0-11")
    draft_path = draft_path or target_path
    for name, path in (("--target", target_path), ("--draft", draft_path)):
        if not Path(path).is_dir():
            raise FileNotFoundError(f"{name} {path}: no such directory; pass a Hugging "
                                    "Face checkpoint directory")
    tokenizer = Tokenizer.from_pretrained(target_path)
    if bos not in ("auto", "on", "off"):
        raise ValueError(f"--bos takes auto, on or off, got {bos!r}")
    if bos == "on" and tokenizer.bos_id is None:
        raise ValueError(f"--bos on, but the tokenizer in {target_path} names no BOS token; use --bos off")
    if bos != "auto":
        tokenizer.add_bos = bos == "on"
    target = load_model(target_path, device=device, dtype=dtype)
    if draft_info(draft_path) is not None:  # shares the target's embedding, and so its tokenizer
        if draft_layers is not None:
            raise ValueError("--draft-layers picks layers of a full checkpoint; a draft from train_draft.py "
                             "is used whole")
        draft = load_draft(draft_path, target)
    else:
        if Path(draft_path).resolve() != Path(target_path).resolve():
            check_same_tokenizer(tokenizer, Tokenizer.from_pretrained(draft_path), target_path, draft_path)
        draft = load_model(draft_path, device=device, dtype=dtype, layers=draft_layers)
        if draft.args.vocab_size != target.args.vocab_size:
            raise ValueError(f"draft vocab {draft.args.vocab_size} != target vocab {target.args.vocab_size}: "
                             f"use a draft trained with the target's tokenizer")
    if sink_distance is not None:  # else as the draft says: its config (load_draft), 0 for a checkpoint
        draft.args.sink_distance = sink_distance
    return target, draft, tokenizer


def embedding_probe(model: Transformer) -> list[float]:
    """64 entries of the token embedding: enough to tell one checkpoint's embedding from
    another's, and stable under fp16/bf16/fp32 casts (compare with a loose tolerance)."""
    w = model.tok_embeddings.weight
    rows = torch.linspace(0, w.shape[0] - 1, 16).long().tolist()
    return [round(float(x), 6) for r in rows for x in w[r, :4].float().tolist()]


def draft_info(path) -> Optional[dict]:
    """The "specattn_draft" entry of path/config.json, which marks a draft saved by
    train_draft.py (own layers only, the target's embedding borrowed); None otherwise."""
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("specattn_draft")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def load_draft(path, target: Transformer) -> Transformer:
    """A draft saved by train_draft.py: its own decoder layers and final norm from `path`,
    and the target's token embedding (and so its tied head) shared, not copied.

    config.json's "specattn_draft" entry names the target it extends, with an embedding
    probe that must match `target`'s, and the draft's sink_distance (model.ModelArgs): the
    window it was trained on, beyond which it has never seen its attention sink."""
    info = draft_info(path)
    if info is None:
        raise ValueError(f"{path} is not a draft saved by train_draft.py (no readable config.json with a "
                         f"'specattn_draft' entry); load ordinary checkpoints with load_model")
    probe = torch.tensor(embedding_probe(target))
    if probe.shape != torch.Size([len(info["embedding_probe"])]) or not torch.allclose(
            probe, torch.tensor(info["embedding_probe"]), rtol=1e-2, atol=1e-3):
        raise ValueError(f"the draft in {path} extends {info['target']}, and this target's embedding is not "
                         "that one's; pass the matching --target, or train a draft "
                         "for it with train_draft.py")
    w = target.tok_embeddings.weight
    draft = load_model(path, device=w.device, dtype=w.dtype, shared={"model.embed_tokens.weight": w})
    draft.args.sink_distance = int(info.get("sink_distance", 0))
    return draft


def check_same_tokenizer(a: Tokenizer, b: Tokenizer, path_a, path_b) -> None:
    probe = "Speculative decoding, 2025: naïve café ☕ — 12345 tokens.\n\tEnd."
    same_ids = a.encode(probe, bos=False) == b.encode(probe, bos=False)
    if a.vocab_size != b.vocab_size or not same_ids or a.special != b.special:
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
# Calibration


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
def head_averaged_rows(model: Transformer, tokens: torch.Tensor, start: int, end: int,
                       cache) -> list[torch.Tensor]:
    """Feed tokens[start:end] on top of `cache`; per layer the head-averaged attention rows
    [end - start, end] (fp32)."""
    _, probs = model(tokens[None, start:end], cache=cache, return_attn=True)
    return [p[0].mean(0) for p in probs]


@torch.no_grad()
def kl_matrix(target: Transformer, draft: Transformer, tokens: torch.Tensor,
              chunk: int = 256) -> torch.Tensor:
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


def calibration_book() -> Path:
    """The default calibration text: the demo's Alice, calibrated past the tokens the eval scores."""
    return demo_books() / "test" / "11.txt"


def layer_map_for(target, draft, tokenizer, path=None, text=None, n_tokens: int = 2048,
                  skip_tokens: int = 16384, cache_dir=None) -> list[int]:
    """The layer map: read from `path`, or calibrated once on the demo text and cached."""
    if path is not None:
        return load_layer_map(path, target.args.n_layers, draft.args.n_layers)
    if text is None:
        text = calibration_book()
    shapes = [tuple(p.shape) for p in draft.parameters()] + [tuple(p.shape) for p in target.parameters()]
    fingerprint = json.dumps([str(shapes), float(target.norm.weight.detach().float().sum()),
                              float(draft.norm.weight.detach().float().sum()),
                              draft.args.layer_ids, draft.args.sink_distance, str(text), n_tokens, skip_tokens]
                             + (["bos"] if tokenizer.add_bos else []))  # BOS shifts the calibration window
    digest = hashlib.sha1(fingerprint.encode()).hexdigest()[:12]
    cache_file = Path(cache_dir or CACHE) / f"layer_map_{digest}.json"
    if cache_file.exists():
        try:
            return load_layer_map(cache_file, target.args.n_layers, draft.args.n_layers)
        except ValueError as e:  # a broken cache is rebuilt, not reported
            print(f"[specattn] {e}: calibrating again", file=sys.stderr)
    print(f"[specattn] calibrating the layer map on {n_tokens} tokens of {text} "
          f"(once; cached in {cache_file})",
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
    parser = argparse.ArgumentParser(description="Map each target layer to the draft layer whose attention "
                                     "best predicts it (least KL, monotone). Defaults: the offline demo.")
    add_pair_arguments(parser)
    parser.add_argument("--text",
                        help="calibration text file (default: demo book 11, past the evaluated part)")
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
                                             device=args.device, bos=args.bos, sink_distance=args.sink_distance)
        if args.text is None:
            args.text = calibration_book()
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
