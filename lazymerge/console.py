"""The shell's console: one-line errors with an exit status, and the progress bars of `run` and `eval`.

Kept apart from the commands (cli.py) so that every command-line entry point (`lazymerge`, `lazymerge-yaml`)
reports failures and progress the same way.
"""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
from typing import Any, Callable

import click

from .errors import LazyMergeError

SIZE_HELP = "e.g. 2GiB, 1500MB, 8G (binary), or 'unlimited'"


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn LazyMergeError / Ctrl-C into one line and an exit status."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        owner = os.getpid()

        def on_term(signum: int, frame: Any) -> None:
            if os.getpid() != owner:
                # a forked child (lm-eval's bootstrap pool): SIGTERM's default action, as its parent expects when
                # it terminates it; an exception here can be lost in the child and leave the parent waiting
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            raise KeyboardInterrupt

        old = signal.signal(signal.SIGTERM, on_term)
        try:
            return fn(*args, **kwargs)
        except LazyMergeError as exc:
            click.echo(f"error: {exc}", err=True)
            exit_with(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            exit_with(130)
        finally:
            signal.signal(signal.SIGTERM, old)

    return wrapper


def exit_with(code: int) -> None:
    """Exit with `code`. Interrupted, in a process of our own (stdio not redirected by an embedding caller or a
    test runner), leave at once: temporary files are already removed, and the interpreter's normal teardown with
    torch loaded takes about a second the user would spend waiting after Ctrl-C."""
    if code == 130 and sys.stdout is sys.__stdout__ and sys.stderr is sys.__stderr__:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


class MergeBar:
    """A click progress bar over bytes written, with tensors done and an ETA."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar: Any = None
        self.last = 0

    def __call__(self, p: Any) -> None:
        if not self.enabled:
            return
        self.info = f"{p.tensors_done}/{p.tensors_total} tensors"     # before the bar: a terminal draws it at once
        if self.bar is None:
            self.bar = click.progressbar(length=max(p.bytes_total, 1), label="merging", show_eta=True,
                                         show_percent=True, file=sys.stderr,
                                         item_show_func=lambda _: self.info)
            self.bar.__enter__()
        self.bar.update(p.bytes_done - self.last, self.info)
        self.last = p.bytes_done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


class EvalBar:
    """A click progress bar over evaluation steps (layers x batches, then the head)."""

    def __init__(self, enabled: bool, label: str = "evaluating"):
        self.enabled, self.label = enabled, label
        self.bar: Any = None
        self.last = 0
        self.info = ""

    def __call__(self, p: Any) -> None:
        if not self.enabled:
            return
        if self.bar is None or p.done < self.last:
            self.close()
            self.bar = click.progressbar(length=max(p.total, 1), label=self.label, show_eta=True,
                                         file=sys.stderr, item_show_func=lambda _: self.info)
            self.bar.__enter__()
            self.last = 0
        self.info = p.stage
        self.bar.update(p.done - self.last, p.stage)
        self.last = p.done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def hub_progress(enabled: bool) -> Any:
    """huggingface_hub's download progress bars on (the default) or off (--quiet) for the command's duration."""
    @contextlib.contextmanager
    def toggled() -> Any:
        from huggingface_hub.utils import (are_progress_bars_disabled, disable_progress_bars,
                                           enable_progress_bars)

        was = are_progress_bars_disabled()
        if not enabled:
            disable_progress_bars()
        try:
            yield
        finally:
            if not enabled and not was:
                enable_progress_bars()

    return toggled()
