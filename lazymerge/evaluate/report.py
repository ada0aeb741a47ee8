"""What an evaluation reports: perplexity with a bootstrap interval, and what the run cost."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import torch

from ..engine.report import human

BOOTSTRAP_SAMPLES = 1000


def perplexity(nll: float) -> float:
    """exp(mean NLL per token); inf past float64's range (a degenerate merge is a result, not a crash)."""
    try:
        return math.exp(nll)
    except OverflowError:
        return math.inf


def bootstrap_ppl(window_nll: torch.Tensor, tokens_per_window: int, *, samples: int = BOOTSTRAP_SAMPLES,
                  seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the perplexity, resampling windows (seeded: same data, same interval)."""
    w = window_nll.shape[0]
    if w < 2:
        ppl = perplexity(float(window_nll.sum()) / (w * tokens_per_window))
        return ppl, ppl
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(w, (samples, w), generator=g)
    ppl = torch.exp(window_nll.double()[idx].sum(dim=1) / (w * tokens_per_window))
    lo, hi = torch.quantile(ppl, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return lo, hi


@dataclass(frozen=True)
class EvalProgress:
    """Handed to an evaluation's `progress` callback: steps done of a stage's total."""

    done: int
    total: int
    stage: str          # "layer 3/22", "head", "routers: layer 2/22"


@dataclass(frozen=True)
class EvalReport:
    target: str
    perplexity: float
    nll: float                  # mean NLL per predicted token (nats)
    tokens: int                 # predicted tokens (windows * (seq_len - 1))
    windows: int
    seq_len: int
    ppl_low: float              # 95% bootstrap interval over windows
    ppl_high: float
    total_nll: float
    wall_s: float
    peak_rss: int
    start_rss: int              # RSS when evaluation began (interpreter, libraries)
    budget: int | None
    activation_bytes: int       # hidden states of all windows and one batch's work (see README)
    largest_unit: int           # bytes of the largest set of weights held at once
    over_budget_units: int      # layers (or merge tasks) larger than the budget, run alone
    device: str
    window_nll: list[float] = field(default_factory=list, repr=False)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def summary(self) -> str:
        lines = [
            f"target        {self.target}",
            f"perplexity    {self.perplexity:.4f}  (95% CI {self.ppl_low:.4f} .. {self.ppl_high:.4f}, "
            f"bootstrap over windows)",
            f"nll           {self.nll:.6f} nats/token",
            f"tokens        {self.tokens} predicted in {self.windows} windows of {self.seq_len}",
            f"wall          {self.wall_s:.1f} s",
            f"peak RSS      {human(self.peak_rss)} (budget {human(self.budget) if self.budget else 'unlimited'}"
            f", activations {human(self.activation_bytes)}, largest unit {human(self.largest_unit)})",
        ]
        if self.over_budget_units:
            lines.append(f"over budget   {self.over_budget_units} unit(s) larger than the budget ran alone")
        return "\n".join(lines)


def comparison_table(reports: "list[EvalReport]") -> str:
    """One row per evaluated model (inputs first, the merge last): perplexity, its interval, NLL, and the
    predicted tokens (each model reads the data through its own tokenizer)."""
    width = max(12, *(len(r.target) for r in reports))
    lines = [f"{'model':<{width}}  {'perplexity':>12}  {'95% CI':>23}  {'nll/token':>10}  {'tokens':>7}"]
    for r in reports:
        lines.append(f"{r.target:<{width}}  {r.perplexity:>12.4f}  {r.ppl_low:>10.4f} .. {r.ppl_high:<10.4f}  "
                     f"{r.nll:>10.6f}  {r.tokens:>7}")
    if reports and len({r.tokens for r in reports}) == 1:
        lines.append(f"({reports[0].tokens} predicted tokens in {reports[0].windows} windows of "
                     f"{reports[0].seq_len}, the same for every model)")
    elif reports:
        lines.append("(each model reads the data through its own tokenizer: models with different tokenizers "
                     "predict different tokens, so their perplexities per token are not strictly comparable)")
    return "\n".join(lines)
