"""Measuring one command in its own subprocess: wall and CPU seconds, peak RSS, bytes read/written, memory cap.

Used by benches/run.py. Everything here comes from the kernel's own accounting of the child:

- CPU seconds and `ru_maxrss` from `os.wait4` on the command, taken by benches/launch.py, a small process that
  starts it (Linux seeds a new program's ru_maxrss with the RSS of the process it was forked from, so the harness,
  which has torch loaded, must not be that process). wait4 propagates the largest RSS of any waited-for
  descendant, so a `memcap` wrapper's grandchild is covered;
- an RSS time series sampled with psutil every 50 ms over the child and all its descendants (RSS and the
  file-backed/shared part, so anonymous memory = rss - shared);
- bytes read/written from /proc/self/io: when a child is reaped, Linux adds its I/O counters to the parent's
  process-wide totals, so (process-wide - sum of our own live threads) before and after the run is exactly what the
  child tree did, even though /proc/<child>/io is gone by the time it has exited;
- `memcap LIMIT` (a cgroup v1/v2 memory cap) when asked: its stderr line gives the cgroup's peak and whether the
  kernel killed the child for memory.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

LAUNCHER = Path(__file__).resolve().parent / "launch.py"

IO_KEYS = ("rchar", "wchar", "read_bytes", "write_bytes", "cancelled_write_bytes")
MEMCAP_RE = re.compile(r"memcap: limit=(\S+) peak=(\S+) oom=(\w+) exit=(-?\d+)")


def parse_size(text) -> int:
    """'2GiB', '512MiB', '2G' (binary, as numfmt --from=iec), '2GB' (decimal), '1.5e9', 123."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)(i?)(B?)\s*", str(text), re.I)
    if not m:
        raise ValueError(f"cannot parse size {text!r}")
    num, unit, binary, b = m.groups()
    power = " KMGT".index(unit.upper()) if unit else 0
    base = 1024 if (binary or (unit and not b)) else 1000
    return int(float(num) * base ** power)


def fmt_bytes(n, digits=2) -> str:
    if n is None:
        return "–"
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= div:
            return f"{n / div:.{digits}f} {unit}"
    return f"{n} B"


# ------------------------------------------------------------------------------------------------ page cache
def drop_caches() -> bool:
    """`sync; echo 3 > /proc/sys/vm/drop_caches`; False when not permitted (not root, read-only /proc)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def fsync_tree(path: Path) -> float:
    """fsync every file under `path` (the run's output): seconds it took to make the output durable."""
    t0 = time.perf_counter()
    if path.exists():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    return time.perf_counter() - t0


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


# ------------------------------------------------------------------------------------------------ /proc io
def _read_io(path: str) -> dict[str, int]:
    out = {}
    try:
        with open(path) as f:
            for line in f:
                k, _, v = line.partition(":")
                out[k.strip()] = int(v)
    except OSError:
        pass
    return out


def reaped_children_io() -> dict[str, int] | None:
    """I/O of every child this process has reaped so far (process-wide minus live threads' own)."""
    whole = _read_io("/proc/self/io")
    if not whole:
        return None
    live = {k: 0 for k in IO_KEYS}
    for tid in os.listdir("/proc/self/task"):
        t = _read_io(f"/proc/self/task/{tid}/io")
        for k in IO_KEYS:
            live[k] += t.get(k, 0)
    return {k: whole.get(k, 0) - live[k] for k in IO_KEYS}


# ------------------------------------------------------------------------------------------------ sampler
class Sampler(threading.Thread):
    """One long-lived thread (so that its own /proc reads stay in a live thread's counters, see above)."""

    def __init__(self, interval: float = 0.05):
        super().__init__(daemon=True, name="rss-sampler")
        self.interval = interval
        self._cv = threading.Condition()
        self._pid: int | None = None
        self._t0 = 0.0
        self._samples: list[tuple[float, int, int]] = []
        self._skip = 0
        self._busy = False
        self.start()

    def track(self, pid: int, t0: float, skip: int = 0) -> None:
        """Sample `pid`'s descendants from depth `skip` down (skip the launcher and memcap's shell)."""
        with self._cv:
            self._pid, self._t0, self._samples, self._skip = pid, t0, [], skip
            self._cv.notify_all()

    def finish(self) -> list[tuple[float, int, int]]:
        with self._cv:
            self._pid = None
            while self._busy:
                self._cv.wait()
            return self._samples

    def run(self) -> None:
        while True:
            with self._cv:
                while self._pid is None:
                    self._cv.wait()
                pid, t0, samples, skip = self._pid, self._t0, self._samples, self._skip
                self._busy = True
            try:
                self._sample_loop(pid, t0, samples, skip)
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

    @staticmethod
    def _tree(root: psutil.Process, skip: int) -> list[psutil.Process]:
        level = [root]
        for _ in range(skip):
            level = [c for p in level for c in p.children()]
        return level + [c for p in level for c in p.children(recursive=True)]

    def _sample_loop(self, pid, t0, samples, skip) -> None:
        try:
            root = psutil.Process(pid)
        except psutil.Error:
            return
        procs: list[psutil.Process] = []
        n = 0
        while True:
            with self._cv:
                if self._pid != pid:
                    return
            if n % 10 == 0 or n < 20:           # refresh the descendants now and then (cheap RSS reads between)
                try:
                    procs = self._tree(root, skip)
                except psutil.Error:
                    pass
            rss = shared = 0
            for p in procs:
                try:
                    mi = p.memory_info()
                    rss += mi.rss
                    shared += mi.shared
                except psutil.Error:
                    pass
            samples.append((time.perf_counter() - t0, rss, shared))
            n += 1
            time.sleep(self.interval)


_SAMPLER: Sampler | None = None


def sampler() -> Sampler:
    global _SAMPLER
    if _SAMPLER is None:
        _SAMPLER = Sampler()
    return _SAMPLER


# ------------------------------------------------------------------------------------------------ memcap
def memcap_available(tool: str) -> tuple[bool, str]:
    try:
        r = subprocess.run([tool, "64M", "true"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, str(e)
    return r.returncode == 0, r.stderr.strip()


def parse_memcap(stderr_text: str) -> dict | None:
    found = None
    for line in stderr_text.splitlines():
        if "memcap: cannot" in line or "memcap: no cgroup" in line:
            return {"status": "n/a", "line": line.strip()}
        m = MEMCAP_RE.search(line)
        if m:
            found = m
    if not found:
        return None
    limit, peak, oom, code = found.groups()
    try:
        peak_b = parse_size(peak)
    except ValueError:
        peak_b = None
    return {"status": "ok", "limit": limit, "peak": peak, "peak_bytes": peak_b, "oom": oom == "yes",
            "exit": int(code), "line": found.group(0)}


# ------------------------------------------------------------------------------------------------ one run
def measure(cmd: list[str], *, log_prefix: Path, env: dict | None = None, cwd: Path | None = None,
            memcap: str | None = None, memcap_tool: str | None = None, timeout: float | None = None) -> dict:
    """Run `cmd` (optionally as `memcap LIMIT cmd`) and return what the kernel says it used."""
    full = [memcap_tool, memcap, *cmd] if memcap else list(cmd)
    out_path, err_path = log_prefix.with_suffix(".out"), log_prefix.with_suffix(".err")
    ru_path = log_prefix.with_suffix(".rusage.json")
    ru_path.unlink(missing_ok=True)
    launched = [sys.executable, str(LAUNCHER), str(ru_path), "--", *full]
    smp = sampler()
    io0 = reaped_children_io()
    timed_out = threading.Event()
    with open(out_path, "wb") as out_f, open(err_path, "wb") as err_f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(launched, stdout=out_f, stderr=err_f, env=env, cwd=cwd, start_new_session=True)
    smp.track(proc.pid, t0, skip=2 if memcap else 1)
    timer = None
    if timeout:
        def kill():
            timed_out.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)      # the child's own session: only what we started
            except ProcessLookupError:
                pass
        timer = threading.Timer(timeout, kill)
        timer.daemon = True
        timer.start()
    try:
        while True:
            try:
                _, status, ru = os.wait4(proc.pid, 0)
                break
            except InterruptedError:
                continue
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGKILL)
        os.wait4(proc.pid, 0)
        raise
    finally:
        if timer:
            timer.cancel()
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    samples = smp.finish()
    io1 = reaped_children_io()
    stdout = out_path.read_text(errors="replace")
    stderr = err_path.read_text(errors="replace")
    rc = proc.returncode
    try:
        own = json.loads(ru_path.read_text())               # the command's own wait4, from the launcher
    except (OSError, ValueError):
        own = None                                          # killed with its launcher (timeout): ours instead
    utime, stime = (own["ru_utime"], own["ru_stime"]) if own else (ru.ru_utime, ru.ru_stime)
    res = {
        "cmd": full,
        "exit_code": own["exit_code"] if own else rc,
        "timed_out": timed_out.is_set(),
        "wall_s": wall,
        "cpu_user_s": utime,
        "cpu_sys_s": stime,
        "cpu_s": utime + stime,
        "peak_rss_bytes": (own["ru_maxrss_kib"] if own else ru.ru_maxrss) * 1024,   # Linux reports KiB
        "peak_rss_source": "wait4 via launcher" if own else "wait4 of the launcher (inherits the harness's RSS)",
        "rusage": own,
        "peak_rss_sampled_bytes": max((s[1] for s in samples), default=None),
        "peak_anon_sampled_bytes": max((s[1] - s[2] for s in samples), default=None),
        "n_samples": len(samples),
        "io": ({k: io1[k] - io0[k] for k in IO_KEYS} if io0 and io1 else None),
        "stdout_log": str(out_path),
        "stderr_log": str(err_path),
        "stderr_tail": stderr[-2000:],
        "stdout_tail": stdout[-4000:],
        "memcap_result": None,
        "_trace": samples,
    }
    if memcap:
        mc = parse_memcap(stderr)
        res["memcap_result"] = mc or {"status": "unparsed"}
    return res
