"""Tiny GGUF models for the tests, written the way llama.cpp's converter writes them, with `gguf`'s own writer.

A small random Hugging Face model (its config shaped like the family's, a byte-level BPE tokenizer trained
offline) is converted here: llama.cpp's tensor names (`gguf.get_tensor_name_map`), llama's q/k rows permuted for
its rotary layout, Gemma's norm weights stored plus one, 2-d weights quantized with `gguf.quants.quantize` (or,
for the K-quants, which gguf-py cannot quantize, random blocks with sane scales), the tokenizer as GGUF metadata.
What lazymerge reads from these files is compared with what transformers' GGUF loader reads from them, so this
writer only has to produce files both can read; it shares no code with lazymerge.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from evalkit import make_tokenizer


def cache_root(d: Path) -> Iterator[Path]:
    """A module fixture's body: `d`, with LAZYMERGE_CACHE (also seen by CLI subprocesses) under it meanwhile."""
    old = os.environ.get("LAZYMERGE_CACHE")
    os.environ["LAZYMERGE_CACHE"] = str(d / "cache")
    yield d
    if old is None:
        os.environ.pop("LAZYMERGE_CACHE", None)
    else:
        os.environ["LAZYMERGE_CACHE"] = old

# Hugging Face model_type -> llama.cpp architecture (llama.cpp writes Mistral as llama)
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
             "gemma2": "gemma2", "gemma3_text": "gemma3"}
FAMILIES = tuple(GGUF_ARCH)
# K-quant blocks: (bytes, offsets of the f16 scales inside a block)
K_SCALES = {"Q2_K": (84, (80, 82)), "Q3_K": (110, (108,)), "Q4_K": (144, (0, 2)), "Q5_K": (176, (0, 2)),
            "Q6_K": (210, (208,))}


def family_config(family: str, vocab: int, hidden: int = 64, layers: int = 2):
    import transformers as T

    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0)
    if family == "llama":
        return T.LlamaConfig(tie_word_embeddings=False, **common)
    if family == "mistral":
        return T.MistralConfig(tie_word_embeddings=False, sliding_window=None, **common)
    if family == "qwen2":
        return T.Qwen2Config(tie_word_embeddings=True, **common)
    if family == "qwen3":     # transformers' GGUF config for qwen3 ignores attention.key_length: its default 128
        return T.Qwen3Config(tie_word_embeddings=True, head_dim=128, **common)
    if family == "phi3":
        return T.Phi3Config(tie_word_embeddings=False, **common)
    if family == "gemma2":
        return T.Gemma2Config(head_dim=hidden // 4, **common)
    if family == "gemma3_text":
        return T.Gemma3TextConfig(head_dim=hidden // 4, **common)
    raise ValueError(family)


def make_llama_tokenizer(directory: Path, vocab_size: int = 400, texts=None):
    """A Llama-2 style tokenizer.json (BPE with byte fallback: <0x00>..<0xFF> tokens, "▁" for spaces, the
    decoder llama's), trained here on `texts` (default: the tests' corpus): the kind llama.cpp's converter writes
    as a `llama` vocabulary. benches/gguf_cost.py trains it on real prose."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if texts is None:
        from evalkit import corpus

        texts = corpus(200, seed=99)
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)])
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(directory))
    return fast


def make_hf_model(directory: Path, family: str, *, seed: int = 0, hidden: int = 64, layers: int = 2,
                  llama_vocab: bool = False) -> Path:
    """A random tiny model of `family` saved with save_pretrained (float32), with its tokenizer (byte-level BPE,
    or with `llama_vocab` a Llama-2 style one)."""
    import transformers as T

    directory.mkdir(parents=True, exist_ok=True)
    tok = make_llama_tokenizer(directory) if llama_vocab else make_tokenizer(directory, vocab_size=320)
    if family.startswith("qwen"):       # transformers' Qwen2Tokenizer adds <|endoftext|> when a vocabulary lacks it
        tok.add_special_tokens({"additional_special_tokens": ["<|endoftext|>"]})
        tok.save_pretrained(str(directory))
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(family_config(family, len(tok), hidden, layers))
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.normal_(1.0 if p.dim() == 1 else 0.0, 0.2)
    model.save_pretrained(str(directory))
    return directory


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute`: each head's rows from (2, dim) halves to interleaved (dim, 2) pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer_metadata(writer, model_dir: Path) -> None:
    doc = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = doc["model"]["vocab"]
    special = {t["id"] for t in doc.get("added_tokens", []) if t.get("special")}
    tokens = [tok for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in doc["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)


def _arch_metadata(writer, cfg, arch: str) -> None:
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    writer.add_name(f"{cfg.model_type}-tiny")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = cfg.rope_parameters
    writer.add_rope_freq_base(float(rope.get("full_attention", rope)["rope_theta"]))
    writer.add_vocab_size(cfg.vocab_size)
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    if arch in ("gemma2", "gemma3"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_sliding_window(cfg.sliding_window)


def _random_k_blocks(qtype: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant blocks whose f16 scales are small finite numbers: valid data that dequantizes to finite
    values (gguf-py has no K-quant quantizer)."""
    nbytes, scales = K_SCALES[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // 256, nbytes), dtype=np.uint8)
    for off in scales:
        blocks[:, off:off + 2] = rng.uniform(-0.02, 0.02, size=(blocks.shape[0], 1)).astype(np.float16).view(np.uint8)
    return blocks.reshape(rows, cols // 256 * nbytes)


def write_gguf(model_dir: Path, out: Path, qtype: str = "Q8_0", *, split_max_tensors: int = 0,
               seed: int = 0) -> list[Path]:
    """Convert the Hugging Face model in `model_dir` to GGUF at `out`: 2-d weights in `qtype` (F32, F16, BF16,
    Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 quantized by gguf; Q2_K..Q6_K random blocks) where their rows hold whole
    blocks (F16 otherwise), 1-d tensors in F32. Returns the files written (split files when asked)."""
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(model_dir))
    arch = GGUF_ARCH[cfg.model_type]
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    name_map = gguf.get_tensor_name_map(arch_enum, cfg.num_hidden_layers)
    writer = gguf.GGUFWriter(out, arch, split_max_tensors=split_max_tensors)
    _arch_metadata(writer, cfg, arch)
    _tokenizer_metadata(writer, model_dir)
    qt = gguf.GGMLQuantizationType[qtype]
    rng = np.random.default_rng(seed)
    for name, t in load_file(str(model_dir / "model.safetensors")).items():
        base, suffix = name.rsplit(".", 1)
        gname = name_map.get_name(base)
        assert gname is not None, name
        gname += "." + suffix
        w = t.float().numpy()
        if arch == "llama" and gname.endswith(("attn_q.weight", "attn_k.weight")):
            n = cfg.num_attention_heads if "attn_q" in gname else cfg.num_key_value_heads
            w = _permute(w, n)
        if arch in ("gemma2", "gemma3") and gname.endswith("norm.weight"):
            w = w + 1
        if w.ndim == 1:
            writer.add_tensor(gname, w.astype(np.float32))
        elif qtype in K_SCALES and w.shape[1] % 256 == 0:
            writer.add_tensor(gname, _random_k_blocks(qtype, *w.shape, rng), raw_dtype=qt)
        elif qtype in ("F32", "F16") or w.shape[1] % gguf.GGML_QUANT_SIZES[qt][0] or qtype in K_SCALES:
            writer.add_tensor(gname, w.astype(np.float32 if qtype == "F32" else np.float16))
        else:
            writer.add_tensor(gname, gguf.quants.quantize(w, qt), raw_dtype=qt)
    files = writer.format_shard_names(Path(out))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return files
