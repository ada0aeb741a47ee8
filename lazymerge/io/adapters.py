"""PEFT LoRA adapters, and a base checkpoint seen through one.

An adapter never becomes a merged copy of its base: `AdaptedCheckpoint.read` computes `W[a:b] + scale * (B @ A)`
for the requested rows only, so an adapted model is as lazy as a plain one. Which modules an adapter touches, and
with which rank and alpha, follows PEFT's own matching rules (`check_target_module_exists`, `get_pattern_key`)
so that lazymerge merges exactly what `PeftModel.merge_and_unload` would.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from lazymerge.errors import CheckpointError
from lazymerge.io.checkpoint import Checkpoint, load_pickle
from lazymerge.io.gguf import GGUFCheckpoint, is_gguf_model
from lazymerge.io.paths import user_path
from lazymerge.io.shards import TensorInfo, read_header

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
# PEFT's "all-linear" shorthand targets every Linear except the output layer; from headers alone the output layer
# is recognised by name.
ALL_LINEAR = "all-linear"
OUTPUT_LAYERS = ("lm_head", "embed_out")
# Config switches whose merge is not `W + scale * B @ A`; refusing them beats merging something else silently.
UNSUPPORTED = ("use_dora", "lora_bias", "target_parameters", "layer_replication", "trainable_token_indices")

# PEFT saves factors without the adapter's name (`x.lora_A.weight`); a raw state dict has it (`x.lora_A.default.weight`)
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight$")
_EMBED_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_embedding_A|lora_embedding_B)(?:\.(?P<adapter>[^.]+))?$")
# A full tensor saved next to the factors: `modules_to_save` (`x.modules_to_save.default.weight`, or plain
# `x.weight` as PEFT saves it now) or a targeted embedding's own weight (`x.base_layer.weight`), which PEFT loads
# into the base layer underneath the LoRA.
_SAVED_KEY = re.compile(r"\.(?:modules_to_save(?:\.[^.]+)?|base_layer)(?=\.[^.]+$)")
_PEFT_ONLY = re.compile(r"\.(lora_[A-Za-z_]+|original_module|token_adapter)(\.|$)")


@dataclass(frozen=True)
class LoraModule:
    """One adapted weight W: `W + scale * B @ A`, transposed when `fan_in_fan_out` (W stored [in, out], as for
    GPT-2's Conv1D and for embeddings, whose PEFT factors are A [r, num_embeddings], B [dim, r])."""

    a: TensorInfo
    b: TensorInfo
    scale: float
    fan_in_fan_out: bool
    rank: int

    @property
    def weight_shape(self) -> tuple[int, int]:
        """The shape W must have for this module to apply to it."""
        out_f, in_f = self.b.shape[0], self.a.shape[1]
        return (in_f, out_f) if self.fan_in_fan_out else (out_f, in_f)


def parse_model_ref(ref: str | Path) -> tuple[Path, Path | None]:
    """Split mergekit's `base+adapter` model syntax. A path that exists as written is never split, so a
    directory whose name contains '+' still works."""
    text = str(ref)
    if "+" not in text or user_path(text).exists():
        return user_path(text), None
    base, _, adapter = text.rpartition("+")
    if not base or not adapter:
        raise CheckpointError(f"model reference {text!r}: expected 'base_dir+adapter_dir'")
    return user_path(base), user_path(adapter)


def is_adapter_dir(path: Path) -> bool:
    """A PEFT adapter is recognised by its config, as PEFT itself does; its weights may still be missing."""
    return (Path(path) / CONFIG_NAME).is_file()


def module_summary(modules: list[str]) -> str:
    """Module names, those that differ only in their layer index collapsed (`model.layers.{0..31}.mlp.up_proj`),
    so that a warning naming 200 modules stays one readable line."""
    groups: dict[tuple[str, str], list[int]] = {}
    single: list[str] = []
    for m in modules:
        hit = re.match(r"^(.*?\.)(\d+)(\..*)$", m)
        if hit:
            groups.setdefault((hit[1], hit[3]), []).append(int(hit[2]))
        else:
            single.append(m)
    parts = list(single)
    for (head, tail), idx in groups.items():
        idx = sorted(set(idx))
        if len(idx) == 1:
            parts.append(f"{head}{idx[0]}{tail}")
        elif idx == list(range(idx[0], idx[-1] + 1)):
            parts.append(f"{head}{{{idx[0]}..{idx[-1]}}}{tail}")
        else:
            parts.append(f"{head}{{{','.join(map(str, idx))}}}{tail}")
    return ", ".join(sorted(parts))


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """PEFT's get_pattern_key: the first pattern that matches a dotted suffix of the module name wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _layer_index_ok(cfg: dict, module: str) -> bool:
    """PEFT's layers_to_transform / layers_pattern filter (applied only to list-valued target_modules)."""
    indexes = cfg.get("layers_to_transform")
    if indexes is None or (isinstance(indexes, list) and not indexes):
        return True
    patterns = cfg.get("layers_pattern")
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        match = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module)
            if match:
                break
    if not match:
        return False
    idx = int(match.group("idx"))
    return idx == indexes if isinstance(indexes, int) else idx in indexes


def _is_targeted(cfg: dict, module: str) -> bool:
    """Whether PEFT would put a LoRA layer on `module` (check_target_module_exists); keys for other modules are
    ignored on load, so they must not be merged either."""
    exclude = cfg.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, module):
                return False
        elif module in exclude or any(module.endswith(f".{e}") for e in exclude):
            return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in cfg.get("modules_to_save") or ()):
        return False
    target = cfg.get("target_modules")
    if target is None:
        return True
    if isinstance(target, str):
        if target == ALL_LINEAR:
            return module.rsplit(".", 1)[-1] not in OUTPUT_LAYERS
        return re.fullmatch(target, module) is not None
    found = module in target or any(module.endswith(f".{t}") for t in target)
    return found and _layer_index_ok(cfg, module)


def read_adapter_config(path: Path) -> dict:
    file = path / CONFIG_NAME
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{file}: not a JSON object")
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise CheckpointError(f"{file}: peft_type {peft_type!r} is not supported (only LORA)")
    for key in UNSUPPORTED:
        if cfg.get(key):
            raise CheckpointError(f"{file}: {key}={cfg[key]!r} is not supported (plain LoRA merges only)")
    for key in ("r", "lora_alpha"):
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise CheckpointError(f"{file}: {key} must be a positive number, got {value!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        cfg[key] = cfg.get(key) or {}
        if not isinstance(cfg[key], dict):
            raise CheckpointError(f"{file}: {key} must be an object mapping module patterns to numbers")
    target = cfg.get("target_modules")
    if not (target is None or isinstance(target, str) or
            (isinstance(target, list) and all(isinstance(t, str) for t in target))):
        raise CheckpointError(f"{file}: target_modules must be a list of names or a regex string")
    saved = cfg.get("modules_to_save")
    if not (saved is None or (isinstance(saved, list) and all(isinstance(m, str) for m in saved))):
        raise CheckpointError(f"{file}: modules_to_save must be a list of module names")
    return cfg


def _open_weights(path: Path, allow_pickle: bool) -> Checkpoint:
    """The adapter's tensors as a table readable like any checkpoint (safetensors, or an opted-in pickle)."""
    file = path / WEIGHTS_NAME
    if file.is_file():
        return Checkpoint(path, read_header(file)[0], None)
    file = path / PICKLE_NAME
    if not file.is_file():
        raise CheckpointError(f"{path}: adapter has no {WEIGHTS_NAME}")
    if not allow_pickle:
        raise CheckpointError(f"{file}: pickled adapter weights are refused by default; pass --allow-pickle to "
                              "load them with torch.load(weights_only=True)")
    state, tensors = load_pickle(file, allow_empty=True)
    return Checkpoint(path, tensors, None, {file: state})


class Adapter:
    """A PEFT LoRA adapter directory, mapped onto the names of its base model's tensors.

    `lora` maps a base tensor name (`model.layers.0.self_attn.q_proj.weight`) to its factors and scale;
    `replaced` maps a base tensor name to a full tensor that replaces it (`modules_to_save`, or a targeted
    embedding's saved weight, which its LoRA delta is then added to);
    `ignored` lists file keys PEFT would not load (modules outside `target_modules`); `warnings` says so, in one
    line naming their modules.
    """

    def __init__(self, path: Path, config: dict, weights: Checkpoint, weights_file: Path | None = None) -> None:
        self.path = path
        self.config = config
        self._weights = weights
        self.weights_file = weights_file or path / (WEIGHTS_NAME if (path / WEIGHTS_NAME).is_file() else PICKLE_NAME)
        self.lora: dict[str, LoraModule] = {}
        self.replaced: dict[str, TensorInfo] = {}
        self.ignored: list[str] = []
        self.warnings: list[str] = []     # what a merge through it should say (ignored factors)
        self._map_keys()

    @classmethod
    def open(cls, path: Path | str, *, allow_pickle: bool = False) -> "Adapter":
        root = user_path(path)
        if not root.is_dir():
            raise CheckpointError(f"{root}: adapter directory does not exist")
        if not is_adapter_dir(root):
            raise CheckpointError(f"{root}: not a PEFT adapter (no {CONFIG_NAME})")
        return cls(root, read_adapter_config(root), _open_weights(root, allow_pickle))

    @property
    def base_model_path(self) -> Path | None:
        """The base recorded by PEFT, when it is a local directory (hub ids cannot be resolved offline)."""
        name = self.config.get("base_model_name_or_path")
        if not isinstance(name, str) or not name:
            return None
        for candidate in (user_path(name), self.path / name):   # as written (client's cwd), then beside the adapter
            if candidate.is_dir() or is_gguf_model(candidate):
                return candidate
        return None

    def _map_keys(self) -> None:
        factors: dict[str, dict[str, TensorInfo]] = {}
        adapters: set[str | None] = set()
        for key, info in self._weights.tensors.items():
            name = key.removeprefix(PEFT_PREFIX)
            match = _LORA_KEY.match(name) or _EMBED_KEY.match(name)
            if match:
                adapters.add(match["adapter"])
                factors.setdefault(match["module"], {})[match["kind"]] = info
            elif _PEFT_ONLY.search(name):
                raise CheckpointError(f"{self.weights_file}: tensor {key!r} is not a plain LoRA factor "
                                      "(DoRA, LoRA bias or trainable tokens are not supported)")
            else:
                target = _SAVED_KEY.sub("", name)
                if target in self.replaced:
                    raise CheckpointError(f"{self.weights_file}: tensors {self.replaced[target].name!r} and "
                                          f"{key!r} both replace {target!r}")
                self.replaced[target] = info
        if len(adapters) > 1:         # one adapter's A must never meet another's B
            names = ", ".join(sorted(a or "(unnamed)" for a in adapters))
            raise CheckpointError(f"{self.weights_file}: holds the LoRA factors of several adapters ({names}); "
                                  "merge one adapter per directory, as PEFT's save_pretrained writes them")
        ignored: list[str] = []
        for module, parts in factors.items():
            embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
            a = parts.get("lora_embedding_A" if embedding else "lora_A")
            b = parts.get("lora_embedding_B" if embedding else "lora_B")
            if a is None or b is None or len(parts) != 2:
                raise CheckpointError(f"{self.weights_file}: module {module!r} needs exactly one A and one B "
                                      f"factor, found {sorted(parts)}")
            if not _is_targeted(self.config, module):
                self.ignored.extend(sorted(i.name for i in parts.values()))
                ignored.append(module)
                continue
            self.lora[f"{module}.weight"] = self._module(module, a, b, embedding)
        if ignored:
            self.warnings.append(f"{self.weights_file}: LoRA factors of {len(ignored)} module(s) outside "
                                 f"{CONFIG_NAME}'s target_modules ignored, as PEFT ignores them: "
                                 f"{module_summary(ignored)}")

    def _module(self, module: str, a: TensorInfo, b: TensorInfo, embedding: bool) -> LoraModule:
        rank = _pattern_value(self.config["rank_pattern"], module, self.config["r"])
        alpha = _pattern_value(self.config["alpha_pattern"], module, self.config["lora_alpha"])
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise CheckpointError(f"{self.weights_file}: module {module!r} has A {list(a.shape)} and B "
                                  f"{list(b.shape)}, not A [{rank}, in] and B [out, {rank}] (r from {CONFIG_NAME})")
        scale = alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank
        fan_in_fan_out = embedding or bool(self.config.get("fan_in_fan_out"))
        return LoraModule(a=a, b=b, scale=scale, fan_in_fan_out=fan_in_fan_out, rank=int(rank))

    def read(self, info: TensorInfo, rows: tuple[int, int] | None = None, dtype: torch.dtype | None = torch.float32,
             device: str | torch.device = "cpu", evict: bool = True) -> torch.Tensor:
        """Rows of one adapter tensor (a factor or a replacement), as `Checkpoint.read` reads them."""
        return self._weights.read(info.name, rows, dtype, device, evict)

    def check_against(self, base_tensors: dict[str, TensorInfo]) -> None:
        """Refuse an adapter that does not fit its base, before any merge work starts."""
        for name, mod in self.lora.items():
            w = base_tensors.get(name)
            if w is None:
                raise CheckpointError(f"{self.path}: module {name.removesuffix('.weight')!r} has LoRA factors but "
                                      f"the base model has no tensor {name!r}")
            if w.shape != mod.weight_shape:
                raise CheckpointError(f"{self.path}: module {name.removesuffix('.weight')!r} has A "
                                      f"{list(mod.a.shape)} and B {list(mod.b.shape)}, which do not fit base "
                                      f"{name} {list(w.shape)}" + (" (fan_in_fan_out)" if mod.fan_in_fan_out
                                                                  else ""))
        for name, info in self.replaced.items():
            w = base_tensors.get(name)
            if w is None:
                raise CheckpointError(f"{self.path}: saved tensor {info.name!r} replaces {name!r}, which the base "
                                      "model does not have")
            if w.shape != info.shape:
                raise CheckpointError(f"{self.path}: saved tensor {info.name!r} has shape {list(info.shape)} but "
                                      f"base {name} is {list(w.shape)}")

    def close(self) -> None:
        self._weights.close()


def lora_rows(A: torch.Tensor, B: torch.Tensor, scale: float, rows: tuple[int, int],
              fan_in_fan_out: bool = False) -> torch.Tensor:
    """Rows ``[a, b)`` of the LoRA weight delta ``scale * B @ A`` (``B [out, r]``, ``A [r, in]``), float32.

    With ``fan_in_fan_out`` the target weight is stored ``[in, out]`` (PEFT transposes), so its rows are columns
    of ``B @ A``.  The rank-r product is accumulated one rank at a time in float64 (element-wise ops, not BLAS,
    whose blocking would make a row's bits depend on how many rows are computed together), scaled, then
    rounded once to float32.
    """
    a, b = rows
    if fan_in_fan_out:
        left, right = A.t()[a:b], B.t()  # [b-a, r] and [r, out]
    else:
        left, right = B[a:b], A  # [b-a, r] and [r, in]
    left = left.to(torch.float64)
    right = right.to(torch.float64)
    acc = torch.zeros(left.shape[0], right.shape[1], dtype=torch.float64)
    for k in range(left.shape[1]):
        acc = acc + left[:, k : k + 1] * right[k : k + 1, :]
    return (acc * scale).to(torch.float32)


class AdaptedCheckpoint:
    """A base checkpoint with an adapter applied lazily; reads like a `Checkpoint`."""

    def __init__(self, base: Checkpoint | GGUFCheckpoint, adapter: Adapter) -> None:
        adapter.check_against(base.tensors)
        self.base = base
        self.adapter = adapter
        self.path = base.path
        self.config = base.config
        self.config_dir = base.config_dir
        self.tensors = {**base.tensors, **adapter.replaced}

    def has_stored_form(self, name: str) -> bool:
        """False for an adapted weight: W + scale * B @ A exists only as the float32 value computed on read, and
        rounding it to W's dtype would make a merge's result depend on how it was read (issue 27). A tensor the
        adapter leaves alone, or replaces with a saved one, is read from a file as it is stored."""
        return name not in self.adapter.lora

    def read(self, name: str, rows: tuple[int, int] | None = None, dtype: torch.dtype | None = torch.float32,
             device: str | torch.device = "cpu", evict: bool = True) -> torch.Tensor:
        """Rows [a, b) of the adapted tensor, W + delta summed in float32 and then cast to `dtype`. With `dtype`
        None ("as stored") an adapted weight stays float32: it has no stored form (`has_stored_form`). Only
        those rows of the delta are formed, with the block-invariant `lora_rows`, so a row's bits do not depend
        on the block it is read in."""
        mod = self.adapter.lora.get(name)
        if mod is None:
            return self._read_weight(name, rows, dtype, device, evict)
        info = self.tensors[name]
        span = (0, info.rows) if rows is None else rows
        a = self.adapter.read(mod.a)
        b = self.adapter.read(mod.b)
        w = self._read_weight(name, span, torch.float32, "cpu", evict)
        out = w + lora_rows(a, b, mod.scale, span, mod.fan_in_fan_out)
        return out.to(device=device, dtype=torch.float32 if dtype is None else dtype)

    def _read_weight(self, name: str, rows: tuple[int, int] | None, dtype: torch.dtype | None,
                     device: str | torch.device, evict: bool) -> torch.Tensor:
        """W before the LoRA delta: the adapter's saved copy when it has one, else the base's."""
        saved = self.adapter.replaced.get(name)
        if saved is not None:
            return self.adapter.read(saved, rows, dtype, device, evict)
        return self.base.read(name, rows, dtype, device, evict)

    def aux_files(self) -> list[Path]:
        return self.base.aux_files()

    def parts(self, name: str, rows: tuple[int, int] | None) -> list[tuple[Checkpoint, str, tuple[int, int] | None]]:
        """The plain checkpoints' reads that reading rows of `name` makes: W's rows (the base's, or the adapter's
        saved copy), and the LoRA factors whole."""
        saved = self.adapter.replaced.get(name)
        out = [(self.adapter._weights, saved.name, rows)] if saved is not None else self.base.parts(name, rows)
        mod = self.adapter.lora.get(name)
        if mod is not None:
            out += [(self.adapter._weights, mod.a.name, None), (self.adapter._weights, mod.b.name, None)]
        return out

    def data_files(self) -> set[Path]:
        """The files whose bytes the adapted tensors are read from: the base's and the adapter's weights."""
        return {Path(info.file) for info in self.tensors.values()} | {self.adapter.weights_file}

    @property
    def warnings(self) -> list[str]:
        return self.adapter.warnings

    def meta_files(self) -> set[Path]:
        """The base's, and the adapter's config (targets, rank and alpha patterns: the scale of each delta)."""
        return self.base.meta_files() | {self.adapter.path / CONFIG_NAME}

    def close(self) -> None:
        self.adapter.close()
        self.base.close()

    def __enter__(self) -> "AdaptedCheckpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
