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

import torch
from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.spec_decode.draft_model import DraftModelProposer
from vllm.v1.spec_decode.utils import compute_new_slot_mapping, extend_all_queries_by_N

from pard_vllm.config import PardOptions
from pard_vllm.draft_batch import build_draft_batch

# Under the "vllm" logger so vLLM's handlers and VLLM_LOGGING_LEVEL apply.
logger = init_logger("vllm.pard_vllm." + __name__.rsplit(".", 1)[-1])


class PardProposer(DraftModelProposer):
    def __init__(self, vllm_config: VllmConfig, device: torch.device, runner=None,
                 options: PardOptions | None = None):
        super().__init__(vllm_config=vllm_config, device=device, runner=runner)
        if not self.parallel_drafting:
            raise ValueError("PardProposer needs parallel_drafting=True (set by the pard config)")
        self.options = options
        # The mask id was validated from config.json before the engine started;
        # the base class read the same key into parallel_drafting_token_id.
        if options is not None and options.mask_token_id is not None:
            self.parallel_drafting_token_id = options.mask_token_id
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
        k = self.extra_slots_per_request  # == num_speculative_tokens for PARD
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
