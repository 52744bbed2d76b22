"""Every change pard-vllm makes to vLLM, one named class each.

Each patch says which upstream function it wraps and why. They wrap (call the
original) rather than copy upstream code, so vLLM fixes keep flowing in, and
``apply()`` is idempotent because vLLM loads general plugins in every process
(API server, engine core, workers), sometimes more than once.

    config.py   "method": "pard" -> vLLM's speculative config, its CLI argument, our proposer
    cpu.py      vLLM CPU-build bugs and a 2-core default
    steps.py    the adaptive controller in the scheduler; what crosses to the runner and back each step
    metrics.py  the draft-length histogram
"""

from __future__ import annotations

from pard_vllm.patches.config import DrafterPatch, SpeculativeConfigArgPatch, SpeculativeConfigPatch
from pard_vllm.patches.cpu import CpuExpandBatchToTokensPatch, CpuReservedCoreDefault, CpuSeededChunkedPrefillPatch
from pard_vllm.patches.metrics import DraftLengthMetricsPatch
from pard_vllm.patches.steps import AdaptiveKPatch, DraftSourcePatch, DraftStepPatch, ZeroDraftSamplePatch
from pard_vllm.patches.wrap import LOOKED_UP_ATTR, OPTIONS_ATTR, wrap_once

ALL_PATCHES = (CpuReservedCoreDefault, SpeculativeConfigPatch, DrafterPatch, SpeculativeConfigArgPatch,
               CpuExpandBatchToTokensPatch, CpuSeededChunkedPrefillPatch, ZeroDraftSamplePatch,
               AdaptiveKPatch, DraftStepPatch, DraftSourcePatch, DraftLengthMetricsPatch)

__all__ = ["ALL_PATCHES", "LOOKED_UP_ATTR", "OPTIONS_ATTR", "apply", "wrap_once",
           *(patch.__name__ for patch in ALL_PATCHES)]


def apply() -> None:
    for patch in ALL_PATCHES:
        patch.apply()
