"""lazymerge: merge LLM checkpoints as a lazy, out-of-core task graph inside a memory budget."""
from __future__ import annotations

import os as _os

# Transparent huge pages for torch's CPU allocations: merges allocate and free many block-sized buffers, and with
# 4 KiB pages the page faults of every fresh buffer cost more than the arithmetic (measured 5x on element-wise
# ops). torch reads this once, at its first allocation, so it must be set before torch is imported.
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from ._version import __version__  # noqa: E402
# The subpackage lazymerge/evaluate/ shares its name with the function `lazymerge.evaluate`. Importing a submodule
# binds it as an attribute of its parent only on its first import, so the package is imported here first and the
# function then takes the name; later imports of lazymerge.evaluate.* do not rebind it.
from . import evaluate as _evaluate_package  # noqa: E402,F401
from .api import compare_inputs, evaluate, generate, merge, plan, search  # noqa: E402
from .engine.report import Progress, Report  # noqa: E402
from .errors import CheckpointError, LazyMergeError, MergeAborted, OutputError, RecipeError  # noqa: E402
from .planner.plan import Plan  # noqa: E402

__all__ = ["merge", "plan", "evaluate", "search", "generate", "compare_inputs", "Plan", "Report", "Progress",
           "LazyMergeError", "RecipeError", "CheckpointError", "OutputError", "MergeAborted", "__version__"]
