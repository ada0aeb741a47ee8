"""Mixture of experts from dense models (mergekit-moe's job), compiled into the same plan and engine as a merge.

The config is mergekit-moe's, read unchanged (a document with `base_model` and `experts`), or the same fields in a
recipe with `merge_method: moe` (which may be the last stage of a multi-stage recipe, its experts earlier stages):

    base_model: ./base                      # attention, norms, embeddings (and the tokenizer) come from here
    gate_mode: hidden                       # hidden | cheap_embed | random | uniform_random
    dtype: bfloat16
    experts_per_token: 2
    experts:
      - source_model: ./code-ft             # any lazymerge source: a directory, base+adapter, a stage's name
        positive_prompts: ["def fibonacci(n):"]
        negative_prompts: ["Once upon a time"]
        noise_scale: 0.01                   # optional: Gaussian noise added to this expert's weights
    shared_experts: [...]                   # Qwen2-MoE: exactly one
    architecture: mixtral                   # optional: mixtral | qwen (Qwen2-MoE) | qwen3 (Qwen3-MoE)

Every output tensor is a copy of one input tensor (`load` -> `write`, cast to the output dtype), except the
routers, which are computed from the base model before the graph runs and enter it through an in-memory source
(`moe_sources`). The planner only describes them (`moe_routers`); computing them runs a model, which is
`lazymerge.moe.routers`' job, above the planner (`prepare_routers(plan)`, called by the merge). So a MoE runs inside `--memory` like any merge: one tensor (or row block) at a time.

Output layout: each expert's MLP as its own tensors in the names transformers' loaders accept for every version
(Mixtral's `block_sparse_moe.experts.E.w1/w2/w3`, Qwen's `mlp.experts.E.gate_proj/up_proj/down_proj`);
transformers 5 fuses them into its 3-D expert tensors as it loads them.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..dtypes import FLOAT_CODES, RECIPE_NAMES
from ..engine import ops
from ..errors import CheckpointError, RecipeError
from ..io.models import ModelOpener, pin_refs
from .moe_sources import NoiseSource, RouterSource
from ..units import human
from .emit import emit_plan
from .graph import SourceRef, TensorBuilder
from .methods import BlockFn, Method
from .moe_recipe import PROMPT_MODES, ExpertSpec, MoEConfig, parse_moe
from .moe_routers import RouterPass, RouterTensor
from .plan import Plan
from .recipe import Recipe
from .stage_compiler import StageCompiler, StagePlan, _natural_key

MLP_PARAMS = ("gate_proj", "up_proj", "down_proj")
ROUTER_KEY = "moe:routers"


def _no_build(*_: Any) -> BlockFn:  # pragma: no cover - a MoE is compiled by compile_moe, not by a method build
    raise RecipeError("merge_method: moe is compiled by lazymerge.planner.moe")


MOE_METHOD = Method("moe", (), _no_build, base="required", doc="mixture of experts from dense models")


# -- output architectures ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutArch:
    key: str
    label: str                         # mergekit-moe's name (its `architecture:` matches a prefix of it)
    cls: str
    inputs: tuple[str, ...]            # model types it is built from
    shared: int                        # shared experts it takes

    def expert_name(self, layer: int, expert: int, param: str) -> str:
        if self.key == "mixtral":
            w = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}[param]
            return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{w}.weight"
        return f"model.layers.{layer}.mlp.experts.{expert}.{param}.weight"

    def router_name(self, layer: int) -> str:
        mid = "block_sparse_moe" if self.key == "mixtral" else "mlp"
        return f"model.layers.{layer}.{mid}.gate.weight"

    def config(self, base: dict[str, Any], n: int, k: int, qkv_bias: bool, where: str) -> dict[str, Any]:
        """config.json of the output, as mergekit-moe writes it: the base's, with the MoE fields."""
        c = dict(base)
        inter = c.get("intermediate_size")
        if self.key == "mixtral":
            if c.get("attention_bias") or c.get("mlp_bias"):
                raise CheckpointError(f"{where}: the base model has attention/MLP biases, which Mixtral lacks")
            for key in ("attention_bias", "mlp_bias", "pretraining_tp"):
                c.pop(key, None)
            c.update(num_local_experts=n, num_experts_per_tok=k, sliding_window=None)
        elif self.key == "qwen2_moe":
            c.update(num_experts=n, num_experts_per_tok=k, decoder_sparse_step=1, norm_topk_prob=True,
                     sliding_window=None, use_sliding_window=False, shared_expert_intermediate_size=inter,
                     moe_intermediate_size=inter, qkv_bias=qkv_bias, mlp_only_layers=[])
        else:
            # transformers 5 writes Qwen3-MoE's expert count as num_local_experts, 4.x reads num_experts: both
            c.update(num_experts=n, num_local_experts=n, num_experts_per_tok=k, decoder_sparse_step=1,
                     norm_topk_prob=True, moe_intermediate_size=inter, mlp_only_layers=[])
        c["model_type"] = self.key
        c["architectures"] = [self.cls]
        return c


ARCHS = (
    OutArch("mixtral", "Mixtral", "MixtralForCausalLM", ("llama", "mistral"), 0),
    OutArch("qwen2_moe", "Qwen MoE", "Qwen2MoeForCausalLM", ("llama", "mistral", "qwen2"), 1),
    OutArch("qwen3_moe", "Qwen3 MoE", "Qwen3MoeForCausalLM", ("qwen3",), 0),
)


def select_arch(cfg: MoEConfig, model_type: str) -> OutArch:
    """mergekit-moe's choice: the architectures whose name starts with `architecture` (all if unset) that take
    these models and this many shared experts; Mixtral first, for older configs."""
    cands = list(ARCHS)
    if cfg.architecture:
        want = cfg.architecture.lower()
        cands = [a for a in ARCHS if a.label.lower().startswith(want) or a.key.startswith(want)
                 or a.cls.lower() == want]
        if not cands:
            raise RecipeError(f"{cfg.source}: architecture: unknown '{cfg.architecture}'; supported: "
                              + ", ".join(f"{a.key} ({a.label})" for a in ARCHS))
    fits = [a for a in cands if model_type in a.inputs and len(cfg.shared_experts) == a.shared]
    if not fits:
        why = "; ".join(f"{a.label} takes {'/'.join(a.inputs)} models and "
                        f"{'exactly one shared expert' if a.shared else 'no shared experts'}" for a in cands)
        raise RecipeError(f"{cfg.source}: no output architecture takes {model_type} models with "
                          f"{len(cfg.shared_experts)} shared expert(s): {why}")
    return fits[0]


# -- the plan ----------------------------------------------------------------------------------------------


@dataclass(eq=False)
class CopyJob:
    """One output tensor copied from one input tensor (optionally with an expert's noise and residual scale);
    the interface of `stage_compiler.TensorJob` that `emit.emit_plan` uses."""

    name: str
    shape: tuple[int, ...]
    out_dtype: str
    refs: list[SourceRef]
    noise: float | None = None
    residual: float | None = None
    base: None = None
    vocab: None = None

    def emit(self, tb: TensorBuilder) -> BlockFn:
        if not self.noise and self.residual is None:
            # as stored where the input has a stored form (`SourceRef.stored`): the copy is the file's bytes
            return lambda j: tb.load(0, j, raw=True)

        def block(j: int) -> str:
            x = tb.load(0, j)
            if self.noise:
                x = tb.emit(ops.WeightedSum((1.0, self.noise), False), (x, tb.load(1, j)), tb.f32(j), j)
            if self.residual is not None:
                x = tb.emit(ops.Rescale(self.residual), (x,), tb.f32(j), j)
            return x
        return block


@dataclass(frozen=True)
class MoEInfo:
    """What `lazymerge plan` shows about a MoE."""

    arch: OutArch
    model_type: str
    experts: tuple[str, ...]
    shared: tuple[str, ...]
    experts_per_token: int
    gate_mode: str
    prompts: int
    router_peak: int               # bytes the router pass holds (hidden: one layer and the embedding)


@dataclass
class MoEPlan(Plan):
    """A Plan with the MoE's description and its router source: described here, computed by
    `lazymerge.moe.prepare_routers(plan)` before the graph runs (`lazymerge.merge` calls it)."""

    moe: MoEInfo | None = None
    routers: RouterSource | None = None

    def summary(self) -> str:
        m = self.moe
        assert m is not None
        lines = [f"output        {m.arch.label} ({m.arch.cls}) from {m.model_type} models",
                 f"experts       {len(m.experts)}, {m.experts_per_token} per token"
                 + (f", {len(m.shared)} shared" if m.shared else "")]
        lines += [f"  expert {i:<5} {e}" for i, e in enumerate(m.experts)]
        lines += [f"  shared {i:<5} {e}" for i, e in enumerate(m.shared)]
        gate = f"gate_mode     {m.gate_mode}"
        if m.gate_mode in PROMPT_MODES:
            gate += f" ({m.prompts} prompts"
            gate += f"; router pass peak {human(m.router_peak)})" if m.router_peak else ")"
        inputs = sum(1 for k in self.sources if not k.startswith("moe:"))
        rest = [f"models        {inputs} checkpoints" if ln.startswith("models ") else ln
                for ln in super().summary().splitlines()]
        return "\n".join(lines + [gate] + rest)


def _dtype_of_config(cfg: dict[str, Any] | None) -> str | None:
    name = (cfg or {}).get("torch_dtype") or (cfg or {}).get("dtype")
    return RECIPE_NAMES.get(str(name).lower()) if name else None


def compile_moe(r: Recipe, sources: dict[str, Any], stages: dict[str, Any], *, budget: int | None,
                shard_bytes: int, seed: int = 0, opener: ModelOpener | None = None,
                max_block_rows: int | None = None, gguf: Any = None) -> MoEPlan:
    """Compile the MoE recipe `r` into a Plan, against the checkpoints opened so far and the earlier stages'
    outputs (`plan.compile_plan` compiles those and closes the sources on failure)."""
    cfg = parse_moe(r.raw, r.source)
    comp = StageCompiler(r, MOE_METHOD, sources, stages, opener or ModelOpener())
    stage_plan, info, routers, warnings = _MoECompiler(cfg, r, comp, budget, seed).compile()
    p = emit_plan(stage_plan, sources, budget, shard_bytes, seed, max_block_rows, gguf)
    out = MoEPlan(**{f.name: getattr(p, f.name) for f in fields(p)}, moe=info, routers=routers)
    out.warnings.extend(warnings)
    if out.config is not None and "dtype" in out.config and "torch_dtype" in out.config:
        out.config["dtype"] = out.config["torch_dtype"]      # transformers 5 reads `dtype`
    return out


@dataclass(frozen=True)
class _Base:
    """The opened base model and what the compile steps read from it."""

    key: str
    src: Any
    cfg: dict[str, Any]
    model_type: str
    layers: int
    hidden: int
    arch: OutArch


class _MoECompiler:
    """Checks the models against each other and lists the output tensors (one CopyJob each)."""

    def __init__(self, cfg: MoEConfig, r: Recipe, comp: Any, budget: int | None, seed: int):
        self.cfg, self.r, self.comp, self.budget, self.seed = cfg, r, comp, budget, seed

    def _open(self, ref: str, where: str) -> tuple[str, Any, dict[str, Any]]:
        key = self.comp.open_ref(ref, where)
        src = self.comp.get(key)
        if not src.config:
            raise CheckpointError(f"{src.path}: config.json is missing or has no model_type ({where})")
        return key, src, src.config

    def compile(self) -> tuple[Any, MoEInfo, RouterSource, list[str]]:
        """The MoE's stage plan, description, router source and warnings. Each step below checks one thing
        or lists one kind of output tensor, so that every error names what it checked before anything runs."""
        cfg, comp = self.cfg, self.comp
        warnings: list[str] = []
        base = self._base()
        specs = cfg.experts + cfg.shared_experts
        opened = [self._open(e.model, f"{e.where}.source_model") for e in specs]
        self._check_experts(base, specs, opened)
        keys = [o[0] for o in opened]
        n = len(cfg.experts)
        if n > 1 and len(set(keys[:n])) == 1:
            warnings.append(f"experts: all {n} experts are the same model; the MoE computes what "
                            f"that model computes (useful as a check, or as a start for training)")
        if n & (n - 1):
            warnings.append(f"experts: {n} experts is not a power of two; llama.cpp cannot load the result")
        self._check_prompt_mode(base)
        out_code = cfg.dtype or _dtype_of_config(base.cfg)
        jobs = self._copy_jobs(base, keys, out_code)
        routers = self._routers(base, out_code)
        comp.sources[ROUTER_KEY] = routers
        jobs += [CopyJob(t.name, t.shape, routers.tensors[t.name].dtype, [SourceRef(ROUTER_KEY, t.name, 0)])
                 for t in routers.spec.tensors]
        jobs.sort(key=lambda j: _order_key(j.name))
        qkv_bias = "model.layers.0.self_attn.q_proj.bias" in base.src.tensors
        config = base.arch.config(base.cfg, n, cfg.experts_per_token, qkv_bias, str(base.src.path))
        n_prompts = sum(len(e.prompts.positive) + len(e.prompts.negative) for e in specs)
        info = MoEInfo(base.arch, base.model_type, tuple(e.model for e in cfg.experts),
                       tuple(e.model for e in cfg.shared_experts), cfg.experts_per_token, cfg.gate_mode,
                       n_prompts, self._router_peak(base.src, base.layers))
        # CopyJob has the interface of TensorJob that emit.emit_plan uses
        st = StagePlan(self.r, MOE_METHOD, jobs, config, base.src.aux_files(),  # type: ignore[arg-type]
                       list(comp.src_keys), base.key, base.key)
        return st, info, routers, warnings

    def _base(self) -> "_Base":
        """The base model opened, with the sizes every later step needs and the output architecture it
        selects (the base's model type decides which MoE architectures can take it)."""
        cfg = self.cfg
        key, src, bcfg = self._open(cfg.base_model, f"{cfg.source}: base_model")
        model_type = str(bcfg.get("model_type"))
        try:
            layers, hidden = int(bcfg["num_hidden_layers"]), int(bcfg["hidden_size"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{src.path}: config.json lacks num_hidden_layers/hidden_size") from None
        return _Base(key, src, bcfg, model_type, layers, hidden, select_arch(cfg, model_type))

    def _check_experts(self, base: "_Base", specs: list[ExpertSpec], opened: list[tuple[str, Any, Any]]) -> None:
        """Every expert has the base's architecture and MLP shapes, and no MLP tensor the output's expert
        cannot hold: an expert's MLP is copied as is, so a mismatch would only show when the MoE is loaded."""
        for e, (_, src, ecfg) in zip(specs, opened):
            if ecfg.get("model_type") != base.model_type:
                raise CheckpointError(f"{e.where}.source_model: {src.path} is a {ecfg.get('model_type')} model, "
                                      f"the base {base.src.path} is {base.model_type}; every expert must be a "
                                      f"{base.model_type}")
            for i in range(base.layers):
                for prm in MLP_PARAMS:
                    nm = f"model.layers.{i}.mlp.{prm}.weight"
                    want, got = base.src.tensors.get(nm), src.tensors.get(nm)
                    if got is None:
                        raise CheckpointError(f"{src.path}: tensor '{nm}' is missing ({e.where})")
                    if want is not None and tuple(want.shape) != tuple(got.shape):
                        raise CheckpointError(f"{src.path}: tensor '{nm}' has shape {list(got.shape)}, but the "
                                              f"base {base.src.path} has {list(want.shape)} ({e.where})")
            extra = [n for n in src.tensors if ".mlp." in n and n.rsplit(".mlp.", 1)[1].split(".")[0]
                     not in MLP_PARAMS]
            if extra:
                raise CheckpointError(f"{src.path}: tensor '{extra[0]}' is an MLP tensor a {base.arch.label} "
                                      f"expert cannot hold ({e.where})")

    def _check_prompt_mode(self, base: "_Base") -> None:
        """The prompt modes run the base model on prompts after planning: check now that they can (a checkpoint
        base with a tokenizer, transformers installed) rather than fail after the plan was shown."""
        cfg = self.cfg
        if cfg.gate_mode not in PROMPT_MODES:
            return
        if base.key in self.comp.stages:
            raise RecipeError(f"{cfg.source}: base_model: gate_mode {cfg.gate_mode} runs the base model on "
                              f"prompts, so it must be a checkpoint, not the stage '{cfg.base_model}'")
        if not any(p.name.startswith("tokenizer") for p in base.src.aux_files()):
            raise CheckpointError(f"{base.src.path}: no tokenizer files; gate_mode {cfg.gate_mode} tokenizes the "
                                  f"prompts with the base model's tokenizer (or use gate_mode: random)")
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise RecipeError(f"{cfg.source}: gate_mode {cfg.gate_mode} needs transformers; "
                              f"pip install 'lazymerge[moe]'") from None

    def _copy_jobs(self, base: "_Base", keys: list[str], out_code: str | None) -> list[CopyJob]:
        """Every output tensor but the routers: the base's non-MLP tensors, then per layer each expert's MLP
        (and the shared experts'), each a copy of one input tensor, with the expert's noise and residual scale."""
        cfg, comp = self.cfg, self.comp
        jobs: list[CopyJob] = []

        def copy(out_name: str, key: str, in_name: str, expert: ExpertSpec | None = None,
                 e_index: int = 0) -> None:
            found = comp.find(key, in_name)
            if found is None:
                raise CheckpointError(f"{comp.get(key).path}: tensor '{in_name}' is missing")
            info = found[1]
            shape = tuple(info.shape)
            rows = shape[0] if len(shape) >= 2 else 1
            is_float = info.dtype in FLOAT_CODES
            refs = [comp._ref(key, found[0], info, rows)]
            noise = expert.noise_scale if expert is not None and is_float else None
            is_down = in_name.endswith("down_proj.weight")
            residual = expert.residual_scale if expert is not None and is_float and is_down else None
            if noise:
                refs.append(self._noise_ref(expert, e_index, in_name, shape))  # type: ignore[arg-type]
            jobs.append(CopyJob(out_name, shape, (out_code or info.dtype) if is_float else info.dtype, refs,
                                noise=noise, residual=residual))

        for nm in sorted(base.src.tensors, key=_order_key):
            if ".mlp." not in nm:
                copy(nm, base.key, nm)
        n = len(cfg.experts)
        for i in range(base.layers):
            for e, spec in enumerate(cfg.experts):
                for prm in MLP_PARAMS:
                    copy(base.arch.expert_name(i, e, prm), keys[e], f"model.layers.{i}.mlp.{prm}.weight", spec, e)
            for s, spec in enumerate(cfg.shared_experts):
                for prm in MLP_PARAMS:
                    copy(f"model.layers.{i}.mlp.shared_expert.{prm}.weight", keys[n + s],
                         f"model.layers.{i}.mlp.{prm}.weight", spec, n + s)
        return jobs

    def _noise_ref(self, expert: ExpertSpec, e_index: int, name: str, shape: tuple[int, ...]) -> SourceRef:
        """The expert's noise for tensor `name`, from one in-memory NoiseSource per expert (seeded per expert and
        tensor, so the noise never depends on which other tensors exist)."""
        nkey = f"moe:noise:{e_index}"
        if nkey not in self.comp.sources:
            self.comp.sources[nkey] = NoiseSource(self.seed, e_index, Path(f"<noise of {expert.where}>"))
        self.comp.sources[nkey].add(name, shape)
        return SourceRef(nkey, name, 0)

    def _routers(self, base: "_Base", out_code: str | None) -> RouterSource:
        """The router tensors described, not computed: computing them runs the base model (hidden), which is
        `lazymerge.moe.routers`' job above the planner; the plan only holds the source they will fill."""
        cfg, n, layers = self.cfg, len(self.cfg.experts), base.layers
        embed = base.src.tensors.get("model.embed_tokens.weight")
        if embed is None and cfg.gate_mode == "cheap_embed":
            raise CheckpointError(f"{base.src.path}: tensor 'model.embed_tokens.weight' is missing (cheap_embed)")
        tensors = [RouterTensor(base.arch.router_name(i), (n, base.hidden), i, (0, n)) for i in range(layers)]
        if cfg.shared_experts:
            m = len(cfg.shared_experts)
            tensors += [RouterTensor(f"model.layers.{i}.mlp.shared_expert_gate.weight", (m, base.hidden), i,
                                     (n, n + m)) for i in range(layers)]
        # what the layer-streaming forward runs: the directory, or base+adapter as a merge-and-unload recipe
        ref = pin_refs(base.key, self.comp.opener.pins())     # a hub base: the commit this plan read
        target: Any = ref if "+" not in base.key or Path(base.key).is_dir() else \
            {"merge_method": "passthrough", "models": [{"model": ref}]}
        tokenizer_dir = Path(getattr(base.src, "config_dir", base.src.path))   # a GGUF base: its rebuilt files
        spec = RouterPass(cfg.gate_mode, self.seed, base.key, tokenizer_dir, target,
                          tuple(e.prompts for e in cfg.experts + cfg.shared_experts), layers,
                          self.budget if self.budget is not None else "unlimited", tuple(tensors))
        router_code = out_code or (embed.dtype if embed is not None else "F32")
        return RouterSource(spec, router_code, Path(f"<routers of {base.src.path}>"))

    def _router_peak(self, base: Any, layers: int) -> int:
        """Bytes the router pass holds: hidden: the larger of one decoder layer and the embedding, in bfloat16;
        cheap_embed: a few embedding rows."""
        if self.cfg.gate_mode != "hidden":
            return 0
        per_layer = [0] * layers
        embed = 0
        for nm, info in base.tensors.items():
            if nm.startswith("model.layers."):
                i = int(nm.split(".")[2])
                if i < layers:
                    per_layer[i] += info.numel * 2
            elif "embed_tokens" in nm:
                embed = info.numel * 2
        return max(per_layer + [embed])


_order_key = _natural_key
