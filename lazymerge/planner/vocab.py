"""Vocabulary alignment: embedding and lm_head rows mapped token by token when the models' tokenizers differ.

mergekit's `tokenizer_source: base | union | <model>` and its newer block

```yaml
tokenizer:
  source: union                 # base | union | <model path>   (default: union)
  tokens:                       # optional, per token
    <|im_start|>: {source: ./ft-chat}                           # that model's row for this token
    <|im_end|>:   {source: {kind: model_token, model: ./ft-chat, token: "</s>"}, force: true}
    <pad>:        {source: {kind: zero}}
  pad_to_multiple_of: 64
```

The planner calls `plan_vocab` once, from headers and tokenizer.json files only (plain JSON: `model.vocab` and
`added_tokens`; no `tokenizers` dependency). It returns, per source checkpoint, a *row map*: for each output row,
the source row it comes from, or -1 when the model lacks that token. A -1 row is filled, as mergekit does, with:

1. the `tokens:` entry's source when there is one (a model's row for the token, another token's row, or zeros);
2. else the base model's row when the base has the token;
3. else the mean of the rows of the models that have it (one model: its row; none: zeros, with a warning).

`force: true` makes every model take that default, even the models that have the token. Output rows that belong to
no token (padding up to `pad_to_multiple_of`, or rows the tokenizer source model itself keeps unused) keep the
model's own row when it is also unused there, else the mean of the model's rows (mergekit pads with the mean).

Without any tokenizer setting, models whose vocab-indexed tensors differ in rows are cut to the smallest shared
vocabulary (rows beyond it dropped) with a warning; the lead model's tokenizer is kept, as mergekit does.

Where this differs from mergekit, knowingly: the union lists new tokens in recipe order and, within a model, in id
order (mergekit iterates a set and a hash map); and the output never has fewer rows than the tokenizer source
model (mergekit shrinks e.g. Qwen's 151936 rows to its 151665 tokens).

At run time the `load` op of a vocab-indexed tensor calls `engine.vocab_rows.load_block`, which reads only the
source rows a block needs (in runs of consecutive rows) and assembles the block with the pure `map_rows`. The merge
method then sees aligned rows, as for any other tensor. How the pieces are wired:

- planner: `vp = plan_vocab(...)` once per stage, before the tensor jobs; a tensor in `vp.tensors` has
  `vp.out_vocab` rows in the output and is checked against the other inputs on its trailing dimensions only; a
  checkpoint opened later by a parameter is added with `vp.follow(key, model_key, rows)`; the `load` task of
  source `key`, rows [a, b), gets `vocab=vp.block_attrs(key, tensor, (a, b))` (None for a source that needs no
  mapping); config `vocab_size = vp.out_vocab`; when `vp.files` is not empty it replaces the lead's
  tokenizer files (`non_tokenizer(aux)` keeps the others); `vp.warnings` go to the plan's warnings.
- engine: a `load` task with a `vocab` attribute returns `engine.vocab_rows.load_block(read, model, ...)`,
  `read(key, (a, b))` reading rows of the same tensor from source `key` as float32.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..engine.vocab_rows import Fill, VocabRows, row_runs
from ..errors import CheckpointError, RecipeError
from ..io.models import ModelOpener, hub_ref, source_key
from .keys import check_keys, closest
from .params import layer_index
from .recipe import tokenizer_setting
from .tokenizer import (TOKENIZER_FILES, Vocab, loads, output_files, parse_tokenizer, plain_added,
                        tokenizer_files)

TOKEN_KEYS = ("source", "force")
# Name fragments of tensors whose first dimension is the vocabulary (Llama/Mistral/Qwen, GPT-2, GPT-NeoX, BERT,
# T5, original Llama checkpoints); a candidate must also have as many rows as the model's embedding.
_VOCAB_NAME = re.compile(r"(?:^|\.)(embed_tokens|lm_head|wte|word_embeddings|embed_in|embed_out|tok_embeddings|"
                         r"shared|output|embeddings|embedding|embed)(?:\.|$)")
_EMBED_FIRST = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings", "shared", "embed")


@dataclass
class VocabPlan:
    """How vocab-indexed tensors are laid out in the output, and the tokenizer that goes with them.

    `row_maps[key][r]` is the row of source `key` that output row r takes, or -1; `fill[key][r]` then says how
    that row is made: the mean over its entries `(source key, a, b)` of the mean of rows [a, b) of that source's
    tensor of the same name (an empty tuple means zeros). `tensors` is empty when every source already matches the
    output row for row (only the tokenizer files change).
    """

    out_vocab: int                                   # rows of the output embedding / lm_head
    tensors: set[str]                                # vocab-indexed tensors whose rows are mapped
    row_maps: dict[str, tuple[int, ...]]             # per source key: per output row, the source row or -1
    fallback: str                                    # "base" or "mean": how a -1 token row is filled by default
    files: dict[str, bytes]                          # tokenizer files to write into the output ({}: keep the lead's)
    warnings: list[str] = field(default_factory=list)
    fill: dict[str, dict[int, Fill]] = field(default_factory=dict)
    row_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)   # per tensor: shape[1:]
    source: str | None = None                        # "base", "union", a model key, or None (smallest shared)
    rows: dict[str, int] = field(default_factory=dict)                     # per source key: its vocab rows
    read: list[Path] = field(default_factory=list)   # files read besides the inputs' (a tokenizer_source directory)
    # per output tensor, per source key: that source's tensor for it (a tied model's head is its embedding)
    names: dict[str, dict[str, str]] = field(default_factory=dict)
    _identity: dict[str, bool] = field(default_factory=dict, repr=False, compare=False)

    def identity(self, key: str) -> bool:
        """Whether source `key` needs no mapping: output row r is its row r (rows beyond the output dropped), so a
        plain row-block load of it is exact."""
        if key not in self._identity:
            m = self.row_maps.get(key)
            self._identity[key] = m is None or m == tuple(range(self.out_vocab))
        return self._identity[key]

    def follow(self, key: str, like: str, rows: int) -> None:
        """Map source `key` (`rows` vocab rows; e.g. a model's Fisher matrix, opened by a parameter) as model
        `like` is mapped: the same source rows where it has them, its own mean row elsewhere."""
        if key in self.row_maps or like not in self.row_maps:
            return
        m = tuple(r if 0 <= r < rows else -1 for r in self.row_maps[like])
        self.row_maps[key] = m
        self.rows[key] = rows
        own: Fill = ((key, 0, rows),)
        f = {r: own for r, x in enumerate(m) if x < 0}
        if f:
            self.fill[key] = f
        self._identity.pop(key, None)

    def block_attrs(self, key: str, name: str, rows: tuple[int, int]) -> VocabRows | None:
        """The `vocab` attribute of the `load` task of output rows [a, b) of output tensor `name` from source
        `key`: that block's slice of the row map, its fills, the row shape, and how many source rows it reads.
        None when the source needs no mapping (`identity`): load rows [a, b) as usual. (A 1-d tensor is loaded
        whole, so one with more rows than the output is mapped even then.)"""
        if key not in self.row_maps:
            raise KeyError(f"{key}: not an input of this VocabPlan (a checkpoint opened after plan_vocab needs "
                           "follow())")
        if self.identity(key) and (self.row_shapes[name] or self.rows.get(key, self.out_vocab) == self.out_vocab):
            return None
        a, b = rows
        row_map = self.row_maps[key][a:b]
        fills = self.fill.get(key, {})
        vocab_fill = tuple(fills.get(a + i, ()) for i, r in enumerate(row_map) if r < 0)
        read = sum(e - s for s, e in row_runs(row_map))
        read += sum(e - s for _, s, e in {entry for f in vocab_fill for entry in f})
        own = self.names.get(name, {})
        names = tuple(sorted({(k, own.get(k, name)) for f in vocab_fill for k, _, _ in f}))
        return VocabRows(tuple(row_map), vocab_fill, self.row_shapes[name], read, names)


# -- planning ----------------------------------------------------------------------------------------------


def _safe_key(ref: Any) -> str | None:
    if not isinstance(ref, str) or not ref:
        return None
    try:
        return source_key(ref)
    except (CheckpointError, OSError, ValueError):
        return None


def _is_virtual(ck: Any) -> bool:
    """An earlier stage's output: its tensors are computed in the graph, never read from a file."""
    return getattr(ck, "jobs", None) is not None


def _key_of(ref: Any, sources: Mapping[str, Any], keys: Iterable[str]) -> str | None:
    """The key among `keys` that a recipe's model reference names (a path, or a stage's name)."""
    keys = list(keys)
    k = _safe_key(ref)
    if k in keys:
        return k
    for k in keys:
        if getattr(sources[k], "name", None) == ref and _is_virtual(sources[k]):
            return k
    return None


def _recipe_model_keys(raw: Mapping[str, Any], sources: Mapping[str, Any], src_keys: list[str]) -> list[str]:
    """Keys of the recipe's models (models, slices' sources, base), recipe order, no duplicates."""
    refs: list[Any] = []
    for m in raw.get("models") or []:
        refs.append(m if isinstance(m, str) else (m.get("model") if isinstance(m, Mapping) else None))
    for s in raw.get("slices") or []:
        for src in (s.get("sources") or []) if isinstance(s, Mapping) else []:
            if isinstance(src, Mapping):
                refs.append(src.get("model"))
        if isinstance(s, Mapping):
            refs.append(s.get("base_model"))
    refs.append(raw.get("base_model"))
    keys: list[str] = []
    for r in refs:
        k = _key_of(r, sources, src_keys)
        if k is not None and k not in keys:
            keys.append(k)
    return keys


def _owner(raw: Mapping[str, Any], key: str, sources: Mapping[str, Any], src_keys: list[str]) -> str | None:
    """The model whose per-model parameters name checkpoint `key` (e.g. its Fisher matrix)."""
    for m in raw.get("models") or []:
        if not isinstance(m, Mapping) or not isinstance(m.get("parameters"), Mapping):
            continue
        if any(isinstance(v, str) and _safe_key(v) == key for v in m["parameters"].values()):
            return _key_of(m.get("model"), sources, src_keys)
    return None


def _vocab_tensors(sources: Mapping[str, Any], src_keys: list[str], lead_key: str
                   ) -> tuple[list[str], dict[str, int]]:
    """Vocab-indexed tensors of the lead (names) and each source's vocabulary rows."""
    lead = sources[lead_key].tensors
    cands = [n for n, info in lead.items()
             if layer_index(n) is None and _VOCAB_NAME.search(n) and len(info.shape) >= 1]
    if not cands:
        return [], {}
    emb = next((n for frag in _EMBED_FIRST for n in cands if frag in n and len(lead[n].shape) == 2),
               next((n for n in cands if len(lead[n].shape) == 2), cands[0]))
    rows: dict[str, int] = {}
    for k in src_keys:
        info = sources[k].tensors.get(emb)
        if info is not None and info.shape:
            rows[k] = int(info.shape[0])
    names = [n for n in cands if lead[n].shape[0] == rows[lead_key]]
    for k in src_keys:
        for n in names:
            info = sources[k].tensors.get(n)
            if info is None or k not in rows:
                continue
            if int(info.shape[0]) != rows[k]:
                raise CheckpointError(f"{sources[k].path}: tensor '{n}' has {info.shape[0]} rows but its "
                                      f"'{emb}' has {rows[k]}; cannot tell its vocabulary size")
            if tuple(info.shape[1:]) != tuple(lead[n].shape[1:]):
                raise CheckpointError(f"{sources[k].path}: tensor '{n}' has shape {list(info.shape)}, but "
                                      f"{sources[lead_key].path} has {list(lead[n].shape)}")
    return names, rows


@dataclass(frozen=True)
class _TokenRule:
    kind: str                 # "default", "model", "model_token", "zero"
    key: str | None = None
    row: int | None = None
    force: bool = False


def _parse_tokens(tokens: Mapping[str, Any], where: str, model_keys: list[str], vocabs: dict[str, Vocab],
                  sources: Mapping[str, Any]) -> dict[str, _TokenRule]:
    rules: dict[str, _TokenRule] = {}
    for tok, spec in tokens.items():
        tok = str(tok)
        at = f"{where}: tokenizer.tokens.{tok}"
        spec = {} if spec is None else spec
        if not isinstance(spec, Mapping):
            raise RecipeError(f"{at}: must be a mapping with keys {', '.join(TOKEN_KEYS)}")
        check_keys(at, spec, TOKEN_KEYS)
        force = spec.get("force", False)
        if not isinstance(force, bool):
            raise RecipeError(f"{at}.force: must be true or false, not {force!r}")
        src = spec.get("source")

        def model_of(ref: Any, key_where: str) -> str:
            k = _key_of(ref, sources, model_keys)
            if k is None:
                raise RecipeError(f"{key_where}: model {ref!r} is not one of the merged models")
            return k

        if src is None:
            rules[tok] = _TokenRule("default", force=force)
        elif isinstance(src, str):
            k = model_of(src, f"{at}.source")
            row = vocabs[k].tokens.get(tok)
            if row is None:
                raise RecipeError(f"{at}.source: {tok!r} is not in the vocabulary of {sources[k].path}")
            rules[tok] = _TokenRule("model", k, row, force=force)
        elif isinstance(src, Mapping):
            kind = src.get("kind")
            if kind == "zero":
                check_keys(f"{at}.source", src, ("kind",))
                rules[tok] = _TokenRule("zero", force=force)
            elif kind == "model_token":
                check_keys(f"{at}.source", src, ("kind", "model", "token", "token_id"))
                k = model_of(src.get("model"), f"{at}.source.model")
                has_tok, has_id = src.get("token") is not None, src.get("token_id") is not None
                if has_tok == has_id:
                    raise RecipeError(f"{at}.source: give exactly one of 'token' or 'token_id'")
                if has_tok:
                    row = vocabs[k].tokens.get(str(src["token"]))
                    if row is None:
                        raise RecipeError(f"{at}.source.token: {src['token']!r} is not in the vocabulary of "
                                          f"{sources[k].path}")
                else:
                    row = src["token_id"]
                    if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < vocabs[k].rows:
                        raise RecipeError(f"{at}.source.token_id: {row!r} is not a row of {sources[k].path} "
                                          f"(0..{vocabs[k].rows - 1})")
                rules[tok] = _TokenRule("model_token", k, row, force=force)
            else:
                raise RecipeError(f"{at}.source.kind: must be 'model_token' or 'zero', not {kind!r}"
                                  f"{closest(str(kind), ('model_token', 'zero'))}")
        else:
            raise RecipeError(f"{at}.source: must be a model path or a mapping with 'kind', not {src!r}")
    return rules


def _tokenizer_dir(ref: str, opener: ModelOpener | None, at: str) -> Path:
    """The directory holding the tokenizer `tokenizer_source` names: a local directory, or (a hub id, pinned by
    the compile's opener like the inputs) its tokenizer files and config.json in the Hugging Face cache."""
    d = Path(ref).expanduser()
    hub = hub_ref(ref) if opener is not None else None
    if hub is None:
        return d
    repo = opener.repo(hub, at)
    repo.ensure([n for n in (*TOKENIZER_FILES, "config.json") if repo.has(n)])
    return repo.snapshot


def _out_tokenizer(src: str, src_at: str, where: str, lead_key: str, vocabs: dict[str, Vocab],
                   sources: Mapping[str, Any], model_keys: list[str],
                   opener: ModelOpener | None = None) -> tuple[str, Vocab]:
    """(key, vocabulary) of the tokenizer the output starts from: the lead's for base/union, else a model's."""
    if src in ("base", "union"):
        return lead_key, vocabs[lead_key]
    ref = src[len("model:"):] if src.startswith("model:") else src
    k = _key_of(ref, sources, model_keys)
    if k is not None:
        if vocabs[k].assumed:
            raise RecipeError(f"{where}: {src_at}: {sources[k].path} has no tokenizer.json")
        return k, vocabs[k]
    d = _tokenizer_dir(ref, opener, f"{where}: {src_at}")
    if not d.is_dir():
        raise RecipeError(f"{where}: {src_at}: '{src}' is not 'base', 'union', a model directory or a hub id"
                          f"{closest(src, ('base', 'union'))}")
    files = {n: (d / n).read_bytes() for n in TOKENIZER_FILES if (d / n).is_file()}
    if "tokenizer.json" not in files:
        raise RecipeError(f"{where}: {src_at}: {d / 'tokenizer.json'} does not exist")
    cfg = loads((d / "config.json").read_bytes(), str(d / "config.json")) if (d / "config.json").is_file() else {}
    size = cfg.get("vocab_size") if isinstance(cfg, dict) else None
    return str(d.resolve()), parse_tokenizer(files, str(d / "tokenizer.json"),
                                              size if isinstance(size, int) and not isinstance(size, bool) else None)


def plan_vocab(recipe_raw: Mapping[str, Any], recipe_source: str, sources: Mapping[str, Any], src_keys: list[str],
               base_key: str | None, lead_key: str, model_keys: list[str] | None = None,
               opener: ModelOpener | None = None) -> VocabPlan | None:
    """Plan the vocabulary of the output. None when nothing needs doing: no tokenizer setting and every source's
    vocab-indexed tensors have the same rows (the lead's tokenizer files are copied as before).

    `sources` are the opened inputs (headers; an earlier stage's output may be one), `src_keys` every input of the
    tensor jobs (models, base, checkpoints named by parameters), `lead_key` the input whose tensors and config the
    output follows. `model_keys` are the inputs that are models (default: read from the recipe); the others
    (e.g. Fisher matrices) follow the vocabulary of the model that names them. `opener` (the compile's) resolves
    a `tokenizer_source` that is a hub id and none of the inputs; without it, only directories are looked up.
    """
    where = recipe_source
    setting = tokenizer_setting(recipe_raw, where)
    src, token_specs, pad, src_at = setting.source, setting.tokens, setting.pad_to_multiple_of, setting.key
    names, rows = _vocab_tensors(sources, src_keys, lead_key)
    if not names:
        if src is not None:
            raise RecipeError(f"{where}: {src_at}: the models have no embedding / lm_head tensor to align")
        return None
    missing = [k for k in src_keys if k not in rows]
    if missing:       # the planner reports a missing tensor with its own message; nothing to align here
        return None
    lead_info = sources[lead_key].tensors
    row_shapes = {n: tuple(int(d) for d in lead_info[n].shape[1:]) for n in names}
    fallback = "base" if base_key is not None else "mean"

    if src is None:
        if len({rows[k] for k in src_keys}) <= 1:
            return None
        out = min(rows[k] for k in src_keys)
        sizes = ", ".join(f"{sources[k].path}: {rows[k]}" for k in src_keys)
        warn = (f"vocabulary sizes differ ({sizes}); {', '.join(names)} cut to the smallest shared vocabulary, "
                f"{out} rows (rows beyond it dropped); set tokenizer_source: union or base to align tokens instead")
        return VocabPlan(out, set(names), {k: tuple(range(out)) for k in src_keys}, fallback, {}, [warn],
                         row_shapes=row_shapes, source=None, rows=dict(rows))

    if model_keys is None:
        model_keys = _recipe_model_keys(recipe_raw, sources, src_keys)
    model_keys = [lead_key] + [k for k in model_keys if k != lead_key and k in src_keys]
    warnings: list[str] = []
    vocabs = _model_vocabs(model_keys, sources, rows, lead_key, f"{where}: {src_at}", warnings)
    out_key, out_v = _out_tokenizer(src, src_at, where, lead_key, vocabs, sources, model_keys, opener)
    rules = _parse_tokens(token_specs, where, model_keys, vocabs, sources)
    tokens, new = _output_tokens(src, out_v, model_keys, vocabs, rules, warnings)
    out_vocab = max(max(tokens.values(), default=-1) + 1, out_v.rows)   # never fewer rows than the source model
    if pad and out_vocab % pad:
        out_vocab += pad - out_vocab % pad
    row_maps, fill = _row_maps(out_vocab, tokens, rules, model_keys, vocabs, rows, base_key, warnings)
    vp = VocabPlan(out_vocab=out_vocab, tensors=set(names), row_maps=row_maps, fallback=fallback, files={},
                   warnings=warnings, fill=fill, row_shapes=row_shapes,
                   source=src if src in ("base", "union") else out_key, rows=dict(rows))
    if out_key not in sources:      # a tokenizer_source directory that is none of the inputs
        d = Path(out_key)
        vp.read = sorted(p for p in (d / n for n in (*TOKENIZER_FILES, "config.json")) if p.is_file())
    for k in src_keys:      # inputs that are not models (a Fisher matrix): as the model that names them
        if k not in vocabs:
            owner = _owner(recipe_raw, k, sources, src_keys)
            vp.follow(k, owner if owner in vocabs else lead_key, rows[k])

    needs = any(not vp.identity(k) or rows[k] != out_vocab for k in src_keys)
    if needs:
        referenced = {e[0] for fk in vp.fill.values() for fl in fk.values() for e in fl}
        for k in src_keys:
            if _is_virtual(sources[k]) and (not vp.identity(k) or k in referenced):
                raise RecipeError(f"{where}: {src_at}: the vocabulary of stage '{getattr(sources[k], 'name', k)}' "
                                  "differs from the output's; align vocabularies inside that stage instead")
    else:
        vp.tensors, vp.row_maps, vp.fill = set(), {}, {}
    vp.files = output_files(out_v, new)
    return vp


def _model_vocabs(model_keys: list[str], sources: Mapping[str, Any], rows: dict[str, int], lead_key: str,
                  at: str, warnings: list[str]) -> dict[str, Vocab]:
    """Every model's vocabulary from its tokenizer.json; a model without one is assumed to have the lead's."""
    vocabs: dict[str, Vocab] = {}
    for k in model_keys:
        files = tokenizer_files(sources[k])
        label = f"{sources[k].path}/tokenizer.json"
        if "tokenizer.json" in files:
            vocabs[k] = parse_tokenizer(files, label, rows[k])
        elif k == lead_key:
            raise RecipeError(f"{at}: {label} does not exist; aligning vocabularies needs a "
                              "tokenizer.json (sentencepiece-only tokenizers are not supported)")
        else:         # mergekit: "Unable to load tokenizer ... Assuming same as the base"
            lv = vocabs[lead_key]
            vocabs[k] = Vocab({t: i for t, i in lv.tokens.items() if i < rows[k]}, {}, rows[k], None, label,
                               assumed=True)
            warnings.append(f"{label} does not exist; assuming {sources[k].path} has the vocabulary of "
                            f"{sources[lead_key].path}")
        if vocabs[k].dropped:
            warnings.append(f"{label}: {vocabs[k].dropped} token(s) have ids >= the model's {rows[k]} embedding "
                            "rows; ignored")
    return vocabs


def _output_tokens(src: str, out_v: Vocab, model_keys: list[str], vocabs: dict[str, Vocab],
                   rules: dict[str, _TokenRule], warnings: list[str]
                   ) -> tuple[dict[str, int], list[tuple[str, int, dict]]]:
    """The output vocabulary (token -> id) and its new tokens (content, id, added_tokens settings): the source
    tokenizer's, then (union) the other models' regular tokens, then their added tokens, then `tokens:`."""
    tokens: dict[str, int] = dict(out_v.tokens)
    new: list[tuple[str, int, dict]] = []
    next_id = max(tokens.values(), default=-1) + 1

    def append(content: str, entry: dict) -> None:
        nonlocal next_id
        tokens[content] = next_id
        new.append((content, next_id, entry))
        next_id += 1

    if src == "union":
        for k in model_keys[1:]:               # regular tokens first (recipe order, id order) ...
            v = vocabs[k]
            for t in v.tokens:
                if t not in tokens and t not in v.added:
                    append(t, plain_added(t))
        seen: dict[str, dict] = {}
        for k in model_keys:                   # ... then added tokens, keeping the first settings
            for c, e in vocabs[k].added.items():
                settings = {x: y for x, y in e.items() if x not in ("id", "content")}
                if c in seen:
                    if settings != seen[c]:
                        warnings.append(f"token {c!r} is added with different settings by several models; "
                                        "using the first")
                    continue
                seen[c] = settings
                if c not in tokens:
                    append(c, settings)
    for t in rules:
        if t not in tokens:
            append(t, plain_added(t))
    return tokens, new


def _row_maps(out_vocab: int, tokens: dict[str, int], rules: dict[str, _TokenRule], model_keys: list[str],
              vocabs: dict[str, Vocab], rows: dict[str, int], base_key: str | None, warnings: list[str]
              ) -> tuple[dict[str, tuple[int, ...]], dict[str, dict[int, Fill]]]:
    """Per model, the source row of every output row (-1: filled), and the fills: a row of no token takes the
    model's own unused row or its mean row; a token the model lacks (or a forced one) its `tokens:` rule, else the
    base's row, else the mean of the rows of the models that have it."""
    by_id: dict[int, str] = {}
    for t, i in tokens.items():
        by_id.setdefault(i, t)
    defaults: dict[str, Fill] = {}

    def default_fill(t: str) -> Fill:
        rule = rules.get(t)
        if rule is not None and rule.kind == "zero":
            return ()
        if rule is not None and rule.kind in ("model", "model_token"):
            return ((rule.key, rule.row, rule.row + 1),)
        having = [k for k in model_keys if t in vocabs[k].tokens]
        if not having:
            warnings.append(f"token {t!r} is in no model; its rows are zeros")
            return ()
        if len(having) > 1 and base_key in having:
            having = [base_key]
        return tuple((k, vocabs[k].tokens[t], vocabs[k].tokens[t] + 1) for k in having)

    row_maps: dict[str, tuple[int, ...]] = {}
    fill: dict[str, dict[int, Fill]] = {}
    for k in model_keys:
        own = vocabs[k]
        own_ids = own.ids
        m: list[int] = []
        f: dict[int, Fill] = {}
        mean_own: Fill = ((k, 0, rows[k]),)
        for r in range(out_vocab):
            t = by_id.get(r)
            if t is None:                       # a row of no token: own unused row, else the model's mean row
                if r < own.rows and r not in own_ids:
                    m.append(r)
                else:
                    m.append(-1)
                    f[r] = mean_own
                continue
            rule = rules.get(t)
            i = own.tokens.get(t)
            if i is not None and not (rule is not None and rule.force):
                m.append(i)
                continue
            m.append(-1)
            if t not in defaults:
                defaults[t] = default_fill(t)
            f[r] = defaults[t]
        row_maps[k] = tuple(m)
        if f:
            fill[k] = f
    return row_maps, fill


def non_tokenizer(paths: Iterable[Path]) -> list[Path]:
    """Aux files that are not tokenizer files (what to keep from the lead when a VocabPlan writes its own)."""
    return [p for p in paths if Path(p).name not in TOKENIZER_FILES]


__all__ = ["VocabPlan", "plan_vocab", "non_tokenizer", "source_key", "tokenizer_files", "TOKENIZER_FILES"]
