"""Distil a small speculative draft from a target: its own few decoder layers, the target's embedding.

The draft is a Llama-style model at the target's width that *shares* the target's
tokenizer, token embedding and tied head; only its own decoder layers and final norm are
stored (calibrate.load_draft puts the two back together). Its layers start as copies of
some target layers (--init-layers), or as a draft this script saved (--init-draft, to train it
further), and are trained by distillation:

    loss = KL(target's next-token distribution || draft's)            on every position
         + λ · KL(target layer j's head-averaged attention || draft layer g(j)'s)
                                                                       (optional, --attn-loss λ)

on two kinds of text: windows of the training books, and text the target itself samples
at temperature 1 from book prompts ("on-policy": what the draft will be asked to predict
when it speculates for this target). For the attention term, g maps the target's sparse
layers (the ones SpecAttn selects for) onto the draft's layers in equal contiguous
groups, a monotone map like the one calibrate.py later finds. It matters: trained on tokens
alone, the demo draft learned no attention sink, so top-p on its attention dropped the
position the target's deep layers attend to most (docs/results.md, "The demo draft").

Held out of training: the first --holdout tokens of every book, which covers every scored
token of eval_pg19.py's protocols (paper: 2048, long: 8192), and the measurement of
acceptance below.

    python train_draft.py --out draft --attn-loss 0.5 --steps 2500 --pool 2048 --reuse 8   # the demo's draft/
    python train_draft.py --out d --time-budget 200     # at most as many steps as fit in 200 s (the estimate,
                                                        # made over the warm-up steps, includes the first
                                                        # pool of samples, so it errs low)
    python train_draft.py --out d2 --init-draft d --time-budget 200   # d, trained for 200 s more

On a CUDA device the target runs in bf16 and the draft trains in fp32 under bf16 autocast.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from calibrate import draft_info, embedding_probe, load_draft, parse_layers
from model import Tokenizer, Transformer, atomic_directory, hf_state_dict, load_model
from specattn import acceptance_probability

# ----------------------------------------------------------------------------------------
# The draft

DEFAULT_INIT_LAYERS = "0,9,19,29"  # the target layers a fresh draft starts from (--init-layers)


def init_draft(target: Transformer, init_layers: list[int]) -> Transformer:
    """A draft whose layers are copies of target layers `init_layers` and whose token
    embedding (and tied head) is the target's own tensor, frozen."""
    if not target.args.tie_word_embeddings:
        raise ValueError("train_draft.py shares the target's embedding as the draft's head: it needs a "
                         "target with tied embeddings (tie_word_embeddings=true)")
    if not init_layers or any(not 0 <= i < target.args.n_layers for i in init_layers):
        raise ValueError(f"--init-layers {init_layers} must name layers in 0..{target.args.n_layers - 1}")
    args = copy.deepcopy(target.args)
    args.n_layers, args.layer_ids = len(init_layers), None
    with torch.device("meta"):
        draft = Transformer(args)
    draft.layers = torch.nn.ModuleList(copy.deepcopy(target.layers[i]).float() for i in init_layers)
    draft.norm = copy.deepcopy(target.norm).float()
    draft.tok_embeddings = target.tok_embeddings  # shared, not copied
    draft.output.weight = target.tok_embeddings.weight
    target.requires_grad_(False)
    draft.init_rope(target.output.weight.device)
    return draft


def continue_draft(target: Transformer, path) -> Transformer:
    """A draft train_draft.py saved in `path`, for more training (--init-draft): its layers
    and final norm in fp32 and trainable, the target's embedding shared as in init_draft. Its
    sink_distance is off, as a fresh draft's is: no training window is longer than the one it
    trained on, and the held-out acceptance is then measured as for a fresh draft, so the
    figures of the runs it took compare."""
    draft = load_draft(path, target)  # checks that it extends this target
    draft.layers.float().requires_grad_(True)
    draft.norm.float().requires_grad_(True)
    draft.args.sink_distance = 0
    target.requires_grad_(False)
    return draft


def save_draft(draft: Transformer, target_config: dict, out_dir, info: dict, shards: int = 2) -> Path:
    """Write config.json (the target's, with the draft's layer count and a "specattn_draft"
    entry) and the draft's own tensors under their HF names, in bf16, split over `shards`
    safetensors files by layer (so that no file is large)."""
    from safetensors.torch import save_file

    n = draft.args.n_layers
    files: dict[str, dict] = {}
    weight_map = {}
    for name, tensor in hf_state_dict(draft).items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            continue  # the embedding (and tied head) is the target's
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else n - 1  # norm: last shard
        fname = f"model-{layer * shards // n + 1:05d}-of-{shards:05d}.safetensors"
        files.setdefault(fname, {})[name] = tensor.detach().to("cpu", torch.bfloat16).contiguous()
        weight_map[name] = fname
    config = dict(target_config, num_hidden_layers=n, torch_dtype="bfloat16", specattn_draft=info)
    with atomic_directory(out_dir) as tmp:  # a kill mid-save leaves the previous draft whole
        for fname, tensors in files.items():
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        index = {"metadata": {}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
    return Path(out_dir)


def autocast(device: torch.device):
    """bf16 autocast on CUDA (fp32 draft layers meet the bf16 shared embedding); off on CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# ----------------------------------------------------------------------------------------
# Data: book windows and the target's own samples


def book_tokens(tokenizer: Tokenizer, books: list[Path],
                holdout: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(training tokens: every book after its first `holdout` tokens, concatenated;
    held-out heads: each book's first `holdout` tokens)."""
    train, heads = [], []
    for book in books:
        ids = tokenizer.encode(Path(book).read_text(encoding="utf-8", errors="replace"))
        if len(ids) <= holdout + 1024:
            raise ValueError(f"{book} has {len(ids)} tokens; training needs more than "
                             f"--holdout {holdout} + 1024")
        heads.append(torch.tensor(ids[:holdout]))
        train.append(torch.tensor(ids[holdout:]))
    return torch.cat(train), heads


def random_windows(tokens: torch.Tensor, n: int, length: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(tokens) - length, (n,), generator=generator)
    return torch.stack([tokens[s:s + length] for s in starts.tolist()])  # [n, length]


@torch.no_grad()
def sample_from_target(target: Transformer, prompts: torch.Tensor, length: int, generator: torch.Generator,
                       temperature: float = 1.0) -> torch.Tensor:
    """prompts [N, P] -> [N, length]: each prompt continued by the target's own samples."""
    N, P = prompts.shape
    cache = target.new_cache(batch_size=N, max_len=length)
    out = [prompts]
    logits = target(prompts, cache=cache)[:, -1]  # [N, V]
    for _ in range(length - P):
        tok = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)  # [N, 1]
        out.append(tok)
        if cache.length < length - 1:
            logits = target(tok, cache=cache)[:, -1]
    return torch.cat(out, 1)


class Batches:
    """Training batches: `batch - n_policy` book windows plus `n_policy` target samples per
    step. Samples come from pools of `pool` sequences, each pool used `reuse` times."""

    def __init__(self, target, train_tokens, batch, seq_len, policy_frac, pool, reuse, prompt_len, generator):
        self.target, self.tokens, self.batch, self.seq_len = target, train_tokens, batch, seq_len
        self.device = target.output.weight.device
        self.n_policy = round(batch * policy_frac)
        self.pool_size, self.reuse, self.prompt_len, self.g = pool, reuse, prompt_len, generator
        self.pool, self.pos, self.uses, self.sampling_s = None, 0, 0, 0.0

    def _policy(self, n: int) -> torch.Tensor:
        if self.pool is None or self.pos + n > len(self.pool):
            if self.pool is None or self.uses >= self.reuse:
                t0 = time.time()
                prompts = random_windows(self.tokens, self.pool_size, self.prompt_len, self.g)
                self.pool = sample_from_target(self.target, prompts.to(self.device), self.seq_len,
                                               self._device_gen())
                self.uses = 0
                self.sampling_s += time.time() - t0
            self.pool = self.pool[torch.randperm(len(self.pool), generator=self.g)]
            self.pos, self.uses = 0, self.uses + 1
        out = self.pool[self.pos:self.pos + n]
        self.pos += n
        return out

    def _device_gen(self) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(int(torch.randint(0, 2 ** 62, (), generator=self.g)))
        return g

    def __call__(self) -> torch.Tensor:
        books = random_windows(self.tokens, self.batch - self.n_policy, self.seq_len, self.g).to(self.device)
        if self.n_policy == 0:
            return books
        return torch.cat([books, self._policy(self.n_policy)], 0)  # [batch, seq_len]


# ----------------------------------------------------------------------------------------
# Losses and measurements


def attention_groups(n_target_layers: int, n_draft_layers: int, dense_layers: int) -> dict[int, int]:
    """target sparse layer j -> draft layer, in equal contiguous (monotone) groups."""
    sparse = range(dense_layers, n_target_layers)
    return {j: (j - dense_layers) * n_draft_layers // len(sparse) for j in sparse}


def head_mean(probs: list) -> list:
    return [p.float().mean(1) if p is not None else None for p in probs]  # per layer [B, T, S]


def attention_kl(target_rows: torch.Tensor, draft_rows: torch.Tensor, skip: int = 16) -> torch.Tensor:
    """Mean over query rows t >= skip of KL(target row || draft row); rows [B, T, T], causal
    (entries above the diagonal are 0 in both)."""
    a, b = target_rows[:, skip:], draft_rows[:, skip:]
    return (torch.xlogy(a, a) - a * torch.log(b.clamp_min(1e-12))).sum(-1).mean()


def distill_loss(target: Transformer, draft: Transformer, x: torch.Tensor, attn_weight: float,
                 groups: dict[int, int]) -> tuple[torch.Tensor, float, float]:
    """x [B, T] -> (loss, token KL, attention KL)."""
    with torch.no_grad():
        if attn_weight > 0:
            t_logits, t_probs = target(x, return_attn=True)
            t_rows = head_mean(t_probs)
            del t_probs
        else:
            t_logits = target(x)
        t_logp = torch.log_softmax(t_logits.float(), -1)  # [B, T, V]
        del t_logits
    if attn_weight > 0:
        d_logits, d_probs = draft(x, return_attn=True)
        d_rows = head_mean(d_probs)
        attn = torch.stack([attention_kl(t_rows[j], d_rows[i]) for j, i in groups.items()]).mean()
    else:
        d_logits, attn = draft(x), torch.zeros((), device=x.device)
    d_logp = torch.log_softmax(d_logits.float(), -1)
    token_kl = F.kl_div(d_logp.flatten(0, 1), t_logp.flatten(0, 1), log_target=True, reduction="batchmean")
    return token_kl + attn_weight * attn, token_kl.item(), attn.item()


@torch.no_grad()
def expected_acceptance(target: Transformer, draft: Transformer, heads: list[torch.Tensor],
                        n_tokens: int) -> float:
    """Mean over positions of Σ_x min(p(x), q(x)) at temperature 1, teacher-forced on the
    held-out book heads (first n_tokens of each): the probability that speculative
    sampling accepts a draft token."""
    device = target.output.weight.device
    total, count = 0.0, 0
    for h in heads:
        x = h[:n_tokens].to(device)[None]
        with autocast(device):
            total += acceptance_probability(target(x)[0], draft(x)[0]).sum().item()
        count += x.shape[1]
    return total / count


# ----------------------------------------------------------------------------------------
# Training


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(target: Transformer, draft: Transformer, batches: Batches, steps: int, lr: float, warmup: int,
          attn_weight: float, dense_layers: int, time_budget=None, log=print, log_every: int = 50) -> dict:
    """Train `draft` in place. With time_budget (s), `steps` is lowered after the first
    `warmup` steps (whose learning rates do not depend on `steps`) to what fits the budget."""
    device = target.output.weight.device
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    groups = attention_groups(target.args.n_layers, draft.args.n_layers, dense_layers)
    draft.train()
    t0, history = time.time(), []
    step = 0
    while step < steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        x = batches()
        with torch.enable_grad(), autocast(device):
            loss, token_kl, attn_kl = distill_loss(target, draft, x, attn_weight, groups)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if time_budget is not None and step == warmup:
            per_step = (time.time() - t0) / step
            steps = min(steps, max(step, int(time_budget / per_step)))
            log(f"  {per_step * 1e3:.0f} ms/step over the first {step} steps -> {steps} "
                f"steps in {time_budget:g} s")
        if step % log_every == 0 or step == steps:
            history.append({"step": step, "token_kl": round(token_kl, 4), "attn_kl": round(attn_kl, 4)})
            log(f"  step {step}/{steps}  token KL {token_kl:.4f}  attention KL {attn_kl:.4f}  "
                f"lr {opt.param_groups[0]['lr']:.2e}  {time.time() - t0:.0f} s")
    draft.eval()
    return {"steps": steps, "seconds": round(time.time() - t0, 1),
            "sampling_seconds": round(batches.sampling_s, 1), "history": history}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Distil a small draft (own decoder layers + the target's "
                                            "embedding and tied head) from a target, for "
                                            "speculative decoding and SpecAttn.")
    p.add_argument("--target", help="target HF checkpoint directory (default: the demo SmolLM2-135M)")
    p.add_argument("--books", nargs="+", help="training text files (default: the two demo books)")
    p.add_argument("--out", required=True, help="directory to write the draft to (config.json + safetensors)")
    p.add_argument("--init-layers",
                   help="target layers the draft's layers start from (their count is the draft's depth; "
                        f"default {DEFAULT_INIT_LAYERS})")
    p.add_argument("--init-draft", metavar="DIR",
                   help="start from a draft train_draft.py saved in DIR (its layers and final norm; it must "
                        "extend --target) and train it further, instead of from copies of target layers: "
                        "how a training longer than one run is split over several. --seq-len must be the "
                        "window it trained on; the other flags are this run's own (its config.json's "
                        "recipe lists the ones it trained with)")
    p.add_argument("--steps", type=int, default=2000,
                   help="optimizer steps (an upper bound with --time-budget)")
    p.add_argument("--time-budget", type=float, help="seconds: after warm-up, cut --steps to what fits")
    p.add_argument("--batch", type=int, default=32, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=5e-4,
                   help="peak learning rate (AdamW, betas 0.9/0.95, no decay)")
    p.add_argument("--warmup", type=int, default=50, help="linear warm-up steps")
    p.add_argument("--attn-loss", type=float, default=0.0,
                   help="weight λ of the attention-alignment KL (0: token distillation alone)")
    p.add_argument("--dense-layers", type=int, default=2,
                   help="first target layers SpecAttn keeps dense (no attention term for them)")
    p.add_argument("--policy-frac", type=float, default=0.5,
                   help="fraction of each batch sampled by the target")
    p.add_argument("--pool", type=int, default=1024, help="target samples generated at once")
    p.add_argument("--reuse", type=int, default=4, help="passes over each pool of samples")
    p.add_argument("--prompt-len", type=int, default=32, help="book tokens that start each target sample")
    p.add_argument("--holdout", type=int, default=8192, help="leading tokens of each book never trained on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50, help="print the losses every N steps")
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    return p.parse_args(argv)


def check_init_draft(args) -> dict:
    """The "specattn_draft" entry of --init-draft's config.json; one-line errors for a draft
    that cannot be continued, before anything loads."""
    if args.init_layers is not None:
        raise ValueError("--init-layers and --init-draft both say where the draft starts: give one")
    info = draft_info(args.init_draft)
    if info is None:
        raise ValueError(f"--init-draft {args.init_draft}: not a draft saved by train_draft.py (no config.json "
                         "with a 'specattn_draft' entry)")
    window = info.get("sink_distance", args.seq_len)
    if window != args.seq_len:
        raise ValueError(f"the draft in {args.init_draft} trained on {window}-token windows; continue it "
                         f"with --seq-len {window}")
    return info


def main(argv=None):
    args = parse_args(argv)
    earlier = check_init_draft(args) if args.init_draft is not None else None  # what it continues

    if args.target is None:
        from demo import demo_target

        args.target = demo_target()
    if args.books is None:
        from demo import BOOKS, demo_books

        args.books = [demo_books() / "test" / f"{book_id}.txt" for book_id in BOOKS]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    target = load_model(args.target, device=device, dtype=dtype)
    tokenizer = Tokenizer.from_pretrained(args.target)
    train_tokens, heads = book_tokens(tokenizer, args.books, args.holdout)
    if args.init_draft is None:
        args.init_layers = args.init_layers or DEFAULT_INIT_LAYERS
        draft, start = init_draft(target, parse_layers(args.init_layers)), f"layers from {args.init_layers}"
    else:
        draft = continue_draft(target, args.init_draft)
        start = f"{draft.args.n_layers} layers from {args.init_draft}"
    print(f"[train_draft] target {args.target} ({target.args.n_layers} layers); draft {start}; "
          f"{len(train_tokens)} training book tokens; {device}", file=sys.stderr)
    before = expected_acceptance(target, draft, heads, 2048)
    batches = Batches(target, train_tokens, args.batch, args.seq_len, args.policy_frac, args.pool, args.reuse,
                      args.prompt_len, g)
    result = train(target, draft, batches, args.steps, args.lr, args.warmup, args.attn_loss,
                   args.dense_layers, time_budget=args.time_budget,
                   log=lambda s: print(s, file=sys.stderr, flush=True), log_every=args.log_every)
    after = expected_acceptance(target, draft, heads, 2048)
    recipe = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
              if k not in ("out", "device", "time_budget", "target", "books", "log_every", "init_draft")}
    recipe["steps"] = result["steps"]
    if earlier is not None:  # what the draft it started from was trained with, and its own start
        recipe["init_draft"] = {"name": Path(args.init_draft).name, "recipe": earlier.get("recipe"),
                                "acceptance_heldout_after": earlier.get("acceptance_heldout_after")}
    # The draft never sees its attention sink further back than one training window (see
    # model.ModelArgs.sink_distance); generation and evaluation place it there.
    info = {"target": Path(args.target).name, "embedding_probe": embedding_probe(target),
            "sink_distance": args.seq_len,
            "books": [Path(b).name for b in args.books], "recipe": recipe,
            "train_seconds": result["seconds"], "sampling_seconds": result["sampling_seconds"],
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "acceptance_heldout_before": round(before, 4), "acceptance_heldout_after": round(after, 4),
            "history": result["history"]}
    target_config = json.loads((Path(args.target) / "config.json").read_text())
    out = save_draft(draft, target_config, args.out, info)
    print(f"[train_draft] expected acceptance Σmin(p,q) on the held-out book heads: {before:.3f} "
          f"-> {after:.3f}; {result['steps']} steps "
          f"in {result['seconds']:.0f} s; saved to {out}", file=sys.stderr)
    reloaded = load_draft(out, target)  # the saved draft must load back and agree
    x = heads[0][:64].to(device)[None]
    with torch.no_grad(), autocast(device):
        err = (reloaded(x) - draft(x)).abs().max().item()
    print(f"[train_draft] reloaded draft max |Δ logits| = {err:.3g} (bf16 storage)", file=sys.stderr)
    return out


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted: the draft is written when training ends, so nothing was saved")
