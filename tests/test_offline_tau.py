"""Engine-free tau (pard_vllm/training/offline_tau.py): the replayed walk and the guess table.

The end-to-end check that it equals vLLM's counters is in
tests/test_e2e_offline.py::test_offline_tau_replays_vllms_acceptance.
"""

from __future__ import annotations

import torch

from pathlib import Path

import pytest

import pard_vllm

from pard_vllm.training.offline_tau import draft_guesses, load_for_eval, replay


def test_replay_walks_the_docstring_example():
    # prompt x0..x4, answer x5..x12 (token value == index), K = 3
    tokens = torch.arange(13)
    guesses = torch.full((13, 3), 99)
    guesses[5] = torch.tensor([6, 7, 99])  # 2 accepted -> next anchor 8
    guesses[8, 0] = 42  # 0 accepted -> next anchor 9
    guesses[9] = torch.tensor([10, 11, 12])  # all 3 accepted -> anchor 12 = the last token
    r = replay(guesses, tokens, start=5, max_new=100)
    assert r == {"drafts": 3, "accepted": 5, "per_pos": [2, 2, 1]}
    # max_new stops the walk where the engine finishes the request: x5..x9 are 5 output tokens
    assert replay(guesses, tokens, start=5, max_new=5) == {"drafts": 2, "accepted": 2, "per_pos": [1, 1, 0]}
    assert replay(guesses, tokens, start=5, max_new=4)["drafts"] == 1


def test_guess_table_equals_causal_forwards_of_prefix_plus_masks(embedded):
    """guesses[a, b] must be what the draft says for x[a+b+1] when it is fed
    x[0..a] followed by b mask tokens with ordinary causal attention: the input
    the serving proposer builds."""
    from pard_vllm.training.model import load_draft, set_pard_attention

    ref = load_draft(embedded["target"], [0, 1]).eval()
    model = load_draft(embedded["target"], [0, 1]).eval()
    set_pard_attention(model)
    tokens = torch.tensor([1, 504, 3458, 314, 4093, 28, 253, 1345, 30, 216, 17, 2])
    k, mask = 3, 16
    got = draft_guesses(model, tokens, k, mask)
    head = torch.tensor([2, 17, 28, 30, 216, 253, 314, 504])
    got_sub = draft_guesses(model, tokens, k, mask, head_ids=head)
    weight = ref.get_output_embeddings().weight
    with torch.no_grad():
        for a in range(tokens.numel()):
            for b in range(k):
                if a + b >= tokens.numel():
                    assert got[a, b] == -1
                    continue
                ids = torch.cat([tokens[: a + 1], torch.full((b,), mask)])
                h = ref.model(input_ids=ids[None]).last_hidden_state[0, -1]
                assert int(got[a, b]) == int((weight @ h).argmax())
                assert int(got_sub[a, b]) == int(head[(weight[head] @ h).argmax()])


def test_drafts_it_cannot_evaluate_get_one_line_errors(tmp_path):
    with pytest.raises(SystemExit, match="not a draft folder"):
        load_for_eval(str(tmp_path / "missing"))
    # the repository's weights-only export has no embeddings: a random table would be read silently
    with pytest.raises(SystemExit, match="without embeddings"):
        load_for_eval(str(Path(pard_vllm.__file__).parent / "drafts" / "smollm2-135m-pard"))
