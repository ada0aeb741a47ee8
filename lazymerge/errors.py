"""User-facing errors.

Every failure a user can cause (a bad recipe, a broken checkpoint, an output directory in the way) is raised as
a `LazyMergeError` whose message is one line naming the file, tensor or recipe key and what is wrong. The CLI
prints that line and exits non-zero; anything else escaping is a bug in lazymerge and keeps its traceback.
"""
from __future__ import annotations


def printable(text: str) -> str:
    """`text` with control characters escaped, for one-line output of untrusted names."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class LazyMergeError(Exception):
    """Base class: the message is one self-contained line for the user.

    Messages quote untrusted text (tensor names from a stranger's header, recipe keys), so control characters are
    escaped when the message is rendered: it stays one line and cannot drive the user's terminal.
    """

    exit_code = 2

    def __str__(self) -> str:
        return printable(super().__str__())


class RecipeError(LazyMergeError):
    """The recipe (YAML or dict) is malformed, names an unknown method/key, or a parameter is out of range."""


class CheckpointError(LazyMergeError):
    """An input checkpoint is missing, malformed, unsafe or inconsistent with the other inputs."""


class OutputError(LazyMergeError):
    """The output directory cannot be written: exists, locked, inside an input, disk full."""


class MergeAborted(LazyMergeError):
    """The run was interrupted (Ctrl-C); temporary files have been removed."""

    exit_code = 130
