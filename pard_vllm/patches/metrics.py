"""Prometheus metrics pard-vllm adds to vLLM's."""

from __future__ import annotations

import functools

from pard_vllm.patches.wrap import wrap_once


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

        wrap_once(SpecDecodingProm, "__init__", make_init)
        wrap_once(SpecDecodingProm, "observe", make_observe)
