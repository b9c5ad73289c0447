"""Prompt-lookup drafts (corolla/client/drafting.py): what is drafted from which text. That drafts keep greedy
output unchanged through a real swarm is tested in test_smollm2.py."""

import pytest
import torch

from corolla.client.drafting import NgramDrafter


def draft(tokens, limit=10, max_ngram=4, eos=None):
    drafter = NgramDrafter(limit, max_length=10_000, eos_token_ids=None if eos is None else torch.tensor(eos),
                           max_ngram=max_ngram)
    return drafter.draft(tokens, limit)


def test_continues_the_latest_occurrence_of_the_longest_suffix():
    # "7 8" occurs twice: the latest occurrence (followed by 3) wins over the first (followed by 1).
    assert draft([7, 8, 1, 1, 7, 8, 3, 3, 7, 8]) == [3, 3, 7, 8]
    # The longest matching suffix wins: "5 7 8" was followed by 4, the shorter, later "7 8" by 9.
    assert draft([5, 7, 8, 4, 4, 7, 8, 9, 5, 7, 8]) == [4, 4, 7, 8, 9, 5, 7, 8]
    assert draft([5, 7, 8, 4, 4, 7, 8, 9, 5, 7, 8], max_ngram=2) == [9, 5, 7, 8]
    assert draft([1, 2, 3, 4, 5, 1, 2], limit=2) == [3, 4]


def test_a_new_last_token_drafts_the_rest_of_the_repeated_line():
    # Lines "x = 1 ;" repeat with a new value: after the new value 9, the line goes on as the last one did.
    x, eq, semi = 100, 101, 102
    assert draft([x, eq, 1, semi, x, eq, 2, semi, x, eq, 9]) == [semi, x, eq, 9]
    assert draft([4, 5, 6]) == []  # nothing repeats


def test_drafts_stop_before_an_end_token_and_at_the_length_limit():
    assert draft([1, 2, 3, 0, 1, 2], eos=[0]) == [3]
    assert draft([1, 2, 0, 1, 2], eos=[0]) == []
    drafter = NgramDrafter(10, max_length=8)
    ids = torch.tensor([[1, 2, 3, 4, 5, 1]])
    candidates, logits = drafter.get_candidates(ids)
    assert logits is None and candidates.tolist() == [[1, 2, 3, 4, 5, 1, 2]]  # room for the verifying step's token
    assert NgramDrafter(10, max_length=7).get_candidates(ids)[0].tolist() == ids.tolist()


def test_the_index_grows_with_the_text_and_restarts_on_another_text():
    drafter = NgramDrafter(4, max_length=10_000)
    text = [1, 2, 3, 1]
    assert drafter.draft(text, 4) == [2, 3, 1]
    text += [2, 3, 9, 1]
    assert drafter.draft(text, 4) == [2, 3, 9, 1]  # the latest occurrence, indexed from the new tokens
    assert drafter.draft([5, 6, 5], 4) == [6, 5]  # not an extension: indexed anew


def test_bad_settings_and_batches_are_refused():
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens must be at least 1"):
        NgramDrafter(0, max_length=10)
    with pytest.raises(ValueError, match="max_matching_ngram_size must be at least 1"):
        NgramDrafter(3, max_length=10, max_ngram=0)
    with pytest.raises(ValueError, match="one sequence at a time"):
        NgramDrafter(3, max_length=10).get_candidates(torch.ones(2, 4, dtype=torch.long))
