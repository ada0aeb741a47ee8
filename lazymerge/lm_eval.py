"""lm-evaluation-harness on lazymerge's layer-streaming forward: `LazyMergeLM`, lm-eval's model `lazymerge`.

    import lm_eval, lazymerge.lm_eval
    lm_eval.simple_evaluate(model="lazymerge", model_args={"pretrained": "recipe.yaml", "memory": "2GiB"},
                            tasks=["arc_easy"])
    lm_eval.simple_evaluate(model=lazymerge.lm_eval.LazyMergeLM("./merged", memory="1GiB"), tasks=["hellaswag"])
    python -m lazymerge.lm_eval run --model lazymerge --model_args pretrained=recipe.yaml,memory=2GiB --tasks ...

`pretrained` is a checkpoint directory or a recipe (merged layer by layer in memory, never written); what else
lazymerge reads as a model works too. Importing this module registers the name `lazymerge` with lm-eval.

The text rules are lm-eval's `HFLM` (`hf` model) ones, so the numbers equal a whole-model evaluation in float32:
context/continuation tokenization (`TemplateLM._encode_pair`, the prefix token for an empty context), left
truncation to the model's context, rolling windows for `loglikelihood_rolling`, stop sequences, `max_gen_toks`
and post-processing for `generate_until` (greedy; `do_sample` is refused). The work is lazymerge's
(`evaluate.lm_model.StreamingModel`): all requests of a call through each layer once, only the scored positions
through the head, batched greedy decoding with per-group KV caches within the budget.

lm-eval is an optional dependency (`pip install 'lazymerge[tasks]'`): the class is built on first use.
"""
from __future__ import annotations

from typing import Any

from .errors import LazyMergeError
from .evaluate.lm_model import ModelOptions, StreamingModel
from .units import parse_size

MODEL_NAME = "lazymerge"


def _require() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise LazyMergeError("lm-eval tasks need lm-eval: pip install 'lazymerge[tasks]'") from None


def _size(value: Any) -> int:
    try:
        return parse_size(value)
    except (TypeError, ValueError) as exc:
        raise LazyMergeError(f"lazymerge model: activations: {exc}") from None


def _batch_size(value: Any) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower().startswith("auto")):
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise LazyMergeError(f"lazymerge model: batch_size must be a number or 'auto', got {value!r}") from None
    if n < 1:
        raise LazyMergeError(f"lazymerge model: batch_size must be at least 1, got {n}")
    return n


class _Methods:
    """LazyMergeLM's methods; the class itself adds lm-eval's `TemplateLM` as its base when first used."""

    backend = "causal"
    progress_bars = True                 # lazymerge's bars (per layer, per token); lm-eval's are its own

    def __init__(self, pretrained: Any, memory: Any = None, device: Any = None, seed: int = 0,
                 batch_size: Any = None, max_batch_size: Any = None, max_length: Any = None,
                 add_bos_token: Any = None, prefix_token_id: Any = None, activations: Any = None,
                 spill_dir: Any = None, dtype: Any = None, truncation: Any = False, **unknown: Any) -> None:
        from lm_eval.models.utils import configure_pad_token

        super().__init__()
        if unknown:
            raise LazyMergeError(f"lazymerge model: unknown argument(s) {', '.join(sorted(unknown))}; see "
                                 "help(lazymerge.lm_eval.LazyMergeLM)")
        if dtype not in (None, "auto", "float32", "torch.float32"):
            raise LazyMergeError(f"lazymerge model: dtype {dtype!r}: evaluation computes in float32")
        opts = ModelOptions(memory=memory, device=str(device or "cpu"), seed=int(seed),
                            batch_size=_batch_size(batch_size),
                            activations=_size(activations) if activations is not None
                            else ModelOptions.activations, spill_dir=spill_dir)
        self.model = StreamingModel(pretrained, opts)
        import weakref

        weakref.finalize(self, self.model.close)
        self.pretrained = str(pretrained) if not isinstance(pretrained, dict) else "recipe"
        self.tokenizer = configure_pad_token(self.model.tokenizer, model_config=self.model.config)
        self._max_length = int(max_length) if max_length else None
        self.add_bos_token = _flag(add_bos_token)
        self.custom_prefix_token_id = int(prefix_token_id) if prefix_token_id is not None else None
        self.truncation = bool(_flag(truncation))
        self._device = self.model.stream.device
        self._eos_ids = _eos_ids(self.model)

    # -- lm-eval's model interface (as HFLM) ---------------------------------------------------------------
    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        from lm_eval.models.utils import resolve_max_length

        return self._max_length or resolve_max_length(self.config, self.tokenizer)

    @property
    def max_gen_toks(self) -> int:
        return 256

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        from lm_eval.models.utils import _add_special_kwargs, has_bos_prefix

        special = _add_special_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        encoding = self.tokenizer.encode(string, **special)
        return encoding[-left_truncate_len:] if left_truncate_len else encoding

    def tok_decode(self, tokens: Any, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _progress(self, desc: str, disable: bool) -> Any:
        from tqdm import tqdm

        bar = tqdm(total=1, desc=desc, disable=disable or not self.progress_bars)

        def update(p: Any) -> None:
            if bar.total != p.total:
                bar.reset(total=p.total)
            bar.n = p.done
            bar.set_postfix_str(p.stage, refresh=True)

        update.close = bar.close          # type: ignore[attr-defined]
        return update

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **_: Any) -> list[tuple[float, bool]]:
        bar = self._progress("lazymerge loglikelihood", disable_tqdm)
        try:
            answers = self.model.loglikelihood([(ctx, cont) for _, ctx, cont in requests], self.max_length, bar)
        finally:
            bar.close()
        for (request_str, _, _), answer in zip(requests, answers):
            if request_str is not None:
                self.cache_hook.add_partial("loglikelihood", request_str, answer)
        return answers

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        windows, counts = [], []
        for (string,) in [req.args for req in requests]:
            mine = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            windows += [(None, ctx, cont) for ctx, cont in mine]
            counts.append(len(mine))
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        out, at = [], 0
        for req, n in zip(requests, counts):
            total = sum(s[0] for s in scores[at:at + n])
            at += n
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return out

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import handle_stop_sequences, postprocess_generated_text

        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        prompts, limits, stops = [], [], []
        for context, gen_kwargs in [req.args for req in requests]:
            ids, max_new, until = self._generation_request(context, gen_kwargs, eos, handle_stop_sequences)
            prompts.append(ids)
            limits.append(max_new)
            stops.append(until)
        lookback = [[(u, len(self.tokenizer.encode(u, add_special_tokens=False)) + 2) for u in until]
                    for until in stops]

        def stop(i: int, tokens: list[int]) -> bool:
            # lm-eval's MultiTokenEOSCriteria: the stop string in the last len(its tokens) + 2 generated tokens
            return any(u in self.tokenizer.decode(tokens[-n:]) for u, n in lookback[i])

        bar = self._progress("lazymerge generate_until", disable_tqdm)
        try:
            outs = self.model.generate(prompts, limits, self._eos_ids, stop, bar)
        finally:
            bar.close()
        results = []
        for req, tokens, until in zip(requests, outs, stops):
            text = postprocess_generated_text(self.tok_decode(tokens), until, None)
            results.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return results

    def _generation_request(self, context: str, gen_kwargs: Any, eos: str,
                            handle_stop_sequences: Any) -> tuple[list[int], int, list[str]]:
        """A request's prompt tokens (encoded and left-truncated as HFLM's `tok_batch_encode`), token limit and
        stop strings (lm-eval's `normalize_gen_kwargs`, the EOS string added)."""
        from lm_eval.models.utils import has_bos_prefix, normalize_gen_kwargs

        if not isinstance(gen_kwargs, dict):
            raise LazyMergeError(f"lazymerge model: generation arguments must be a mapping, got {gen_kwargs!r}")
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        if kwargs.get("do_sample"):
            raise LazyMergeError("lazymerge model: generate_until decodes greedily; this task asks for "
                                 "do_sample=True (set do_sample=false or temperature=0 in its generation_kwargs)")
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
        max_new = int(kwargs.pop("max_gen_toks"))
        max_ctx = self.max_length - max_new
        if max_ctx <= 0:
            raise LazyMergeError(f"lazymerge model: max_gen_toks {max_new} is not below the model's context "
                                 f"length {self.max_length}")
        if has_bos_prefix(context, getattr(self.tokenizer, "bos_token", None)):
            special: dict[str, Any] = {"add_special_tokens": False}
        elif self.add_bos_token is not None:
            special = {"add_special_tokens": self.add_bos_token}
        else:
            special = {}
        ids = self.tokenizer(context, truncation=self.truncation, **special)["input_ids"][-max_ctx:]
        if "max_length" in kwargs:
            max_new = int(kwargs.pop("max_length")) - len(ids)
        return ids, max_new, until

    # -- reporting -------------------------------------------------------------------------------------------
    def get_model_info(self) -> dict[str, Any]:
        return {"model_num_parameters": self.model.model_bytes() // 4, "model_dtype": "torch.float32",
                "lazymerge": self.model.report()}

    def close(self) -> None:
        self.model.close()


def _flag(value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise LazyMergeError(f"lazymerge model: expected true or false, got {value!r}")


def _eos_ids(model: StreamingModel) -> set[int]:
    """The token ids `generate` stops at: the generation config's EOS (generation_config.json, else config)."""
    import transformers

    try:
        gen = transformers.GenerationConfig.from_pretrained(str(model.stream.source.config_dir))
    except (OSError, ValueError):
        gen = transformers.GenerationConfig.from_model_config(model.config)
    eos = gen.eos_token_id
    if eos is None:
        eos = model.tokenizer.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])


def _build() -> type:
    _require()
    from lm_eval.api.model import TemplateLM

    cls = type("LazyMergeLM", (_Methods, TemplateLM), {
        "__module__": __name__, "__qualname__": "LazyMergeLM",
        "__doc__": "lm-eval's model `lazymerge`: a checkpoint or a recipe evaluated on lazymerge's layer-streaming "
                   "forward within `memory`. Arguments: pretrained (checkpoint dir or recipe), memory, device, "
                   "seed, batch_size (sequences per forward call; default: by tokens), max_length, "
                   "add_bos_token, prefix_token_id, activations (bytes of hidden states per pass), spill_dir."})
    return cls


def __getattr__(name: str) -> Any:
    if name == "LazyMergeLM":
        cls = globals()["LazyMergeLM"] = _build()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register() -> None:
    """Make `lazymerge` an lm-eval model name (lazily: the class is built when lm-eval first asks for it)."""
    try:
        import lm_eval.models  # noqa: F401  (lm-eval's own names first: it only adds them to an empty registry)
        from lm_eval.api.registry import model_registry
    except ImportError:
        return
    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target="lazymerge.lm_eval:LazyMergeLM")


register()


if __name__ == "__main__":                     # python -m lazymerge.lm_eval: lm-eval's own command line
    _require()
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
