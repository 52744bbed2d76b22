"""Patches on the engine's step loop: what the scheduler's adaptive controller
decides and learns, what crosses to the runner with each step (the cut
threshold, this step's sampled tokens) and back (which drafts were looked up),
and the shortcuts for steps that verify or draft nothing."""

from __future__ import annotations

import functools

from pard_vllm.confidence_cut import THRESHOLD_ATTR
from pard_vllm.config import step_count_from_env
from pard_vllm.patches.wrap import LOOKED_UP_ATTR, OPTIONS_ATTR, logger, wrap_once


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
                # Only the prompt lookup's cut and the "auto" confidence cut read the
                # threshold; with neither on, it is not worth computing each step.
                self._pard_sends_threshold = options.prompt_lookup or options.confidence_threshold == "auto"
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
                if self._pard_sends_threshold:
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

        wrap_once(Scheduler, "__init__", make_init)
        wrap_once(Scheduler, "schedule", make_schedule)
        wrap_once(Scheduler, "make_spec_decoding_stats", make_stats)


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

        wrap_once(GPUModelRunner, "propose_draft_token_ids", make)


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

        wrap_once(GPUModelRunner, "take_draft_token_ids", make_take)
        wrap_once(Scheduler, "update_draft_token_ids", make_update)


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

        wrap_once(GPUModelRunner, "_sample", make)
