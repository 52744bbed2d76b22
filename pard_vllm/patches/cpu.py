"""Patches for vLLM's CPU build: two bugs it has as shipped (0.32) and a
default that starves a 2-core host."""

from __future__ import annotations

import functools
import os

from pard_vllm.patches.wrap import logger, wrap_once


class CpuReservedCoreDefault:
    """Sets ``VLLM_CPU_NUM_OF_RESERVED_CPU=0`` on CPU hosts with at most two usable cores.

    Upstream: ``vllm.utils.ompmultiprocessing.OMPProcessManager.__init__`` reserves
    ``local_world_size`` cores (1 for one worker) for the scheduler process and binds
    the worker's OpenMP threads to the rest, unless this variable says otherwise. On a
    2-core host that leaves the model ONE core. Measured on 2-core VMs (benchmarks/
    RESULTS.md, "Both cores for vLLM's CPU worker"): every method 1.36x-1.68x faster with
    both cores, and no stall of the scheduler in minutes-long runs. Nothing is wrapped:
    the variable is read when the engine core builds its executor, after plugins load,
    and child processes inherit it. A value the user set is never touched, and hosts
    with more cores keep vLLM's default (not measured here).
    """

    VAR = "VLLM_CPU_NUM_OF_RESERVED_CPU"
    MAX_CORES = 2

    @classmethod
    def wanted(cls, is_cpu: bool, usable_cores: int, environ) -> bool:
        return is_cpu and usable_cores <= cls.MAX_CORES and cls.VAR not in environ

    @classmethod
    def apply(cls) -> None:
        from vllm.platforms import current_platform

        cores = len(os.sched_getaffinity(0))
        if cls.wanted(current_platform.is_cpu(), cores, os.environ):
            os.environ[cls.VAR] = "0"
            logger.info("pard-vllm: %s=0 (a %d-core CPU host: the model worker gets every core; "
                        "set the variable yourself to keep vLLM's default)", cls.VAR, cores)


class CpuExpandBatchToTokensPatch:
    """Wraps ``vllm.v1.sample.rejection_sampler.expand_batch_to_tokens``.

    Why: a correctness bug in vLLM 0.32's CPU build. Without a Triton CPU
    backend, vLLM swaps the Triton ``expand_kernel`` for a C++ fallback
    (``vllm.utils.cpu_triton_utils._expand_kernel_impl``) that only handles
    int64: it converts ``output`` and ``input`` with ``.to(torch.int64)``,
    which for any other dtype makes *copies*, so float inputs are truncated and
    the result is written into a temporary that is thrown away. The caller's
    output (``x.new_empty(num_tokens)``) stays uninitialised memory.
    ``apply_sampling_constraints`` uses this to spread each request's
    temperature (float32), top_p (float32) and top_k (int32) over its draft
    positions, so at temperature > 0 the rejection sampler divides the target
    logits by garbage and masks with garbage top-p/top-k: sampled output is
    corrupted for every draft-model method (vLLM's ``draft_model``, parallel
    drafting, PARD), while greedy requests, which skip this path, are exact.

    Fix: for non-int64 CPU tensors, let the original expand the int64 request
    indices (the dtype its fallback does handle), gather ``x`` with them and
    apply the ``replace_from -> replace_to`` substitution the kernel would.
    int64 tensors and non-CPU devices go straight to the original.
    ``apply_sampling_constraints`` looks the name up as a module global on each
    call, so this works whenever vLLM registers its CPU kernel overrides.
    """

    @staticmethod
    def apply() -> None:
        import torch
        from vllm.v1.sample import rejection_sampler

        def make(original):
            @functools.wraps(original)
            def expand_batch_to_tokens(x, cu_num_tokens, num_tokens, replace_from=0, replace_to=0):
                if x.device.type != "cpu" or x.dtype == torch.int64:
                    return original(x, cu_num_tokens, num_tokens, replace_from, replace_to)
                request_ids = torch.arange(x.shape[0], dtype=torch.int64, device=x.device)
                token_to_request = original(request_ids, cu_num_tokens, num_tokens)
                expanded = x[token_to_request]
                if replace_from != replace_to:
                    expanded = torch.where(expanded == replace_from,
                                           torch.tensor(replace_to, dtype=x.dtype), expanded)
                return expanded

            return expand_batch_to_tokens

        wrap_once(rejection_sampler, "expand_batch_to_tokens", make)


class CpuSeededChunkedPrefillPatch:
    """Wraps ``GPUModelRunner._bookkeeping_sync`` (the CPU runner inherits it).

    Why: a crash in vLLM 0.32's CPU build. When a request's prompt is still
    being prefilled in chunks, the token sampled for it is discarded and, if
    the request is seeded, vLLM rewinds its generator with
    ``gen.set_offset(gen.get_offset() - 4)``. CPU generators have no offset
    ("RuntimeError: CPU Generator does not use offset"), so the engine dies:
    seen with 64 concurrent seeded requests at temperature 0.7 once the token
    budget split their prompts. Any method hits it; speculative configs make it
    likelier because they shrink the per-step token budget.

    Fix: during the call, hide the CPU generators of discarded rows from the
    original (it uses ``input_batch.generators`` only for this rewind), so
    nothing is rewound. The discarded draw is then consumed, which keeps a
    seeded request reproducible run to run for the same prompt chunking.
    """

    @staticmethod
    def apply() -> None:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        def make(original):
            @functools.wraps(original)
            def _bookkeeping_sync(self, *args, **kwargs):
                gens = self.input_batch.generators
                num_reqs = self.input_batch.num_reqs
                hidden = {}
                if gens:
                    for i in self.discard_request_mask.np[:num_reqs].nonzero()[0].tolist():
                        gen = gens.get(i)
                        if gen is not None and gen.device.type == "cpu":
                            hidden[i] = gens.pop(i)
                try:
                    return original(self, *args, **kwargs)
                finally:
                    gens.update(hidden)

            return _bookkeeping_sync

        wrap_once(GPUModelRunner, "_bookkeeping_sync", make)
