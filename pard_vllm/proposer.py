"""PardProposer: K draft tokens from ONE forward pass of a PARD draft model.

It plugs into vLLM's model runner where vLLM's ``DraftModelProposer`` would
(the runner keeps treating it as a draft-model proposer: same KV-cache group,
same load path, same rejection sampler). What is ours is the draft batch
(``pard_vllm.draft_batch``): accepted tokens, then the new token and K-1
mask tokens, their positions and KV slots. The base class then runs the single
forward and reads the K drafts at the sample indices we return; with
``draft_sampling="probabilistic"`` it samples them at each request's
temperature and keeps their probabilities for the rejection sampler.

Interface (vLLM's duck-typed proposer API): ``__init__(vllm_config, device,
runner)``, ``load_model(target_model)``, ``propose(...)``, ``dummy_run(n)``.
"""

from __future__ import annotations

import inspect

import torch
from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.spec_decode.draft_model import DraftModelProposer
from vllm.v1.spec_decode.utils import compute_new_slot_mapping, extend_all_queries_by_N

from pard_vllm import confidence_cut
from pard_vllm.adaptive import lengths_from_confidence
from pard_vllm.allocator import HeapTrimmer
from pard_vllm.config import PardOptions
from pard_vllm.draft_batch import build_draft_batch
from pard_vllm.draft_catchup import DraftLag, cap_lags, prepend_catchup
from pard_vllm.head_vocab import SubsetHead
from pard_vllm.prompt_lookup import LookupCut, PromptLookup, one_hot_rows, request_context

# Under the "vllm" logger so vLLM's handlers and VLLM_LOGGING_LEVEL apply.
logger = init_logger("vllm.pard_vllm." + __name__.rsplit(".", 1)[-1])
#: vLLM calls propose() with keywords; binding them to names once per step
#: costs microseconds, building the signature each time ~50 us.
_PROPOSE_SIGNATURE = inspect.signature(DraftModelProposer.propose)


class PardProposer(DraftModelProposer):
    def __init__(self, vllm_config: VllmConfig, device: torch.device, runner=None,
                 options: PardOptions | None = None):
        super().__init__(vllm_config=vllm_config, device=device, runner=runner)
        self.runner = runner  # its token table feeds the catch-up after skipped steps
        if not self.parallel_drafting:
            raise ValueError("PardProposer needs parallel_drafting=True (set by the pard config)")
        self.options = options
        # The mask id was validated from config.json before the engine started;
        # the base class read the same key into parallel_drafting_token_id.
        if options is not None and options.mask_token_id is not None:
            self.parallel_drafting_token_id = options.mask_token_id
        # Per-request lengths need the scheduler to accept ragged drafts, which
        # vLLM's async scheduling does not (it pre-allocates K placeholders).
        self.confidence_threshold = options.confidence_threshold if options is not None else None
        if self.confidence_threshold is not None and vllm_config.scheduler_config.async_scheduling:
            logger.warning("PARD: confidence_threshold needs sync scheduling; ignored "
                           "(start with --no-async-scheduling to use it)")
            self.confidence_threshold = None
        self._confidence: torch.Tensor | None = None
        # "auto": the drafter's calibrated cut; the threshold arrives with each
        # step's scheduler output (patches.DraftStepPatch).
        self._cut = confidence_cut.ConfidenceCut() if self.confidence_threshold == "auto" else None
        self.cut_threshold: float | None = None
        self._warned_no_cut = False
        # K = 0 steps skip the draft forward (pard_vllm.draft_catchup). Needs the
        # committed tokens on the host, which async scheduling does not keep.
        self.skip_idle_draft = (options is not None and options.idle_draft == "skip" and runner is not None
                                and not vllm_config.scheduler_config.async_scheduling)
        self._lag = DraftLag()
        # Freed per-step tensors otherwise stay resident (pard_vllm/allocator.py).
        self._heap = HeapTrimmer()
        self._head: SubsetHead | None = None  # set in load_model when the draft has a head vocabulary
        # Prompt lookup reads vLLM's host token table, which async scheduling fills with placeholders.
        self._lookup: PromptLookup | None = None
        if options is not None and options.prompt_lookup:
            if vllm_config.scheduler_config.async_scheduling or runner is None:
                logger.warning("PARD: prompt_lookup needs sync scheduling; off "
                               "(start with --no-async-scheduling to use it)")
            else:
                self._lookup = PromptLookup(options.prompt_lookup_max)
        # The configured K: vLLM overwrites num_speculative_tokens with each step's.
        self._max_k = self.num_speculative_tokens
        self._lookup_cut = LookupCut(self._max_k) if self._lookup is not None else None
        self.sampled_token_ids = None  # this step's sampled tokens, set by patches.DraftStepPatch
        self.looked_up_req_ids: list[str] = []  # this step's looked-up rows (patches.DraftSourcePatch)
        logger.info("PARD: %d draft tokens per forward, mask token %d, %s drafts",
                    self.num_speculative_tokens, self.parallel_drafting_token_id,
                    self.speculative_config.draft_sample_method)

    def set_inputs_first_pass(
        self,
        target_token_ids: torch.Tensor,
        next_token_ids: torch.Tensor,
        target_positions: torch.Tensor,
        target_hidden_states: torch.Tensor,
        token_indices_to_sample: torch.Tensor | None,
        cad: CommonAttentionMetadata,
        num_rejected_tokens_gpu: torch.Tensor | None,
    ) -> tuple[int, torch.Tensor, CommonAttentionMetadata]:
        """Replaces the base class's copy-and-expand kernel with our layout."""
        # This step's K: the configured one, or what the adaptive controller
        # chose (vLLM sets it in propose() before calling us; 0 = no drafts,
        # the forward then only keeps the draft's KV cache in step).
        k = self.num_speculative_tokens
        if self.skip_idle_draft and self._lag.behind:
            target_token_ids, target_positions, cad = self._catch_up(
                target_token_ids, target_positions, cad, k)
        batch = build_draft_batch(
            target_token_ids=target_token_ids,
            target_positions=target_positions,
            next_token_ids=next_token_ids,
            query_start_loc=cad.query_start_loc,
            num_rejected=num_rejected_tokens_gpu,
            mask_token_id=self.parallel_drafting_token_id,
            k=k,
        )
        num_tokens = batch.input_ids.shape[0]
        self.input_ids[:num_tokens] = batch.input_ids
        self._set_positions(num_tokens, batch.positions)
        self.is_rejected_token_mask[:num_tokens] = batch.is_rejected
        self.is_masked_token_mask[:num_tokens] = batch.is_mask

        assert self.block_size > 0, "block_size has not been initialized."
        # Rejected padding slots and positions past max_model_len map to the
        # padding slot, so they never write the KV cache.
        slot_mapping = compute_new_slot_mapping(
            cad=cad,
            new_positions=self.positions[:num_tokens],
            is_rejected_token_mask=self.is_rejected_token_mask[:num_tokens],
            block_size=self.block_size,
            num_new_tokens=k,
            max_model_len=self.max_model_len,
        )
        new_cad = extend_all_queries_by_N(cad, N=k, arange=self.arange, new_slot_mapping=slot_mapping)
        return num_tokens, batch.sample_indices, new_cad

    def _first_positions(self, target_positions: torch.Tensor, cad) -> list[int]:
        return target_positions[cad.query_start_loc[:-1].long()].tolist()

    def _catch_up(self, target_token_ids, target_positions, cad, k):
        """Re-feed the tokens the draft missed on skipped steps (see draft_catchup)."""
        first = self._first_positions(target_positions, cad)
        req_ids = self.runner.input_batch.req_ids[:len(first)]
        lags = self._lag.take(req_ids, first)
        self._lag.forget_finished(self.runner.requests)
        room = self.input_ids.shape[0] - target_token_ids.shape[0] - len(first) * k
        lags = cap_lags(lags, max(room, 0))
        if not any(lags):
            return target_token_ids, target_positions, cad
        return prepend_catchup(target_token_ids, target_positions, cad, lags,
                               self.runner.input_batch.token_ids_cpu, first)

    def load_model(self, target_model) -> None:
        super().load_model(target_model)
        ids = self.options.head_vocab_ids if self.options is not None else None
        if not ids:
            return
        reason = SubsetHead.unsupported_reason(self.model)
        if reason is not None:
            logger.warning("PARD: head_vocab ignored (%s); drafting over the full vocabulary", reason)
            return
        self._head = SubsetHead(self.model, ids)
        logger.info("PARD: draft logits over %d of %d ids (head_vocab)", len(ids), self._head.vocab_size)

    def _greedy_sample(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self._head is not None:
            logits = self._head.logits(hidden_states)
            if self.confidence_threshold is not None:
                self._confidence, columns = logits.float().softmax(dim=-1).max(dim=-1)
            else:
                columns = logits.argmax(dim=-1)
            return self._head.to_target(columns)
        if self.confidence_threshold is None:
            return super()._greedy_sample(hidden_states)
        probs = self.model.compute_logits(hidden_states).float().softmax(dim=-1)
        confidence, token_ids = probs.max(dim=-1)
        self._confidence = confidence
        return token_ids

    def _draft_token_probs(self, hidden_states, sampling_metadata):
        """vLLM's draft sampling; with a head vocabulary the distribution is
        zero outside it (the rejection sampler sees the true draft q)."""
        if self._head is None:
            return super()._sample_draft_tokens(hidden_states, sampling_metadata)
        if not self._enable_probabilistic_draft_probs or sampling_metadata.all_greedy:
            return self._greedy_sample(hidden_states), None
        return self._sample_from_logits(self._head.full_logits(hidden_states), sampling_metadata)

    def _sample_draft_tokens(self, hidden_states, sampling_metadata):
        self._confidence = None
        token_ids, probs = self._draft_token_probs(hidden_states, sampling_metadata)
        if self.confidence_threshold is not None and probs is not None:
            # Sampled drafts: the draft's probability of the token it drew.
            self._confidence = probs.gather(-1, token_ids.view(-1, 1).long()).squeeze(-1)
        return token_ids, probs

    def propose(self, *args, **kwargs):
        """vLLM's propose; with ``confidence_threshold`` each request's drafts
        are cut where the running product of the draft's own probabilities
        drops below it, or with "auto" where the calibrated estimate drops
        below the controller's threshold (``pard_vllm.confidence_cut``);
        ragged lists, which vLLM's sync scheduler accepts. The prompt lookup
        (``pard_vllm.prompt_lookup``) replaces a request's drafts where its
        text repeats. A step with K = 0 runs no draft forward (``idle_draft:
        "skip"``), nor does one where the lookup found every request's
        continuation."""
        self._heap.step()
        call = _PROPOSE_SIGNATURE.bind(self, *args, **kwargs).arguments
        self._settle(call)
        k, cad = call["num_speculative_tokens"], call["common_attn_metadata"]
        contexts = self._lookup_contexts(cad.batch_size())
        if k == 0 and self.skip_idle_draft:
            return self._lookup_only(self._skip(call["target_positions"], cad), contexts)
        matches = [self._lookup.match(c) for c in contexts] if contexts is not None else None
        if matches is not None and k and self.skip_idle_draft:
            width = self._lookup_width(k, sampled=False)
            found = self._cut_lookup([self._lookup.trusted(c, width, m) for c, m in zip(contexts, matches)],
                                     matches)
            if all(found):  # PARD's drafts would all be replaced: no draft forward
                self._skip(call["target_positions"], cad)
                return self._send_lookups(found, matches)
        drafts = super().propose(*args, **kwargs)
        if drafts.shape[1] == 0:
            return self._lookup_only(drafts, contexts)
        found = self._look_up(drafts, contexts, matches) if contexts is not None else None
        if self._confidence is None:
            if not found or not any(found):
                return drafts
            lengths = [drafts.shape[1]] * drafts.shape[0]
        else:
            confidence = self._confidence.view(-1, drafts.shape[1])
            self._confidence = None
            fixed = [len(row) for row in found] if found is not None else None
            if self._cut is not None:
                # No threshold from the scheduler (vLLM turned variable K off, e.g.
                # data parallel): every draft is sent and still calibrated on.
                if self.cut_threshold is None and not self._warned_no_cut:
                    logger.warning("PARD: no cut threshold from the scheduler (is adaptive \"goodput\" "
                                   "on?); drafting without the confidence cut")
                    self._warned_no_cut = True
                lengths = self._cut.lengths(self._req_ids(drafts.shape[0]), confidence,
                                            self.cut_threshold or 0.0, fixed=fixed)
            else:
                lengths = lengths_from_confidence(confidence, self.confidence_threshold).tolist()
        rows = drafts.tolist()
        if found is None:
            return [row[:n] for row, n in zip(rows, lengths)]
        return [looked or row[:n] for row, n, looked in zip(rows, lengths, found)]

    def _lookup_width(self, k: int, sampled: bool) -> int:
        """How far a looked-up continuation may reach: the controller's K caps
        PARD's drafts, whose tail is seldom accepted, not the lookup's, which
        the lookup cut prices on its own (adaptive only). Sampled drafts stay
        within K: their probabilities come as a [batch, K, vocab] tensor."""
        return self._max_k if self.cut_threshold is not None and not sampled else k

    def _cut_lookup(self, found: list[list[int]], matches: list) -> list[list[int]]:
        """Each looked-up continuation as far as it pays (``LookupCut``; only
        under the adaptive controller, which sends the threshold)."""
        if self.cut_threshold is None:
            return found
        return [row[:self._lookup_cut.length(match.m, len(row), self.cut_threshold)] if row else row
                for row, match in zip(found, matches)]

    def _send_lookups(self, found: list[list[int]], matches: list) -> list[list[int]]:
        """Book the looked-up rows: the lookup cut settles them next step, and
        the scheduler's controller keeps them out of PARD's acceptance."""
        req_ids = self._req_ids(len(found))
        self.looked_up_req_ids = [r for r, row in zip(req_ids, found) if row]
        for req_id, row, match in zip(req_ids, found, matches):
            if row:
                self._lookup_cut.sent(req_id, match.m)
        return found

    def _lookup_contexts(self, batch_size: int) -> list | None:
        """Each request's tokens after this step, for the prompt lookup (None: no lookup)."""
        sampled, self.sampled_token_ids = self.sampled_token_ids, None
        self.looked_up_req_ids = []
        if self._lookup is None or sampled is None:
            return None
        table = self.runner.input_batch
        sampled = sampled.tolist() if torch.is_tensor(sampled) else sampled
        return [request_context(table.token_ids_cpu[i], int(table.num_tokens_no_spec[i]), sampled[i])
                for i in range(batch_size)]

    def _look_up(self, drafts: torch.Tensor, contexts: list, matches: list) -> list[list[int]]:
        """Each request's looked-up continuation over PARD's drafts ([] = PARD's
        stay); a looked-up request sends only those (PARD's tail after them is
        not about the looked-up tokens). With sampled drafts their first K
        replace PARD's in place and their draft probabilities become point masses."""
        probs = self._last_draft_probs
        found, point_from = self._lookup.continuations(
            contexts, drafts[:, 0].tolist(), matches, self._lookup_width(drafts.shape[1], probs is not None))
        found = self._send_lookups(self._cut_lookup(found, matches), matches)
        if probs is not None and any(found):
            for i, row in enumerate(found):
                if row:
                    drafts[i, :len(row)] = torch.tensor(row, dtype=drafts.dtype)
            one_hot_rows(probs, drafts, [len(row) for row in found], point_from)
        return found

    def _lookup_only(self, empty: torch.Tensor, contexts: list | None):
        """A K = 0 step (``empty``: its [batch, 0] drafts): a request whose last
        2+ tokens occurred before still sends the continuation, as far as the
        lookup cut says it pays (under the adaptive controller; a hand-written
        K = 0 means no drafts)."""
        if contexts is None or self.cut_threshold is None:
            return empty
        matches = [self._lookup.match(c) for c in contexts]
        found = self._cut_lookup([self._lookup.trusted(c, self._max_k, m) for c, m in zip(contexts, matches)],
                                 matches)
        if not any(found):
            return empty
        self._last_draft_probs = None  # no probabilities: vLLM verifies such drafts as point masses
        return self._send_lookups(found, matches)

    def idle_step(self, target_positions: torch.Tensor, cad) -> torch.Tensor:
        """A K = 0 step that verified no drafts, entered from the runner before
        vLLM builds the draft's inputs (``patches.DraftStepPatch``): the same
        as ``propose`` would do for it, without the preparation."""
        self._heap.step()
        self._settle(None)
        contexts = self._lookup_contexts(cad.batch_size())
        return self._lookup_only(self._skip(target_positions, cad), contexts)

    def _skip(self, target_positions: torch.Tensor, cad) -> torch.Tensor:
        """No draft forward this step; remember where each request's draft
        stopped so the next drafting step can catch it up."""
        first = self._first_positions(target_positions, cad)
        self._lag.skipped(self.runner.input_batch.req_ids[:len(first)], first)
        self._last_draft_probs = None
        self._confidence = None
        return torch.empty(cad.batch_size(), 0, dtype=torch.int64, device=self.device)

    def _req_ids(self, n: int) -> list[str]:
        return self.runner.input_batch.req_ids[:n]

    def _settle(self, call: dict | None) -> None:
        """Tell the confidence cut and the lookup cut what the target did with
        the drafts they sent last step: each request's query holds 1 + its
        verified drafts; vLLM passes how many of them were rejected."""
        if self._cut is None and self._lookup is None:
            return
        rejected = call.get("num_rejected_tokens_gpu") if call is not None else None
        req_ids, verified = (), None
        if rejected is not None:
            starts = call["common_attn_metadata"].query_start_loc_cpu.tolist()
            verified = [b - a - 1 for a, b in zip(starts, starts[1:])]
            req_ids, rejected = self._req_ids(len(verified)), rejected.tolist()
        for ledger in (self._cut, self._lookup_cut):
            if ledger is not None:
                ledger.begin_step(req_ids, verified, rejected)
