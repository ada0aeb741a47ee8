"""Tiny dense checkpoints for the MoE tests and the mergekit-moe parity script: transformers' own Llama, Qwen2 and
Qwen3 classes, weights drawn from seeded generators (the same bytes on every machine: see `noise`), and a
word-level tokenizer trained offline with `tokenizers`."""
from __future__ import annotations

import math
from pathlib import Path

import torch

WORDS = ("def return import class for while print lambda list dict the a of and to in is story once upon time "
         "king queen forest dragon sum product integral matrix vector prime number equation proof theorem "
         "hello world cat dog run jump happy sad red blue green").split()
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)


def write_tokenizer(path: Path) -> int:
    """A word-level tokenizer (BOS <s>, EOS </s>) trained on the word list; returns its vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(path))
    return tok.get_vocab_size()


def noise(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Zero-mean, unit-variance noise, the same bytes on every CPU: uniform on [-sqrt 3, sqrt 3] from torch.rand
    (24 random bits per value, scaled exactly). torch.randn is not: its vectorised Box-Muller path rounds
    differently from the scalar one (ATEN_CPU_CAPABILITY=default changes about a third of its values by an ulp),
    which would change the generated inputs, and so the stored mergekit-moe outputs, from one CPU to another."""
    return (torch.rand(shape, generator=gen) * 2 - 1) * math.sqrt(3)


def make_model(path: Path, kind: str, seed: int, *, like: Path | None = None, scale: float = 0.02,
               zero_down: bool = False, **overrides) -> Path:
    """A tiny `kind` (llama | qwen2 | qwen3) checkpoint in float32 at `path`, with the tokenizer. With `like`, a
    fine-tune: that model's weights plus seeded noise of standard deviation `scale`; `zero_down` zeroes every MLP
    down_proj."""
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                              Qwen3ForCausalLM)

    path.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(path)
    cls, cfg_cls = {"llama": (LlamaForCausalLM, LlamaConfig), "qwen2": (Qwen2ForCausalLM, Qwen2Config),
                    "qwen3": (Qwen3ForCausalLM, Qwen3Config)}[kind]
    kw = dict(TINY, vocab_size=vocab, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if kind == "qwen3":
        kw["head_dim"] = 8
    kw.update(overrides)
    config = cfg_cls(**kw)
    model = cls(config)
    gen = torch.Generator().manual_seed(seed)
    ref = None
    if like is not None:
        from safetensors.torch import load_file

        ref = load_file(str(like / "model.safetensors"))
    state = {}
    for name, t in model.state_dict().items():
        if ref is not None and name in ref:
            v = ref[name] + noise(t.shape, gen) * scale
        elif name.endswith("norm.weight"):
            v = 1.0 + noise(t.shape, gen) * 0.1
        else:
            v = noise(t.shape, gen) * 0.2
        if zero_down and name.endswith("mlp.down_proj.weight"):
            v = torch.zeros_like(v)
        state[name] = v.float()
    model.load_state_dict(state)
    model.save_pretrained(str(path))
    return path
