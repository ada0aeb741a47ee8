"""Issue 26: fused kernels called from several scheduler threads at once must not abort the process, whatever
numba's threading layer. On the `workqueue` layer (numba's fallback where neither TBB nor OpenMP loads) two
threads launching parallel kernels at once abort with "Concurrent access has been detected"; the kernels are
serial now, so no layer is ever used. Run in a subprocess: an abort would take pytest down with it."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lazymerge.engine import fused

pytestmark = pytest.mark.skipif(not fused.available(), reason="numba not installed")

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import threading, torch
    from lazymerge.engine import fused
    from lazymerge.engine import kernels as K
    from lazymerge.engine import ops

    def work(seed):
        g = torch.Generator().manual_seed(seed)
        es = [torch.randn(1 << 16, generator=g) for _ in range(2)]
        base = torch.randn(1 << 16, generator=g)
        raw = torch.randn(1 << 16, generator=g).to(torch.bfloat16)
        for _ in range(60):
            h = K.topk_pass1(es[0])
            s1 = K.topk_reduce1([h], 1 << 14)
            s2 = K.topk_reduce2([K.topk_pass2(es[0], s1)], s1)
            K.topk_keep(es[0], s2, 0)
            K.elect_nonneg(es, "sum")
            fused.combine_elected(es, [0.5, 0.5], fused.elect_later("sum", es), True, 1.0, base, base.clone())
            fused.widen_checked(raw)
            fused.all_finite(base)
            {extra}

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("ok")
""")


def run_threads(layer: str, extra: str = "pass") -> subprocess.CompletedProcess:
    env = dict(os.environ, NUMBA_THREADING_LAYER=layer, PYTHONPATH=str(REPO), LAZYMERGE_FUSED="1")
    return subprocess.run([sys.executable, "-c", SCRIPT.replace("{extra}", extra)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def test_kernels_from_two_threads_on_the_workqueue_layer() -> None:
    r = run_threads("workqueue")
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), (r.returncode, r.stderr[-2000:])
    assert "Concurrent access" not in r.stderr
