"""What an op may touch while it runs: the opened inputs, the output writer, the device, and counters."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import CheckpointError


@dataclass
class RunContext:
    """The run-time side of a merge that ops share; kernels never see it (they stay pure)."""

    sources: dict[str, Any]
    writer: Any
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    strict: bool = False
    bytes_read: int = 0
    bytes_written: int = 0
    warnings: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _warned: set = field(default_factory=set)

    def count(self, read: int = 0, written: int = 0) -> None:
        with self._lock:
            self.bytes_read += read
            self.bytes_written += written

    def non_finite(self, model: str, name: str) -> None:
        msg = f"{self.sources[model].path}: tensor '{name}' contains NaN or Inf"
        if self.strict:
            raise CheckpointError(msg + " (--strict)")
        with self._lock:
            if (model, name) not in self._warned:
                self._warned.add((model, name))
                self.warnings.append(msg)
