"""tokenizer.json as plain JSON: a model's vocabulary (`model.vocab` + `added_tokens`), and the files of a merged
tokenizer. No `tokenizers` dependency: the planner reads and writes the JSON itself (planner/vocab.py uses it).
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

# Files that make up a tokenizer: when a VocabPlan writes its own (`files`), the lead model's copies of these are
# not copied as aux files.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
)


@dataclass
class Vocab:
    """A model's vocabulary as its tokenizer.json defines it, restricted to ids below its embedding rows."""

    tokens: dict[str, int]                 # token -> id (model vocab, then added tokens), id order
    added: dict[str, dict]                 # content -> its added_tokens entry
    rows: int
    doc: dict | None                       # the parsed tokenizer.json (None: assumed, see `assumed`)
    label: str                             # where it came from, for messages
    files: dict[str, bytes] = field(default_factory=dict)   # the tokenizer's files, as stored
    dropped: int = 0                       # tokens with id >= rows, ignored
    assumed: bool = False

    @property
    def ids(self) -> set[int]:
        return set(self.tokens.values())


def loads(data: bytes, label: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{label}: not valid JSON ({exc})") from None


def tokenizer_files(ck: Any) -> dict[str, bytes]:
    """The tokenizer files of an input: its aux files that are tokenizer files, overridden by `vocab_files` (bytes
    a source may carry instead, e.g. an earlier stage whose tokenizer was merged)."""
    files = {Path(p).name: Path(p).read_bytes() for p in ck.aux_files() if Path(p).name in TOKENIZER_FILES}
    files.update(getattr(ck, "vocab_files", None) or {})
    return files


def parse_tokenizer(files: dict[str, bytes], label: str, rows: int | None) -> Vocab:
    doc = loads(files["tokenizer.json"], label)
    model = doc.get("model") if isinstance(doc, dict) else None
    vocab = model.get("vocab") if isinstance(model, dict) else None
    pairs: list[tuple[str, int]] = []
    if isinstance(vocab, dict):
        for tok, i in vocab.items():
            if not isinstance(i, int) or isinstance(i, bool) or i < 0:
                raise CheckpointError(f"{label}: model.vocab[{tok!r}] is not a non-negative integer id")
            pairs.append((str(tok), i))
    elif isinstance(vocab, list):           # Unigram: [[piece, score], ...], id = position
        for i, item in enumerate(vocab):
            if not isinstance(item, (list, tuple)) or not item or not isinstance(item[0], str):
                raise CheckpointError(f"{label}: model.vocab[{i}] is not a [piece, score] pair")
            pairs.append((item[0], i))
    else:
        kind = model.get("type") if isinstance(model, dict) else None
        raise CheckpointError(f"{label}: no model.vocab (model type {kind!r}); cannot align vocabularies")
    added: dict[str, dict] = {}
    for j, entry in enumerate(doc.get("added_tokens") or []):
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str) \
                or isinstance(entry.get("id"), bool) or not isinstance(entry.get("id"), int) or entry["id"] < 0:
            raise CheckpointError(f"{label}: added_tokens[{j}] needs a string 'content' and an integer 'id'")
        pairs.append((entry["content"], entry["id"]))
        added.setdefault(entry["content"], entry)
    tokens: dict[str, int] = {}
    for tok, i in pairs:
        tokens[tok] = i                      # an added token overrides the model's id, as tokenizers does
    limit = rows if rows is not None else max(tokens.values(), default=-1) + 1
    kept = {t: i for t, i in sorted(tokens.items(), key=lambda kv: (kv[1], kv[0])) if i < limit}
    return Vocab(kept, {c: e for c, e in added.items() if c in kept}, limit, doc, label, files,
                  dropped=len(tokens) - len(kept))


def _strip(doc: dict, rows: int) -> dict:
    """tokenizer.json without the tokens whose ids are beyond the model's rows (and BPE merges that use them)."""
    doc = copy.deepcopy(doc)
    model = doc["model"]
    gone: set[str] = set()
    if isinstance(model.get("vocab"), dict):
        gone = {t for t, i in model["vocab"].items() if i >= rows}
        model["vocab"] = {t: i for t, i in model["vocab"].items() if i < rows}
    elif isinstance(model.get("vocab"), list):
        model["vocab"] = model["vocab"][:rows]
    doc["added_tokens"] = [e for e in doc.get("added_tokens") or [] if e["id"] < rows]
    if gone and isinstance(model.get("merges"), list):
        def keep(m: Any) -> bool:
            parts = m.split(" ") if isinstance(m, str) else list(m)
            return not any(p in gone for p in parts) and "".join(parts) not in gone
        model["merges"] = [m for m in model["merges"] if keep(m)]
    return doc


def _dumps(data: Any) -> bytes:
    return (json.dumps(data, ensure_ascii=False, indent=2) + "\n").encode("utf-8")


def output_files(v: Vocab, new: list[tuple[str, int, dict]]) -> dict[str, bytes]:
    """The tokenizer files of `v` with `new` tokens (content, id, settings) appended as added tokens, in
    tokenizer.json, tokenizer_config.json's added_tokens_decoder and added_tokens.json; tokens beyond the model's
    rows removed. Unchanged files are returned byte for byte."""
    files = dict(v.files)
    if not new and not v.dropped:
        return files
    out = _strip(v.doc, v.rows) if v.dropped else copy.deepcopy(v.doc)
    out.setdefault("added_tokens", [])
    for content, i, entry in new:
        out["added_tokens"].append({"id": i, "content": content, **{k: x for k, x in entry.items()
                                                                  if k not in ("id", "content")}})
    files["tokenizer.json"] = _dumps(out)
    if "tokenizer_config.json" in files:
        cfg = loads(files["tokenizer_config.json"], f"{v.label} (tokenizer_config.json)")
        dec = cfg.get("added_tokens_decoder") if isinstance(cfg, dict) else None
        if isinstance(dec, dict):
            dec = {k: x for k, x in dec.items() if not (k.isdigit() and int(k) >= v.rows)}
            for content, i, entry in new:
                dec[str(i)] = {"content": content, "lstrip": entry.get("lstrip", False),
                               "normalized": entry.get("normalized", True), "rstrip": entry.get("rstrip", False),
                               "single_word": entry.get("single_word", False), "special": entry.get("special", False)}
            cfg["added_tokens_decoder"] = dec
            files["tokenizer_config.json"] = _dumps(cfg)
    if "added_tokens.json" in files:
        at = loads(files["added_tokens.json"], f"{v.label} (added_tokens.json)")
        if isinstance(at, dict):
            at = {k: x for k, x in at.items() if not (isinstance(x, int) and x >= v.rows)}
            at.update({content: i for content, i, _ in new})
            files["added_tokens.json"] = _dumps(at)
    return files


def plain_added(content: str) -> dict:
    """What `tokenizer.add_tokens("...")` records: a normal (non-special) added token."""
    return {"content": content, "single_word": False, "lstrip": False, "rstrip": False, "normalized": True,
            "special": False}
