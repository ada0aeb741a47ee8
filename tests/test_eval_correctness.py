"""No silent wrong answers from evaluation (issue 26, evaluate/): a missing untied head is refused, not replaced by
the embedding; --compare-inputs scores each input on its own token ids; the head's blocks go to the device of the
hidden states; SmolLM2's own config evaluates on the command line; what cannot be evaluated is one line."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from evalkit import WORDS, corpus, make_model, one_thread, write_texts  # noqa: E402,F401
from families import make_family  # noqa: E402

import lazymerge  # noqa: E402
from lazymerge.errors import CheckpointError  # noqa: E402

ARGS = dict(seq_len=24, max_tokens=200)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("evalfix")


@pytest.fixture(scope="module")
def data(root):
    return write_texts(root / "data.jsonl", corpus(6))


def cli(*args: str):
    """The command line in this process (a real process per call costs seconds of imports)."""
    from click.testing import CliRunner

    from lazymerge.cli import main

    return CliRunner().invoke(main, list(args))


def one_line(res, *words: str) -> str:
    """A one-line `error: ...`, exit status 2, no traceback (an exception other than the exit is one)."""
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def _without(src: Path, dst: Path, drop: str) -> Path:
    """A copy of checkpoint `src` without tensor `drop`."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    del tensors[drop]
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_missing_untied_head_is_refused(root, data):
    """Llama's config says the head is not tied: a checkpoint without lm_head.weight cannot be evaluated (the
    embedding standing in would be a silently wrong perplexity); transformers would leave it random."""
    model = make_model(root / "untied", "llama", seed=4)
    assert json.loads((model / "config.json").read_text())["tie_word_embeddings"] is False
    broken = _without(model, root / "untied-nohead", "lm_head.weight")
    with pytest.raises(CheckpointError, match="lm_head.weight.*does not tie"):
        lazymerge.evaluate(broken, data, **ARGS)
    one_line(cli("eval", str(broken), "--data", str(data), "-q"), "untied-nohead", "'lm_head.weight'",
             "tie_word_embeddings")


def test_tied_head_reads_the_embedding(root, data):
    """The other side of the rule: a tied config's missing head is the embedding (SmolLM2, Qwen2), as in
    transformers (the family matrix checks the numbers)."""
    model = make_family(root / "tied", "smollm2", seed=5)
    from safetensors import safe_open

    assert "lm_head.weight" not in safe_open(str(model / "model.safetensors"), "pt").keys()
    assert lazymerge.evaluate(model, data, **ARGS).perplexity > 1


def _permuted(src: Path, dst: Path, seed: int) -> Path:
    """The same model under another assignment of token ids: its word-level tokenizer numbers the words in
    another order and its embedding and head rows are permuted to match. It computes the same function of text,
    so its perplexity on any text equals the original's."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tok = json.loads((src / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    words = sorted((w for w in vocab if w not in ("<pad>", "<s>", "</s>", "<unk>")), key=vocab.get)
    g = torch.Generator().manual_seed(seed)
    order = [words[i] for i in torch.randperm(len(words), generator=g).tolist()]
    new = {w: vocab[w] for w in ("<pad>", "<s>", "</s>", "<unk>")}
    new.update({w: 4 + i for i, w in enumerate(order)})
    tok["model"]["vocab"] = new
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    perm = torch.arange(len(vocab))
    for w, i in new.items():
        perm[i] = vocab[w]                        # new row i holds the old row of the same word
    tensors = load_file(str(src / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        rows = tensors[name]
        tensors[name] = torch.cat([rows[perm], rows[len(vocab):]]).contiguous()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_compare_inputs_scores_each_input_on_its_own_token_ids(root):
    """A is a model, B the same model with its token ids permuted; merged with tokenizer_source: base (A's
    ids), B's rows are aligned to A's. Each input's perplexity must be its own: B's equals A's. Scoring B on the
    merge's (A's) ids — what --compare-inputs did — gives another number."""
    a = make_model(root / "vocab-a", "llama", seed=6, word_level=True)
    b = _permuted(a, root / "vocab-b", seed=1)
    text = root / "words.txt"
    g = torch.Generator().manual_seed(0)
    text.write_text(" ".join(WORDS[i] for i in torch.randint(len(WORDS), (260,), generator=g).tolist()))
    recipe = {"merge_method": "linear", "dtype": "float32", "tokenizer_source": "base", "base_model": str(a),
              "models": [{"model": str(a), "parameters": {"weight": 0.5}},
                         {"model": str(b), "parameters": {"weight": 0.5}}]}
    reports = lazymerge.compare_inputs(recipe, text, **ARGS)
    alone = {m: lazymerge.evaluate(m, text, **ARGS) for m in (a, b)}
    assert [r.target for r in reports[:2]] == [str(a), str(b)]
    assert reports[0].window_nll == alone[a].window_nll
    assert reports[1].window_nll == alone[b].window_nll
    assert reports[1].perplexity == pytest.approx(reports[0].perplexity, rel=1e-5)
    assert reports[2].perplexity == pytest.approx(reports[0].perplexity, rel=1e-5)   # the merge is A again


def test_head_blocks_go_to_the_hidden_states_device(root):
    """Streamed generation on CUDA moved the hidden states but never the head's rows. Shown without a GPU: with
    hidden states on the meta device, the head module must compute with its block's rows and bias entries moved
    to that device (torch would happily mix meta and CPU tensors, so the test looks at where they are)."""
    from lazymerge.evaluate.head import OutputHead
    from lazymerge.evaluate.stream import open_stream

    model = make_family(root / "dev", "phi", seed=6)        # a head with a bias: both must move
    stream = open_stream(model, memory="unlimited")
    try:
        hidden = torch.empty((3, 32), device="meta")
        bias = stream.load(stream.sk.head_extra)
        assert list(bias) == ["lm_head.bias"] and bias["lm_head.bias"].device.type == "cpu"
        with OutputHead(stream.sk, hidden, bias) as head:
            logits = head.logits(0, torch.randn(5, 32))     # rows as a checkpoint read returns them: on the CPU
            assert stream.sk.head.weight.device.type == "meta" and stream.sk.head.bias.device.type == "meta"
        assert logits.device.type == "meta" and tuple(logits.shape) == (3, 5)
        assert stream.sk.head.weight.shape == (stream.sk.embed_shape[0], 32)     # the skeleton's own again
    finally:
        stream.close()


def test_smollm2_config_on_the_command_line(root, data):
    """SmolLM2's config (pad_token_id 2, tied embeddings) crashed `lazymerge eval` with
    `AssertionError: Padding_idx must be within num_embeddings`; now it evaluates and generates."""
    model = make_family(root / "smollm2", "smollm2", seed=7)
    res = cli("eval", str(model), "--data", str(data), "--seq-len", "24", "--max-tokens", "200", "--json", "-q",
              "--memory", "8KiB")
    assert res.exit_code == 0 and res.exception is None, res.output
    assert json.loads(res.output)["perplexity"] > 1
    res = cli("eval", str(model), "--prompt", "the cat", "--max-new-tokens", "2", "--memory", "8KiB", "-q")
    assert res.exit_code == 0 and res.exception is None, res.output


def test_refusals_are_one_line(root, data, tmp_path):
    """What evaluation cannot do is said in one line naming the file and the tensor or key."""
    model = make_family(root / "refuse", "llama", seed=8)
    # a tensor whose shape the config contradicts (transformers refuses it too)
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "shape"
    shutil.copytree(model, bad)
    tensors = load_file(str(model / "model.safetensors"))
    tensors["model.norm.weight"] = torch.ones(31, dtype=tensors["model.norm.weight"].dtype)
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    one_line(cli("eval", str(bad), "--data", str(data), "-q"), "shape", "'model.norm.weight'", "[31]", "[32]")
    # a decoder layer's tensor missing
    gone = _without(model, tmp_path / "gone", "model.layers.1.mlp.up_proj.weight")
    one_line(cli("eval", str(gone), "--data", str(data), "-q"), "gone", "'model.layers.1.mlp.up_proj.weight'")
    # a config transformers has no causal LM for
    enc = tmp_path / "encoder"
    shutil.copytree(model, enc)
    (enc / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 32, "vocab_size": 267}))
    one_line(cli("eval", str(enc), "--data", str(data), "-q"), "encoder", "t5")
