"""The output's tokenizer as GGUF metadata, the way llama.cpp's converter writes it (convert_hf_to_gguf.py's
`set_vocab` of each architecture), from the tokenizer files the merge ships.

Three tokenizer kinds, chosen per architecture in the converter's order: a SentencePiece model (`tokenizer.model`,
read with `sentencepiece`), a llama-style BPE `tokenizer.json` with byte fallback (`gguf.LlamaHfVocab`), and a
byte-level BPE (`gpt2`: tokens and types from transformers' tokenizer; the pre-tokenizer named by the hash of its
encoding of a fixed text, looked up in the converter's own table, `pre_tokenizers.json`). Special ids, `add_bos`,
merges and the chat template come from `gguf.SpecialVocab`, as in the converter.
"""
from __future__ import annotations

import json
import re
from hashlib import sha256
from pathlib import Path
from typing import Any

from lazymerge.errors import OutputError

_TABLE = Path(__file__).with_name("pre_tokenizers.json")
# TokenType (gguf.TokenType / SentencePieceTokenTypes)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def add_vocab(w: Any, arch: str, model_dir: Path, config: dict, warnings: list[str]) -> None:
    """Add the tokenizer keys for llama.cpp architecture `arch` from the files in `model_dir`."""
    import gguf

    if arch == "llama":
        _add_prefix_space(w, model_dir)
        for kind in (_sentencepiece, _llama_hf):
            try:
                kind(w, model_dir, config)
                break
            except (FileNotFoundError, TypeError):
                continue
        else:
            _gpt2(w, model_dir, config, warnings)
        if config.get("vocab_size", 32000) == 49152:       # the converter: granite-small vocabularies add no BOS
            w.add_add_bos_token(False)
    elif arch in ("qwen2", "qwen3"):
        try:
            _sentencepiece(w, model_dir, config)
        except FileNotFoundError:
            _gpt2(w, model_dir, config, warnings)
    elif arch in ("qwen2moe", "qwen3moe"):
        _gpt2(w, model_dir, config, warnings)
    elif arch in ("gemma", "gemma2"):
        _require(model_dir / "tokenizer.model", arch)
        _sentencepiece(w, model_dir, config)
        if arch == "gemma":
            special = gguf.SpecialVocab(model_dir, load_merges=False,
                                        special_token_types=["prefix", "suffix", "middle", "fsep", "eot"])
            for typ, tid in (("prefix", 67), ("suffix", 69), ("middle", 68), ("fsep", 70), ("eot", 107)):
                special._set_special_token(typ, tid)
            special.chat_template = None
            special.add_to_gguf(w, quiet=True)
        w.add_add_space_prefix(False)
    elif arch == "gemma3":
        if (model_dir / "tokenizer.model").is_file():
            _sentencepiece(w, model_dir, config)
            w.add_add_space_prefix(False)
        else:
            _gpt2(w, model_dir, config, warnings)
    elif arch == "phi3":
        cfg = _json(model_dir / "tokenizer_config.json")
        if cfg.get("tokenizer_class") == "GPT2Tokenizer":
            _gpt2(w, model_dir, config, warnings)
        else:
            _require(model_dir / "tokenizer.model", arch)
            _sentencepiece(w, model_dir, config)
    else:
        raise OutputError(f"{arch}: no tokenizer conversion for this architecture")


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def _require(path: Path, arch: str) -> None:
    if not path.is_file():
        raise OutputError(f"{path.name}: a {arch} GGUF takes its tokenizer from tokenizer.model (SentencePiece), "
                          "which the merged model does not have")


def _add_prefix_space(w: Any, model_dir: Path) -> None:
    value = _json(model_dir / "tokenizer_config.json").get("add_prefix_space")
    if value is not None:
        w.add_add_space_prefix(value)


def _special(w: Any, model_dir: Path, **kw: Any) -> None:
    import gguf

    gguf.SpecialVocab(model_dir, **kw).add_to_gguf(w, quiet=True)


def _looks_special(token: str) -> bool:
    """TextModel.does_token_look_special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _sentencepiece(w: Any, model_dir: Path, config: dict) -> None:
    """The converter's `_set_vocab_sentencepiece` (`_create_vocab_sentencepiece`)."""
    path = model_dir / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(path)
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise OutputError(f"{path.name}: writing a SentencePiece tokenizer to GGUF needs sentencepiece: "
                          "pip install sentencepiece") from None
    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(path))
    vocab_size = config.get("vocab_size") or sp.vocab_size()
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [UNUSED] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        tokens[i], scores[i] = sp.IdToPiece(i).encode(), sp.GetScore(i)
        types[i] = (UNKNOWN if sp.IsUnknown(i) else CONTROL if sp.IsControl(i) else UNUSED if sp.IsUnused(i)
                    else BYTE if sp.IsByte(i) else NORMAL)
    for key, tid in _json(model_dir / "added_tokens.json").items():
        if tid < vocab_size:
            tokens[tid], scores[tid], types[tid] = key.encode(), -1000.0, USER_DEFINED
    for tid, data in _json(model_dir / "tokenizer_config.json").get("added_tokens_decoder", {}).items():
        tid, token = int(tid), data["content"]
        if tid >= vocab_size:
            continue
        if data.get("special") or _looks_special(token):
            types[tid] = CONTROL
        else:
            token = token.replace("\u2581", " ")
            types[tid] = USER_DEFINED
        scores[tid], tokens[tid] = -1000.0, token.encode()
    _llama_tokens(w, model_dir, tokens, scores, types)


def _llama_tokens(w: Any, model_dir: Path, tokens: list, scores: list, types: list) -> None:
    """What both llama vocabularies (SentencePiece, llama-style BPE) write, in the converter's order."""
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    _special(w, model_dir, n_vocab=len(tokens))


def _llama_hf(w: Any, model_dir: Path, config: dict) -> None:
    """The converter's `_set_vocab_llama_hf`: gguf's own LlamaHfVocab (raises FileNotFoundError / TypeError when
    tokenizer.json is not a llama-style BPE)."""
    import gguf

    vocab = gguf.LlamaHfVocab(model_dir)
    tokens, scores, types = [], [], []
    for text, score, toktype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(toktype)
    _llama_tokens(w, model_dir, tokens, scores, types)


def _gpt2(w: Any, model_dir: Path, config: dict, warnings: list[str]) -> None:
    """The converter's `_set_vocab_gpt2` (`get_vocab_base`, `get_vocab_base_pre`)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:    # transformers raises many types for files it cannot read
        raise OutputError(f"{model_dir.name}: transformers cannot load the merged tokenizer for the GGUF: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None
    vocab = tok.get_vocab() if not hasattr(tok, "vocab") else tok.vocab
    vocab_size = config.get("vocab_size", len(vocab))
    if max(vocab.values()) >= vocab_size:
        raise OutputError(f"tokenizer: token id {max(vocab.values())} is beyond the model's {vocab_size} rows")
    reverse = {i: t for t, i in vocab.items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if not decoder[i].normalized:
                token = tok.decode(tok.encode(token, add_special_tokens=False))
            if decoder[i].special or _looks_special(token):
                types.append(CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(USER_DEFINED)
        else:
            types.append(NORMAL)
        tokens.append(token)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre(tok, warnings))
    w.add_token_list(tokens)
    w.add_token_types(types)
    _special(w, model_dir, load_merges=True)


def _pre(tok: Any, warnings: list[str]) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer, from the hash of its ids for the converter's text."""
    table = json.loads(_TABLE.read_text(encoding="utf-8"))
    chkhsh = sha256(str(tok.encode(table["chktxt"])).encode()).hexdigest()
    name = table["pre"].get(chkhsh)
    if name is None:
        warnings.append(f"GGUF: the tokenizer's pre-tokenizer (hash {chkhsh[:12]}) is not one llama.cpp's "
                        f"converter ({table['source']}) knows; written as 'default', so llama.cpp may split "
                        "text differently than transformers")
        return "default"
    return name


def is_llama_bpe(model_dir: Path) -> bool:
    """Whether tokenizer.json is a llama-style (byte-fallback) BPE."""
    doc = _json(model_dir / "tokenizer.json")
    model = doc.get("model") or {}
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and \
        re.fullmatch("Sequence", str((doc.get("decoder") or {}).get("type"))) is not None
