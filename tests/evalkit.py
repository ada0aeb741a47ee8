"""Tiny real checkpoints (Llama, Qwen2, Gemma, GPT-2) with an offline-trained tokenizer, for evaluation tests,
and the reference: transformers' whole-model evaluation of the same windows."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

WORDS = ("the cat dog sat on mat ran far away home tree bird sang loud soft red blue green small big old new "
         "river hill stone light dark morning night sun moon rain wind fire water").split()


def corpus(n_docs: int = 24, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) + "." for _ in range(n_docs)]


def make_tokenizer(directory: Path, *, bos: bool = True, vocab_size: int = 120, word_level: bool = False):
    """A byte-level BPE tokenizer trained here on the corpus (or, `word_level`, one id per word of WORDS, so that
    decoding then encoding gives back the same ids); adds <s> before each document when `bos`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if word_level:
        vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS])}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    else:
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(corpus(200, seed=99), trainer=trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(directory))
    return fast


def config_for(arch: str, vocab: int):
    import transformers as T

    common = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        return T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
                             **common)
    if arch == "qwen2":
        return T.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
                             **common)
    if arch == "gemma":
        return T.GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                             num_key_value_heads=1, head_dim=8, max_position_embeddings=128, **common)
    if arch == "gpt2":
        return T.GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=128, **common)
    raise ValueError(arch)


def make_model(directory: Path, arch: str, *, seed: int = 0, dtype: torch.dtype = torch.float32,
               std: float = 0.2, word_level: bool = False) -> Path:
    """A randomly initialised tiny model of `arch` saved with save_pretrained, plus its tokenizer. Weights are
    drawn with a large std so that layers matter (an untrained model's outputs are otherwise near uniform)."""
    import transformers as T

    directory.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(directory, bos=arch != "gpt2", word_level=word_level)
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(config_for(arch, len(tok)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
    model.to(dtype).save_pretrained(str(directory))
    return directory


def write_texts(path: Path, docs: list[str]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    else:
        path.write_text("\n\n".join(docs))
    return path


def reference_eval(model_dir: Path, windows: list[list[int]]) -> tuple[float, float, int]:
    """transformers' whole model in float32 on the given windows: (total NLL, perplexity, predicted tokens)."""
    import transformers as T

    model = T.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            ids = torch.tensor([w])
            logits = model(input_ids=ids).logits[0, :-1].double()
            nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
            total += float(nll)
            count += len(w) - 1
    return total, math.exp(total / count), count


def reference_windows(model_dir: Path, docs: list[str], seq_len: int, max_tokens: int) -> list[list[int]]:
    """The windowing rule written out plainly: tokenizer defaults per document, EOS between documents, first
    `max_tokens` tokens, full windows of `seq_len`."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    stream: list[int] = []
    for i, d in enumerate(docs):
        if i:
            stream.append(tok.eos_token_id)
        stream += tok(d)["input_ids"]
    stream = stream[:max_tokens]
    return [stream[a:a + seq_len] for a in range(0, len(stream) - seq_len + 1, seq_len)]


def make_finetune(base_dir: Path, out_dir: Path, *, seed: int, std: float = 0.05) -> Path:
    """base + N(0, std) on every float tensor; config and tokenizer copied."""
    import shutil

    from safetensors.torch import load_file, save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for f in base_dir.iterdir():
        if f.suffix == ".safetensors":
            tensors = load_file(str(f))
            save_file({k: (v.float() + torch.randn(v.shape, generator=g) * std).to(v.dtype).contiguous()
                       for k, v in tensors.items()}, str(out_dir / f.name), metadata={"format": "pt"})
        elif f.is_file():
            shutil.copyfile(f, out_dir / f.name)
    return out_dir


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is 10x faster than two fighting for it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sample_text(model_dir: Path, n_docs: int, length: int, seed: int = 0) -> list[str]:
    """Documents sampled from a (word-level) model: plain ancestral sampling, special tokens excluded."""
    import transformers as T

    model = T.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tok = T.AutoTokenizer.from_pretrained(str(model_dir))
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((n_docs, 1), tok.bos_token_id)
    with torch.no_grad():
        for _ in range(length):
            logits = model(input_ids=ids).logits[:, -1]
            logits[:, :4] = -float("inf")                 # <pad> <s> </s> <unk>
            ids = torch.cat([ids, torch.multinomial(torch.softmax(logits, -1), 1, generator=g)], 1)
    return [tok.decode(row[1:]) for row in ids]


def make_search_set(root: Path, n_docs: int = 4) -> dict:
    """base, two fine-tunes far apart, and eval text sampled from ft1 (the best linear mix leans to ft1), with a
    linear recipe of the two: what the search tests and benches/search_cluster.py search over."""
    base = make_model(root / "base", "llama", seed=5, word_level=True)
    ft1 = make_finetune(base, root / "ft1", seed=51, std=0.2)
    ft2 = make_finetune(base, root / "ft2", seed=52, std=0.2)
    data = root / "data.txt"
    data.write_text(" ".join(sample_text(ft1, n_docs, 127)))
    recipe = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": str(ft1), "parameters": {"weight": 0.5}},
                         {"model": str(ft2), "parameters": {"weight": 0.25}}]}
    return {"root": root, "data": data, "recipe": recipe, "ft1": ft1, "ft2": ft2}
