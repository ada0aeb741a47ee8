"""The diagonal Fisher written by `compute_fisher`, checked against per-sequence gradients taken independently
with `torch.autograd.grad` on a freshly loaded copy of the model."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from lazymerge.errors import CheckpointError, LazyMergeError
from lazymerge.fisher import compute_fisher
from lazymerge.io.checkpoint import Checkpoint

WORDS = "the cat sat on a mat while dogs ran past big red barns and small blue boats".split()


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    path = tmp_path / "model"
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _reference(model_dir: Path, windows: list[list[int]]) -> dict[str, torch.Tensor]:
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).float().eval()
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for ids in windows:
        x = torch.tensor([ids])
        grads = torch.autograd.grad(model(input_ids=x, labels=x).loss, list(params.values()))
        for n, g in zip(params, grads):
            total[n] += g * g
    return {n: t / len(windows) for n, t in total.items()}


def test_fisher_matches_per_sequence_squared_gradients(tmp_path: Path, model_dir: Path) -> None:
    text = "\n".join(" ".join(WORDS[(i * 3) % len(WORDS):] + WORDS[:(i * 3) % len(WORDS)]) for i in range(4))
    (tmp_path / "data.txt").write_text(text + "\n")
    ids = [WORDS.index(w) + 1 for w in text.split()]
    report = compute_fisher(model_dir, tmp_path / "data.txt", tmp_path / "fisher", max_samples=3, seq_len=20)
    assert (report.samples, report.tokens) == (3, 60)

    want = _reference(model_dir, [ids[0:20], ids[20:40], ids[40:60]])
    with Checkpoint.open(tmp_path / "fisher") as fisher, Checkpoint.open(model_dir) as model:
        assert set(model.tensors) <= set(fisher.tensors)       # every checkpoint name, tied ones included
        assert torch.equal(fisher.read("lm_head.weight"), fisher.read("model.embed_tokens.weight"))
        for name, ref in want.items():
            assert fisher.tensors[name].dtype == "F32"
            torch.testing.assert_close(fisher.read(name), ref, rtol=1e-4, atol=1e-10, msg=name)
        assert fisher.config["model_type"] == "llama"
    info = json.loads((tmp_path / "fisher" / "fisher.json").read_text())
    assert info["samples"] == 3 and info["seq_len"] == 20


def test_short_tail_is_a_sample_and_empty_text_is_refused(tmp_path: Path, model_dir: Path) -> None:
    (tmp_path / "short.txt").write_text("the cat sat\n")
    assert compute_fisher(model_dir, tmp_path / "short.txt", tmp_path / "f1", max_samples=8, seq_len=64).tokens == 3
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(CheckpointError, match="empty.txt: fewer than 2 tokens"):
        compute_fisher(model_dir, tmp_path / "empty.txt", tmp_path / "f2", max_samples=8, seq_len=64)
    with pytest.raises(CheckpointError, match="missing.txt: data file does not exist"):
        compute_fisher(model_dir, tmp_path / "missing.txt", tmp_path / "f3", max_samples=8, seq_len=64)


def test_missing_transformers_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "data.txt").write_text("x y\n")
    monkeypatch.setitem(sys.modules, "transformers", None)   # makes `import transformers` raise ImportError
    with pytest.raises(LazyMergeError, match=r"pip install lazymerge\[fisher\]"):
        compute_fisher(tmp_path, tmp_path / "data.txt", tmp_path / "out", max_samples=1, seq_len=8)
