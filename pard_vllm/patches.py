"""Every change pard-vllm makes to vLLM, one named class each.

Each patch says which upstream function it wraps and why. They wrap (call the
original) rather than copy upstream code, so vLLM fixes keep flowing in, and
``apply()`` is idempotent because vLLM loads general plugins in every process
(API server, engine core, workers), sometimes more than once.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from typing import Any

from vllm.logger import init_logger

from pard_vllm.confidence_cut import THRESHOLD_ATTR
from pard_vllm.config import step_count_from_env

# Under the "vllm" logger so vLLM's handlers and VLLM_LOGGING_LEVEL apply.
logger = init_logger("vllm.pard_vllm." + __name__.rsplit(".", 1)[-1])

#: Attribute we attach to vLLM's SpeculativeConfig to mark it as ours. It is a
#: plain instance attribute, so it travels with the config when vLLM pickles
#: it to the engine-core and worker processes.
OPTIONS_ATTR = "pard_options"
#: Attribute we attach to vLLM's DraftTokenIds: the requests whose drafts were looked up.
LOOKED_UP_ATTR = "pard_looked_up"


def _wrap_once(owner: Any, name: str, make_wrapper) -> None:
    original = getattr(owner, name)
    if getattr(original, "__pard_patched__", False):
        return
    wrapper = make_wrapper(original)
    wrapper.__pard_patched__ = True
    setattr(owner, name, wrapper)


class SpeculativeConfigPatch:
    """Wraps ``EngineArgs.create_speculative_config``.

    Why: vLLM validates ``method`` against a closed list, so ``"pard"`` must be
    translated before vLLM's ``SpeculativeConfig`` sees it. We turn it (or a
    method-less config whose draft is a PARD checkpoint) into ``draft_model`` +
    ``parallel_drafting`` for vLLM, validate everything up front with one-line
    errors, and tag the result with our options so the runner picks our
    proposer. This single entry point serves ``vllm serve``, ``LLM(...)`` and
    ``vllm bench``.
    """

    @staticmethod
    def apply() -> None:
        from vllm.engine.arg_utils import EngineArgs

        def make(original):
            @functools.wraps(original)
            def create_speculative_config(self, target_model_config, target_parallel_config):
                from pard_vllm.config import (PardConfigError, check_same_vocabulary,
                                              check_vocab_size, resolve_pard_config, wants_pard)

                spec = dict(self.speculative_config or {})
                if self.spec_method is not None and "method" not in spec:
                    spec["method"] = self.spec_method
                if self.spec_model is not None and "model" not in spec:
                    spec["model"] = self.spec_model
                if self.spec_tokens is not None and "num_speculative_tokens" not in spec:
                    spec["num_speculative_tokens"] = self.spec_tokens
                if not spec or not wants_pard(spec):
                    return original(self, target_model_config, target_parallel_config)
                vllm_kwargs, options = resolve_pard_config(spec)
                check_vocab_size(target_model_config.get_vocab_size(), options)
                self.speculative_config = vllm_kwargs
                self.spec_method = self.spec_model = self.spec_tokens = None
                try:
                    config = original(self, target_model_config, target_parallel_config)
                except ValueError as err:  # keep vLLM's reason, on one line
                    raise PardConfigError(" ".join(str(err).split())) from None
                check_same_vocabulary(target_model_config, config.draft_model_config, options.model)
                setattr(config, OPTIONS_ATTR, options)
                logger.info("pard-vllm: PARD drafting with %s, K=%d",
                            options.model, options.num_speculative_tokens)
                return config

            return create_speculative_config

        _wrap_once(EngineArgs, "create_speculative_config", make)


class DrafterPatch:
    """Wraps ``GPUModelRunner.__init__`` (the CPU runner inherits it).

    Why: the runner constructs vLLM's ``DraftModelProposer`` for every
    draft-model config. When the config carries our options we swap in
    ``PardProposer`` (a subclass, so the runner's isinstance checks and KV
    cache plumbing are unchanged) before the model is loaded. A config without
    our tag, e.g. vLLM's native ``parallel_drafting``, is left alone.
    """

    @staticmethod
    def apply() -> None:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        def make(original):
            @functools.wraps(original)
            def __init__(self, vllm_config, device, *args, **kwargs):
                original(self, vllm_config, device, *args, **kwargs)
                spec = vllm_config.speculative_config
                options = getattr(spec, OPTIONS_ATTR, None) if spec is not None else None
                if options is None or not hasattr(self, "drafter"):
                    return
                from pard_vllm.proposer import PardProposer

                self.drafter = PardProposer(vllm_config, self.device, runner=self, options=options)

            return __init__

        _wrap_once(GPUModelRunner, "__init__", make)


class SpeculativeConfigArgPatch:
    """Wraps ``EngineArgs.add_cli_args`` to replace the ``--speculative-config``
    argument's type.

    Why: upstream reports malformed JSON as "Value {...} cannot be converted
    to <function loads>", which neither says where the JSON broke nor how to
    write it. Ours names the position and shows a correct example.
    """

    @staticmethod
    def parse(value: str):
        if value in ("", "None"):
            return None
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as err:
            raise argparse.ArgumentTypeError(
                f"malformed JSON ({err.msg} at character {err.pos}); quote keys and strings with "
                "double quotes, e.g. '{\"method\": \"pard\", \"model\": \"DRAFT\", "
                "\"num_speculative_tokens\": 8}'") from None
        if not isinstance(parsed, dict):
            raise argparse.ArgumentTypeError(
                f"expected a JSON object like '{{\"method\": \"pard\", ...}}', got {type(parsed).__name__}")
        return parsed

    @staticmethod
    def apply() -> None:
        from vllm.engine.arg_utils import EngineArgs

        def make(original):
            @functools.wraps(original)
            def add_cli_args(parser, *args, **kwargs):
                parser = original(parser, *args, **kwargs)
                for action in parser._actions:
                    if action.dest == "speculative_config":
                        action.type = SpeculativeConfigArgPatch.parse
                return parser

            return staticmethod(add_cli_args)

        original = EngineArgs.__dict__["add_cli_args"].__func__
        if getattr(original, "__pard_patched__", False):
            return
        wrapped = make(original)
        wrapped.__func__.__pard_patched__ = True
        EngineArgs.add_cli_args = wrapped


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

        _wrap_once(rejection_sampler, "expand_batch_to_tokens", make)


class ZeroDraftSamplePatch:
    """Wraps ``GPUModelRunner._sample`` (the CPU runner inherits it).

    Why: once a speculative config is set, vLLM sends every step through the
    rejection sampler, even a step in which no request has a draft. With
    adaptive K that is the common case at large batches (K = 0, "do not
    speculate"), and the rejection sampler's recovered-token pass is not free:
    measured on this 2-core CPU at batch 4, T = 0.7, it took 5.8 ms of a 55 ms
    step for nothing. With zero drafts its result is the plain sampler's
    (argmax at T = 0; one draw from the target's processed distribution
    otherwise), so such steps go to ``self.sampler``. Steps that ask for
    logprobs keep vLLM's path (the two paths lay logprobs out differently).
    """

    @staticmethod
    def apply() -> None:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        def make(original):
            @functools.wraps(original)
            def _sample(self, logits, spec_decode_metadata, *args, **kwargs):
                if (spec_decode_metadata is not None and spec_decode_metadata.max_spec_len == 0
                        and self.input_batch.sampling_metadata.max_num_logprobs is None):
                    self.input_batch.update_async_output_token_ids()  # as the original does first
                    return self.sampler(logits=logits,
                                        sampling_metadata=self.input_batch.sampling_metadata)
                return original(self, logits, spec_decode_metadata, *args, **kwargs)

            return _sample

        _wrap_once(GPUModelRunner, "_sample", make)


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

        _wrap_once(GPUModelRunner, "_bookkeeping_sync", make)


class AdaptiveKPatch:
    """Wraps ``Scheduler.__init__``, ``Scheduler.schedule`` and
    ``Scheduler.make_spec_decoding_stats`` (the async scheduler inherits all three).

    Why: vLLM's dynamic speculation reads K from a hand-written batch-size
    table (``scheduler.dynamic_sd_lookup[batch_size]``). With
    ``"adaptive": "goodput"`` the config asks vLLM for a trivial table (which
    turns on its variable-K paths) and this patch puts a
    ``GoodputController`` in the table's place, then feeds it what the
    scheduler already knows: each request's drafted/accepted counts (from the
    rejection sampler's results) and the wall time between scheduling steps
    against the tokens scheduled (the real cost of a step on this hardware).
    Each scheduler output also carries the controller's cut threshold for the
    drafter (``pard_vllm.confidence_cut``, ``pard_vllm.prompt_lookup.LookupCut``;
    read by ``DraftStepPatch``).
    """

    @staticmethod
    def apply() -> None:
        import time

        from vllm.v1.core.sched.scheduler import Scheduler

        def make_init(original):
            @functools.wraps(original)
            def __init__(self, vllm_config, *args, **kwargs):
                original(self, vllm_config, *args, **kwargs)
                self._pard_controller = None
                self._pard_last_step = None
                self._pard_k = (0, 0)  # K of the previous and of this step
                self._pard_looked_up = frozenset()  # requests whose last drafts were looked up
                spec = vllm_config.speculative_config
                options = getattr(spec, OPTIONS_ATTR, None) if spec is not None else None
                if options is None or options.adaptive != "goodput" or self.dynamic_sd_lookup is None:
                    return  # off, or vLLM disabled variable K (e.g. data parallel)
                from pard_vllm.adaptive import GoodputController

                self._pard_controller = GoodputController(
                    max_k=self.num_spec_tokens, min_k=options.min_speculative_tokens,
                    explore=options.adaptive_explore, margin=options.adaptive_margin,
                    guard=options.adaptive_guard)
                self.dynamic_sd_lookup = self._pard_controller
                self._pard_log_steps = step_count_from_env("PARD_VLLM_ADAPTIVE_LOG_STEPS")
                logger.info("pard-vllm: goodput-adaptive K in [%d, %d]",
                            options.min_speculative_tokens, self.num_spec_tokens)

            return __init__

        def make_schedule(original):
            @functools.wraps(original)
            def schedule(self, *args, **kwargs):
                controller = getattr(self, "_pard_controller", None)
                if controller is None:
                    return original(self, *args, **kwargs)
                now = time.perf_counter()
                if self._pard_last_step is not None:
                    started, (batch, tokens, k, verifying, prefill) = self._pard_last_step
                    controller.observe_step(batch, tokens, k, seconds=now - started, verifying=verifying,
                                            prefill=prefill)
                output = original(self, *args, **kwargs)
                tokens, batch = output.total_num_scheduled_tokens, len(output.num_scheduled_tokens)
                # Decode tokens: one per request plus the drafts it verifies; the rest is prompt.
                decode = min(tokens, batch + sum(map(len, output.scheduled_spec_decode_tokens.values())))
                step = (batch, decode, output.num_spec_tokens_to_schedule,
                        bool(output.scheduled_spec_decode_tokens), tokens - decode)
                self._pard_k = (self._pard_k[1], step[2])
                # What a draft must be worth to be verified this step: for the
                # confidence cut and the prompt lookup's (pard_vllm.prompt_lookup.LookupCut).
                setattr(output, THRESHOLD_ATTR, controller.cut_threshold(step[0], step[2]))
                self._pard_last_step = (now, step) if tokens else None
                if sum(controller.history.values()) >= self._pard_log_steps:
                    logger.info("pard-vllm adaptive: %s", controller.summary())
                    controller.history.clear()
                    controller.reasons.clear()
                return output

            return schedule

        def make_stats(original):
            @functools.wraps(original)
            def make_spec_decoding_stats(self, spec_decoding_stats, num_draft_tokens,
                                         num_accepted_tokens, *args, **kwargs):
                controller = getattr(self, "_pard_controller", None)
                if controller is not None and num_draft_tokens:
                    # The drafts verified now were drafted at the previous step's K;
                    # fewer arrived when the drafter cut them (or vLLM trimmed them).
                    # Looked-up drafts are not PARD's: priced apart (DraftSourcePatch).
                    width = self._pard_k[0]
                    req_id = kwargs.get("request_id", args[1] if len(args) > 1 else None)
                    controller.observe_request(num_draft_tokens, num_accepted_tokens,
                                               width if width >= num_draft_tokens else None,
                                               looked_up=req_id in self._pard_looked_up)
                return original(self, spec_decoding_stats, num_draft_tokens,
                                num_accepted_tokens, *args, **kwargs)

            return make_spec_decoding_stats

        _wrap_once(Scheduler, "__init__", make_init)
        _wrap_once(Scheduler, "schedule", make_schedule)
        _wrap_once(Scheduler, "make_spec_decoding_stats", make_stats)


class DraftStepPatch:
    """Wraps ``GPUModelRunner.propose_draft_token_ids`` (the CPU runner inherits it).

    Why, three times over:

    * Under the adaptive controller the drafter cuts drafts (PARD's with
      ``"confidence_threshold": "auto"``, the prompt lookup's always) at a
      threshold the scheduler's controller computes every step, and
      the scheduler may be in another process (vLLM's CPU build always runs the
      worker in its own). The scheduler output is what crosses over each step,
      so the threshold rides on it and is handed to the drafter here.
    * A step the controller gave K = 0 (``"idle_draft": "skip"``, sync
      scheduling) that verifies no drafts needs nothing from the draft but a
      note of where each request's draft fell behind. vLLM would first build
      the draft's inputs (next tokens per request, positions, metadata): about
      1 ms per step at batch 16-64 on this CPU (``benchmarks/k0_overhead.py
      --breakdown``), 1% of a plain step. Such steps go straight to
      ``PardProposer.idle_step`` (which may still send the prompt lookup's drafts).
    * The prompt lookup (``pard_vllm.prompt_lookup``) needs this step's sampled
      tokens, which vLLM appends to its host token table only after drafting;
      they are handed to the drafter here.
    """

    @staticmethod
    def apply() -> None:
        import inspect

        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        def make(original):
            signature = inspect.signature(original)

            @functools.wraps(original)
            def propose_draft_token_ids(self, scheduler_output, *args, **kwargs):
                drafter = getattr(self, "drafter", None)
                if hasattr(drafter, "cut_threshold"):
                    drafter.cut_threshold = getattr(scheduler_output, THRESHOLD_ATTR, None)
                if getattr(drafter, "_lookup", None) is not None:  # for the prompt lookup, before bookkeeping
                    drafter.sampled_token_ids = signature.bind(
                        self, scheduler_output, *args, **kwargs).arguments["sampled_token_ids"]
                if (getattr(drafter, "skip_idle_draft", False)
                        and scheduler_output.num_spec_tokens_to_schedule == 0
                        and getattr(self, "valid_sampled_token_count_event", None) is None):
                    call = signature.bind(self, scheduler_output, *args, **kwargs).arguments
                    verified = call["spec_decode_metadata"]  # vLLM's variable-K path sends zeros
                    if verified is None or not any(verified.num_draft_tokens):
                        self._draft_probs = self._draft_prob_req_ids = None
                        positions = self._get_positions(scheduler_output.total_num_scheduled_tokens)
                        return drafter.idle_step(positions, call["common_attn_metadata"])
                return original(self, scheduler_output, *args, **kwargs)

            return propose_draft_token_ids

        _wrap_once(GPUModelRunner, "propose_draft_token_ids", make)


class DraftSourcePatch:
    """Wraps ``GPUModelRunner.take_draft_token_ids`` and ``Scheduler.update_draft_token_ids``.

    Why: the adaptive controller (scheduler) learns PARD's acceptance per draft
    position to choose K, and the prompt lookup's drafts, accepted far more
    often where a request repeats itself, would make PARD look better than it
    is: at batch 16 that made the controller draft where plain decoding was
    faster. The drafter knows which requests' drafts it looked up; the list
    rides back on vLLM's ``DraftTokenIds`` (a plain dataclass, pickled whole
    between the worker and the scheduler, so an extra attribute travels) and
    the scheduler keeps it until those drafts are verified, one step later.
    """

    @staticmethod
    def apply() -> None:
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        def make_take(original):
            @functools.wraps(original)
            def take_draft_token_ids(self, *args, **kwargs):
                drafts = original(self, *args, **kwargs)
                looked_up = getattr(getattr(self, "drafter", None), "looked_up_req_ids", None)
                if drafts is not None and looked_up:
                    setattr(drafts, LOOKED_UP_ATTR, list(looked_up))
                return drafts

            return take_draft_token_ids

        def make_update(original):
            @functools.wraps(original)
            def update_draft_token_ids(self, draft_token_ids, *args, **kwargs):
                if hasattr(self, "_pard_looked_up"):
                    self._pard_looked_up = frozenset(getattr(draft_token_ids, LOOKED_UP_ATTR, ()))
                return original(self, draft_token_ids, *args, **kwargs)

            return update_draft_token_ids

        _wrap_once(GPUModelRunner, "take_draft_token_ids", make_take)
        _wrap_once(Scheduler, "update_draft_token_ids", make_update)


class DraftLengthMetricsPatch:
    """Wraps ``SpecDecodingProm.__init__`` and ``SpecDecodingProm.observe``.

    Why: with adaptive K or the confidence cut, how long the drafts were is
    what an operator wants to watch, and vLLM's Prometheus counters only give
    totals. The per-step stats vLLM already ships from the scheduler to the
    front end carry ``num_draft_tokens_per_pos`` (drafts reaching position i),
    which vLLM does not export; drafts of length exactly L are
    ``per_pos[L-1] - per_pos[L]``, so a histogram of verified draft lengths
    ``vllm:pard_draft_length`` (buckets 1..K; ``_count`` = drafts, ``_sum`` =
    draft tokens) comes out exact, with no new data crossing processes.
    Request-steps that drafted nothing (K = 0) are the generated tokens not
    accounted for by drafts: ``generation_tokens - accepted - num_drafts``.
    """

    @staticmethod
    def apply() -> None:
        import prometheus_client
        from vllm.v1.metrics.utils import create_metric_per_engine
        from vllm.v1.spec_decode.metrics import SpecDecodingProm

        def make_init(original):
            @functools.wraps(original)
            def __init__(self, speculative_config, labelnames, per_engine_labelvalues, *args, **kwargs):
                original(self, speculative_config, labelnames, per_engine_labelvalues, *args, **kwargs)
                self._pard_length = None
                if not self.spec_decoding_enabled or speculative_config is None:
                    return
                k = speculative_config.num_speculative_tokens
                self._pard_length = create_metric_per_engine(prometheus_client.Histogram(
                    name="vllm:pard_draft_length",
                    documentation="Draft tokens verified per request-step that drafted (pard-vllm).",
                    labelnames=labelnames, buckets=[float(n) for n in range(1, k + 1)]),
                    per_engine_labelvalues)

            return __init__

        def make_observe(original):
            @functools.wraps(original)
            def observe(self, spec_decoding_stats, engine_idx=0, *args, **kwargs):
                original(self, spec_decoding_stats, engine_idx, *args, **kwargs)
                per_pos = getattr(spec_decoding_stats, "num_draft_tokens_per_pos", None)
                if getattr(self, "_pard_length", None) is None or not per_pos:
                    return
                histogram = self._pard_length[engine_idx]
                for length, (reached, longer) in enumerate(zip(per_pos, [*per_pos[1:], 0]), start=1):
                    for _ in range(reached - longer):
                        histogram.observe(length)

            return observe

        _wrap_once(SpecDecodingProm, "__init__", make_init)
        _wrap_once(SpecDecodingProm, "observe", make_observe)


ALL_PATCHES = (CpuReservedCoreDefault, SpeculativeConfigPatch, DrafterPatch, SpeculativeConfigArgPatch,
               CpuExpandBatchToTokensPatch, CpuSeededChunkedPrefillPatch, ZeroDraftSamplePatch,
               AdaptiveKPatch, DraftStepPatch, DraftSourcePatch, DraftLengthMetricsPatch)


def apply() -> None:
    for patch in ALL_PATCHES:
        patch.apply()
