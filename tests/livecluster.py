"""A real, long-lived Dask cluster for tests: a `dask scheduler` process and `dask worker` processes on loopback,
as a user starts them (a LocalCluster is a fresh cluster per test module and hides what a long-lived worker keeps
between runs). Workers see this repository and tests/ (so test-only hooks defined in tests/ unpickle there).

Holds: `Hook` replaces a function of a lazymerge module inside a worker process for the test, with a callable that
may wait on a `distributed.Event`: a run is held at a known point and released by the test, never raced.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import distributed

REPO = Path(__file__).resolve().parent.parent
STARTUP_S = 120


class LiveCluster:
    """A scheduler and its workers, each a process group of ours; `close()` ends them all."""

    def __init__(self, root: Path):
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.logs: list[list[str]] = []
        self.address = self._start_scheduler()

    def _spawn(self, args: list[str], cwd: Path, pythonpath: str | None = None) -> tuple[subprocess.Popen, list]:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([pythonpath or str(REPO), str(REPO / "tests")]),
               "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, "-m", *args], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.procs.append(proc)
        lines: list[str] = []
        self.logs.append(lines)
        return proc, lines

    def _start_scheduler(self) -> str:
        proc, lines = self._spawn(["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
                                   "--no-dashboard"], self.root)
        found: list[str] = []
        ready = threading.Event()

        def drain() -> None:                    # read its log: the address, then keep the pipe from filling
            for line in proc.stderr:
                lines.append(line)
                if not found and "Scheduler at:" in line:
                    found.append(line.split("Scheduler at:")[1].strip())
                    ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        if not ready.wait(STARTUP_S) or not found:
            self.close()
            raise RuntimeError("dask scheduler did not start:\n" + "".join(lines))
        return found[0]

    def start_worker(self, *, nthreads: int = 2, cwd: Path | None = None, pythonpath: str | None = None,
                     name: str | None = None) -> subprocess.Popen:
        """A `dask worker` (nanny + worker process) in `cwd`; returns at once: wait with Client.wait_for_workers."""
        args = ["distributed.cli.dask_worker", self.address, "--nthreads", str(nthreads), "--nworkers", "1",
                "--no-dashboard", "--memory-limit", "4GiB", "--host", "127.0.0.1"]
        if name:
            args += ["--name", name]
        proc, lines = self._spawn(args, cwd or self.root, pythonpath)
        threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def close(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)


# -- holds inside a worker process ------------------------------------------------------------------------------

def _install(module: str, name: str, wrapper: Any) -> None:
    import importlib

    mod = importlib.import_module(module)
    saved = mod.__dict__.setdefault("_test_saved", {})
    saved.setdefault(name, getattr(mod, name))
    setattr(mod, name, wrapper(saved[name]))


def _uninstall(module: str, name: str) -> None:
    import importlib

    mod = importlib.import_module(module)
    saved = mod.__dict__.get("_test_saved", {})
    if name in saved:
        setattr(mod, name, saved.pop(name))


class Hook:
    """Replace `module.name` in the workers' processes by `wrapper(original)` while the block runs (a module that
    does not have `name` is left alone)."""

    def __init__(self, client: Any, wrapper: Any, *targets: tuple[str, str]):
        self.client, self.wrapper, self.targets = client, wrapper, targets

    def __enter__(self) -> "Hook":
        for module, name in self.targets:
            self.client.run(_install_if_present, module, name, self.wrapper)
        return self

    def __exit__(self, *exc: Any) -> None:
        for module, name in self.targets:
            self.client.run(_uninstall, module, name)


def _install_if_present(module: str, name: str, wrapper: Any) -> None:
    import importlib

    if hasattr(importlib.import_module(module), name):
        _install(module, name, wrapper)


def event(name: str, client: Any) -> distributed.Event:
    return distributed.Event(name, client=client)
