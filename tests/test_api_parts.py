"""The API's pure parts, without a swarm: stop sequences, incremental decoding, top-p, the swarm map."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from corolla.api.detokenize import ChoiceText, IncrementalDecoder, StopMatcher
from corolla.api.sampling import SamplingParams, next_tokens, top_p_filter
from corolla.api.state import build_state
from corolla.api.terminal import render_state
from corolla.net.records import PeerRecord, ServerRecord, ServerState


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return AutoTokenizer.from_pretrained(smollm2)


def feed_all(matcher: StopMatcher, pieces: list[str]) -> tuple[str, bool]:
    out = ""
    for piece in pieces:
        released, stopped = matcher.feed(piece)
        out += released
        if stopped:
            return out, True
    return out + matcher.flush(), False


def test_stop_matcher_cuts_at_the_first_stop_even_across_pieces():
    assert feed_all(StopMatcher(("END",)), ["hello E", "N", "D and more"]) == ("hello ", True)
    assert feed_all(StopMatcher(("\n\n", "Q:")), ["a Q", ":b"]) == ("a ", True)
    assert feed_all(StopMatcher(("xyz",)), ["abc x", "y", "!"]) == ("abc xy!", False)  # held, then released


def test_stop_matcher_holds_back_only_a_possible_stop_start():
    matcher = StopMatcher(("STOP",))
    assert matcher.feed("go ST") == ("go ", False)
    assert matcher.feed("ART") == ("START", False)


def test_incremental_decoding_equals_decoding_the_whole(tokenizer):
    text = "Déjà vu: naïve café — 東京 🚀 costs 3.14 €!"
    ids = tokenizer(text)["input_ids"]
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in piece for piece in pieces)  # no half characters released


def test_choice_text_ends_on_eos_and_on_stop(tokenizer):
    ids = tokenizer("The capital is Paris. Next")["input_ids"]
    choice = ChoiceText(tokenizer, (), frozenset({tokenizer.eos_token_id}))
    text = "".join(choice.push(i) for i in ids[:3]) + choice.push(tokenizer.eos_token_id)
    assert text == tokenizer.decode(ids[:3]) and choice.finish_reason == "stop" and choice.num_tokens == 4

    choice = ChoiceText(tokenizer, (".",), frozenset())
    text = ""
    for i in ids:
        text += choice.push(i)
        if choice.finish_reason:
            break
    assert text == "The capital is Paris" and choice.finish_reason == "stop"


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = top_p_filter(logits, 0.7).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    assert top_p_filter(logits, 0.01).isfinite().tolist() == [[True, False, False, False]]


def test_sampling_is_greedy_at_zero_and_repeatable_with_a_seed():
    logits = torch.randn(4, 50)
    params = SamplingParams(temperature=0)
    assert next_tokens(logits, params, params.generator()).tolist() == logits.argmax(-1).tolist()
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=3)
    draws = [next_tokens(logits, seeded, seeded.generator()).tolist() for _ in range(2)]
    assert draws[0] == draws[1]


def record(peer: str, start: int, end: int, state=ServerState.ONLINE, name="") -> PeerRecord:
    return PeerRecord(peer_id=peer, record=ServerRecord(state=state, start_block=start, end_block=end,
                                                        throughput=12.5, cache_tokens_left=4096, version="0.1.0",
                                                        public_name=name))


def test_swarm_map_finds_gaps_and_draws_them():
    records = [record("peerA", 0, 4, name="alpha"), record("peerB", 2, 6), record("peerC", 6, 8, ServerState.JOINING)]
    state = build_state("m", "m-123", 10, records, {"peerA": 0.0012, "peerB": None}, now=0.0)
    assert [s.peer_id for s in state.servers] == ["peerA", "peerB", "peerC"]
    assert [len(b.servers) for b in state.blocks] == [1, 1, 2, 2, 1, 1, 0, 0, 0, 0]
    assert state.covered_blocks == 6 and state.missing == [(6, 10)] and not state.complete
    assert state.servers[0].rtt_ms == 1.2 and state.servers[1].rtt_ms is None

    drawn = render_state(state)
    assert "6/10 blocks served; NOT served: 6..9" in drawn
    rows = {line.split("|")[0].strip(): line.split("|")[1] for line in drawn.splitlines() if line.count("|") == 2}
    assert rows["alpha"] == "████      " and rows["…peerB"] == "  ████    " and rows["…peerC"] == "      ▒▒  "
    assert rows["coverage"] == "112211!!!!"  # online servers per block; ! where none
    full = build_state("m", "m-123", 6, records[:2], {}, now=0.0)
    assert full.complete and "all 6 blocks served" in render_state(full)
