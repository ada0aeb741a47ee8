"""layer_inputs: the hidden states at each decoder layer's input, computed layer by layer, equal transformers'
own `output_hidden_states` of the whole model."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from evalkit import make_model, one_thread  # noqa: E402,F401

from lazymerge.evaluate.stream import layer_inputs  # noqa: E402


@pytest.fixture(scope="module")
def eval_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_models")
    return {arch: make_model(root / arch, arch) for arch in ("llama", "qwen2", "gemma", "gpt2")}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma"])
def test_layer_inputs_match_transformers_hidden_states(eval_models, arch):
    import transformers as T

    model_dir = eval_models[arch]
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 100, (n,), generator=g) for n in (7, 12)]   # different lengths
    model = T.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = [model(input_ids=s[None], output_hidden_states=True).hidden_states for s in seqs]
    seen = []
    for i, hs in layer_inputs(model_dir, seqs, memory="64KiB"):
        seen.append(i)
        assert len(hs) == len(seqs)
        for h, r, s in zip(hs, ref, seqs):
            assert h.shape == (len(s), model.config.get_text_config().hidden_size)
            assert h.dtype == torch.float32
            torch.testing.assert_close(h, r[i][0], rtol=1e-5, atol=1e-5)
    assert seen == list(range(model.config.get_text_config().num_hidden_layers))
