"""lazymerge/testhold.py, the mechanism the fault tests stand on: it counts the awaited event, stops once at its
n-th occurrence (here, or at the driving thread's next pause), and a process reads its hold from the environment
once and does not pass it on."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import holdkit
from lazymerge import testhold

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def seen():
    got: list[dict] = []
    yield got
    testhold.arm(None)


def test_stops_once_at_the_nth_event(seen):
    testhold.arm("write", 3, action=seen.append)
    for event in ("write", "load", "write", "shard", "write", "write", "write"):
        testhold.reached(event)
    assert seen == [{"event": "write", "n": 3, "pid": os.getpid()}]


def test_event_on_another_thread_holds_at_the_next_pause(seen):
    testhold.arm("shard", 1, action=seen.append)
    testhold.reached("shard", here=False)               # a worker thread: not here
    assert seen == []
    testhold.reached("write")                           # the driving thread's next task: here
    assert len(seen) == 1
    testhold.pause()
    assert len(seen) == 1


def test_unarmed_costs_nothing_and_does_nothing():
    testhold.arm(None)
    assert not testhold.ARMED
    testhold.reached("write")
    testhold.pause()


@pytest.mark.parametrize("spec", ["write", "write:0:/x", "write:two:/x", ":1:/x", "write:1:"])
def test_malformed_spec_is_refused(spec):
    with pytest.raises(ValueError, match=testhold.ENV):
        testhold.parse(spec)


def test_read_from_the_environment_once_and_not_inherited(tmp_path):
    code = ("import os; from lazymerge import testhold as t; "
            "print(t.ARMED, t._hold.event, t._hold.n, t._hold.path, t.ENV in os.environ)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, testhold.ENV: f"trial:2:{tmp_path / 'h'}"}).stdout.split()
    assert out == ["True", "trial", "2", str(tmp_path / "h"), "False"]


def test_a_held_run_left_by_a_failed_test_is_reaped(tmp_path):
    """A test that fails between `Hold.wait` and its release/kill must not leave the run blocked for ever: the
    suite's autouse fixture calls holdkit.reap(), which kills it."""
    hold = holdkit.Hold(tmp_path, "x", 1)
    code = "from lazymerge import testhold as t; t.reached('x'); print('released')"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=hold.env(), stdout=subprocess.PIPE)
    hold.wait(proc)
    assert proc.poll() is None                     # held: it cannot go on by itself
    assert holdkit.reap() == [proc.pid]
    assert proc.returncode is not None and proc.returncode < 0
    assert proc.stdout.read() == b""               # it never passed the hold
    assert holdkit.reap() == []
