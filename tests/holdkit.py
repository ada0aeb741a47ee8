"""The test's side of a test hold (lazymerge/testhold.py): start a real lazymerge process that stops by itself
at a named point, wait until it is there, then kill it, interrupt it or let it go on.

    hold = Hold(tmp_path, "shard", 2)            # stop once the second shard is journaled
    proc = subprocess.Popen([...], env=hold.env())
    hold.wait(proc)                              # returns once the run is held (it cannot move on by itself)
    ... look at its files, then proc.kill() / proc.send_signal(SIGINT) / hold.release(proc)

Nothing here depends on how fast the run is: the run waits for the test, never the reverse. The deadlines are
only there so that a broken run fails the test instead of hanging it.
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import time
from pathlib import Path

from lazymerge.testhold import ENV

HANG_S = 600.0      # a run that never reaches its hold point: fail after this long rather than hang the suite

_started: list[subprocess.Popen] = []      # every process a Hold waited for; conftest reaps them after each test


def reap() -> list[int]:
    """Kill every held process a test started and left running (a test that failed between `wait` and `release`
    or `kill` would otherwise leave its run blocked on the release FIFO for ever); the pids killed."""
    killed = []
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            killed.append(proc.pid)
    return killed


class Hold:
    def __init__(self, directory: Path, event: str, n: int = 1) -> None:
        self.event, self.n = event, n
        self.path = Path(directory) / f"hold-{event}-{n}"

    @property
    def spec(self) -> str:
        return f"{self.event}:{self.n}:{self.path}"

    def env(self, base: dict | None = None) -> dict[str, str]:
        """The environment for the held process: `base` (default os.environ) with LAZYMERGE_TEST_HOLD set."""
        return {**(os.environ if base is None else base), ENV: self.spec}

    def wait(self, proc: subprocess.Popen, timeout: float = HANG_S) -> dict:
        """Block until `proc` is held at the point; its announcement (event, n, pid). AssertionError when the run
        ends first (it never reached the point)."""
        _started.append(proc)
        deadline = time.monotonic() + timeout
        while not self.path.exists():
            if proc.poll() is not None:
                raise AssertionError(f"the run ended (rc {proc.returncode}) before its hold {self.spec}")
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"hold {self.spec} not reached in {timeout:.0f} s")
            time.sleep(0.005)
        info = json.loads(self.path.read_text())
        assert info == {"event": self.event, "n": self.n, "pid": proc.pid}, info
        return info

    def release(self, proc: subprocess.Popen, timeout: float = HANG_S) -> None:
        """Let the held run go on (it opens the release FIFO right after announcing; we open it to write and
        close it, which ends its read)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                fd = os.open(f"{self.path}.release", os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError as exc:
                if exc.errno not in (errno.ENXIO, errno.ENOENT):      # no reader yet / FIFO not made yet
                    raise
            if proc.poll() is not None:
                raise AssertionError(f"the run ended (rc {proc.returncode}) while held at {self.spec}")
            if time.monotonic() > deadline:
                raise AssertionError(f"held run never opened {self.path}.release")
            time.sleep(0.005)
        os.close(fd)
