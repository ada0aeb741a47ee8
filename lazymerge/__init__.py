"""lazymerge: merge LLM checkpoints as a lazy, out-of-core task graph inside a memory budget."""
from __future__ import annotations

__version__ = "0.1.0"

from .api import merge, plan  # noqa: E402
from .engine.report import Progress, Report  # noqa: E402
from .errors import CheckpointError, LazyMergeError, MergeAborted, OutputError, RecipeError  # noqa: E402
from .planner.plan import Plan  # noqa: E402

__all__ = ["merge", "plan", "Plan", "Report", "Progress", "LazyMergeError", "RecipeError", "CheckpointError",
           "OutputError", "MergeAborted", "__version__"]
