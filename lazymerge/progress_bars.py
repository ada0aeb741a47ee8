"""The command line's progress bars: a merge's bytes written, an evaluation's steps, and huggingface_hub's
download bars switched off with --quiet. Click draws them on stderr, so stdout keeps only results."""
from __future__ import annotations

import contextlib
import sys
from typing import Any

import click


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
