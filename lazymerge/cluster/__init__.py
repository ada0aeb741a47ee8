"""Running a plan on a Dask cluster (`pip install 'lazymerge[dask]'`).

`partition.py` cuts the plan's output into independent partitions (pure), `preflight.py` checks every worker sees
the inputs and the output, `worker.py` runs one partition with the local engine, `driver.py` is the client;
`search.py` runs a parameter search's trials on the workers. The public entry points are
`lazymerge.merge(..., cluster=...)`, `lazymerge.search(..., cluster=...)` and `open_cluster`; importing this
package does not import Dask.
"""
from __future__ import annotations

from .driver import open_cluster

__all__ = ["open_cluster"]
