"""Give the memory of freed per-step tensors back to the system (glibc's malloc_trim).

Why: a speculative step allocates tensors whose sizes change from step to step
(target logits for B x (1 + K) positions, draft inputs of T + B x K tokens, draft
logits and probabilities for B x K positions). glibc serves most of them from its
heap (its mmap threshold rises with every large free, up to 32 MiB), and a heap
fragmented by ever-new sizes keeps its free pages resident. Measured with
`benchmarks/load_test.py` (64 streaming requests per round, the engine's worker
process), RSS after each round:

* glibc defaults: +101, +66, +63, +115 MiB per round (4 rounds); a plain server: flat;
* threshold pinned at 4 MiB (``MALLOC_MMAP_THRESHOLD_=4194304``): +95, +76, +59;
* threshold pinned at 128 KiB: +89, +16, +10, i.e. the memory was free heap, not a leak
  of live objects; but every medium tensor then costs an mmap/munmap, and PARD ran
  17-20% slower at batch 4 and 16 (spec_bench, same run);
* ``malloc_trim(0)`` every ``PARD_VLLM_MALLOC_TRIM_STEPS`` draft steps (this module):
  see README, "Reliability".

``HeapTrimmer`` calls ``malloc_trim(0)`` (release the free pages of every arena) once
every N steps (a step takes 20-60 ms here; the trim's own cost inside the worker
was not measured separately). Set
``PARD_VLLM_MALLOC_TRIM_STEPS=0`` to turn it off. Not glibc (musl, macOS): no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util

from pard_vllm.config import STEP_COUNT_VARIABLES, step_count_from_env

DEFAULT_TRIM_STEPS = STEP_COUNT_VARIABLES["PARD_VLLM_MALLOC_TRIM_STEPS"][0]


def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


class HeapTrimmer:
    """Call ``step()`` once per draft step; every ``every`` steps it trims the heap."""

    def __init__(self, every: int | None = None):
        if every is None:
            every = step_count_from_env("PARD_VLLM_MALLOC_TRIM_STEPS")
        self.every = max(every, 0)
        self._trim = _malloc_trim() if self.every else None
        self.steps = 0
        self.trims = 0

    @property
    def enabled(self) -> bool:
        return self._trim is not None

    def step(self) -> None:
        if self._trim is None:
            return
        self.steps += 1
        if self.steps % self.every == 0:
            self._trim(0)
            self.trims += 1
