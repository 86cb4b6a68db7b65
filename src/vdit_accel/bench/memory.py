"""Peak-memory measurement: process RSS sampled in a thread on CPU, the CUDA allocator's peak on GPU.

Example:
    >>> with PeakMemory() as mem:
    ...     _ = bytearray(10_000_000)
    >>> mem.peak_bytes >= mem.baseline_bytes
    True
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch

_PAGE = 4096
SAMPLE_INTERVAL_S = 0.005


def current_rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc/self/statm``)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * _PAGE


class PeakMemory:
    """Context manager measuring the peak memory while its body runs.

    Attributes (after exit):
        kind (`str`): ``"cuda"`` (allocator peak) or ``"rss"`` (sampled process RSS).
        baseline_bytes (`int`): memory at entry.
        peak_bytes (`int`): the highest value seen.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.kind = "cuda" if self.device.type == "cuda" else "rss"
        self.baseline_bytes = 0
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, current_rss_bytes())
            time.sleep(SAMPLE_INTERVAL_S)

    def __enter__(self) -> PeakMemory:
        if self.kind == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_bytes = torch.cuda.memory_allocated(self.device)
        else:
            self.baseline_bytes = current_rss_bytes()
            self.peak_bytes = self.baseline_bytes
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.kind == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, current_rss_bytes())

    @property
    def delta_bytes(self) -> int:
        """Peak minus baseline: what the measured body added on top of what was already resident."""
        return self.peak_bytes - self.baseline_bytes
