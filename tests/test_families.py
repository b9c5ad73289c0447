"""Every supported family, in one process: transformers' own layers, split over spans at uneven boundaries, give
the logits of transformers' own model (fp32, CPU), for a prefill, for decode steps with the server-side cache, for
a stateless forward, and for a left-padded batch; sessions roll back past sliding windows. (The server's engine,
batching included, is checked for every family in tests/test_engine.py.)"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from corolla.models.checkpoint import load_blocks, load_client_parts, load_config, make_span_helpers
from corolla.models.spec import SpanInputs, family_for
from tiny_models import FAMILY_CONFIGS, VOCAB, make_family

FAMILIES = list(FAMILY_CONFIGS)
SPANS = [(0, 1), (1, 3), (3, 4)]  # uneven: 1, 2 and 1 blocks
TOLERANCE = 1e-4


@pytest.fixture(scope="session")
def tiny_family(models_dir):
    made = {}

    def get(family: str):
        if family not in made:
            made[family] = make_family(family, models_dir)
        return made[family]

    return get


class SplitModel:
    """Client parts + one (blocks, helpers) per span, run in-process the way servers and the client run them."""

    def __init__(self, model_dir, spans):
        self.config = config = load_config(model_dir)
        self.spec = spec = family_for(config)
        self.parts = load_client_parts(model_dir, config, torch.float32)
        self.spans = [(load_blocks(model_dir, config, a, b, "cpu", torch.float32),
                       make_span_helpers(spec, config, "cpu", torch.float32), a) for a, b in spans]

    def new_caches(self):
        return [self.spec.make_cache(self.config) for _ in self.spans]

    @torch.inference_mode()
    def __call__(self, ids, positions, mask=None, caches=None):
        spec, config = self.spec, self.config
        hidden = spec.embed(config, self.parts, spec, ids, None, positions)
        for (blocks, helpers, first), cache in zip(self.spans, caches or [None] * len(self.spans)):
            hidden = spec.run_span(config, helpers, blocks, first, SpanInputs(hidden, positions, mask, cache))
        return spec.head(config, self.parts, spec, hidden)


def reference(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_and_decode_steps_match_transformers(family, tiny_family):
    path = tiny_family(family)
    split, ref = SplitModel(path, SPANS), reference(path)
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 13))  # 10-token prompt (longer than the sliding window) + 3 decode steps
    with torch.no_grad():
        want = ref(ids).logits
    caches = split.new_caches()
    got = [split(ids[:, :10], torch.arange(10).expand(2, -1), caches=caches)]
    for t in range(10, 13):
        got.append(split(ids[:, t:t + 1], torch.tensor([[t], [t]]), caches=caches))
    got = torch.cat(got, dim=1)
    assert (got - want).abs().max() < TOLERANCE
    # A stateless forward (no cache: the server's forward path) gives the same logits.
    stateless = split(ids, torch.arange(13).expand(2, -1))
    assert (stateless - want).abs().max() < TOLERANCE


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_matches_transformers(family, tiny_family):
    """Three prompts of different lengths, left-padded, positions from the mask (as `generate` makes them)."""
    path = tiny_family(family)
    split, ref = SplitModel(path, SPANS), reference(path)
    torch.manual_seed(2)
    lengths, total = [4, 9, 12], 12 + 3
    ids = torch.randint(3, VOCAB, (3, total))
    mask = torch.ones(3, total, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, :12 - length] = 0
        ids[row, :12 - length] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = ref(ids, attention_mask=mask, position_ids=positions).logits
    caches = split.new_caches()
    got = [split(ids[:, :12], positions[:, :12], mask[:, :12], caches)]
    for t in range(12, total):
        got.append(split(ids[:, t:t + 1], positions[:, t:t + 1], mask[:, :t + 1], caches))
    got = torch.cat(got, dim=1)
    real = mask.bool()
    assert (got - want)[real].abs().max() < TOLERANCE


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3_text", "qwen2"])
def test_sliding_window_session_rolls_back_past_the_window(family, tiny_family):
    """The server drops cached tokens with `cache.crop(start - length)` (rollback, failover replay). Session caches
    keep full history, so this works past the sliding window too (transformers' sliding cache layers refuse it)."""
    path = tiny_family(family)
    split, ref = SplitModel(path, SPANS), reference(path)
    torch.manual_seed(3)
    ids, other = torch.randint(3, VOCAB, (1, 12)), torch.randint(3, VOCAB, (1, 4))
    with torch.no_grad():
        want = ref(torch.cat([ids[:, :4], other], dim=1)).logits[:, -4:]
    caches = split.new_caches()
    split(ids, torch.arange(12)[None], caches=caches)
    for cache in caches:
        cache.crop(4 - 12)  # back to position 4: 8 tokens dropped, more than the 6-token window
    got = split(other, torch.arange(4, 8)[None], caches=caches)
    assert (got - want).abs().max() < TOLERANCE


def test_checkpoint_saved_without_the_base_model_prefix(models_dir):
    """GPT-2's own checkpoint names its tensors "h.0.attn..." (saved from GPT2Model, LM head tied): blocks and client
    parts are found all the same."""
    from tiny_models import tiny_config
    from transformers import GPT2LMHeadModel

    path = models_dir / "gpt2-bare-names"
    if not (path / "config.json").is_file():
        torch.manual_seed(4)
        GPT2LMHeadModel(tiny_config("gpt2")).transformer.save_pretrained(path)
    split, ref = SplitModel(path, [(0, 3), (3, 4)]), reference(path)
    ids = torch.randint(3, VOCAB, (2, 9))
    with torch.no_grad():
        want = ref(ids).logits
    assert (split(ids, torch.arange(9).expand(2, -1)) - want).abs().max() < TOLERANCE
