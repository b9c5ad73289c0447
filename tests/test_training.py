"""Fine-tuning through real server processes: gradients through the swarm equal local gradients (inputs, prompts,
LoRA weights), batches split over requests, the loss falls, adapters saved in PEFT format load in plain peft,
and a training step survives losing a server."""

from __future__ import annotations

import copy

import torch
from peft import PeftModel

from conftest import peer_of, peft_twin, randomize_lora, start_swarm
from corolla import AutoDistributedModelForCausalLM
from corolla.client.config import ClientConfig
from corolla.client.tuning import TuningConfig
from corolla.models.lora import LoraSettings

ATOL = 1e-5
LORA = LoraSettings(r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"))


def batch(seed: int = 0, size: int = 3, length: int = 10) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 320, (size, length), generator=generator)


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    error = (got - want).abs().max().item()
    assert error <= ATOL + 1e-5 * want.abs().max().item(), f"{what}: max difference {error:.3g}"


def test_input_gradients_match_local(client, reference):
    ids = batch()
    embeds = reference.get_input_embeddings()(ids).detach()
    mine = embeds.clone().requires_grad_(True)
    theirs = embeds.clone().requires_grad_(True)
    client.tuning = None
    loss = client(inputs_embeds=mine, labels=ids).loss
    loss.backward()
    want_loss = reference(inputs_embeds=theirs, labels=ids).loss
    want_loss.backward()
    assert abs(loss.item() - want_loss.item()) < 1e-5
    assert_close(mine.grad, theirs.grad, "input gradient")


def test_prompt_tuning_gradients_match_local(client, reference):
    ids = batch(1)
    tuning = client.enable_tuning(TuningConfig("ptune", pre_seq_len=4), seed=0)
    try:
        loss = client(input_ids=ids, labels=ids).loss
        loss.backward()
        prompts = tuning.prompt_embeddings.detach().clone().requires_grad_(True)
        embeds = torch.cat([prompts.unsqueeze(0).expand(ids.shape[0], -1, -1),
                            reference.get_input_embeddings()(ids)], dim=1)
        logits = reference(inputs_embeds=embeds).logits[:, 4:].contiguous()
        want = reference.loss_function(logits=logits, labels=ids, vocab_size=reference.config.vocab_size)
        want.backward()
        assert abs(loss.item() - want.item()) < 1e-5
        assert_close(tuning.prompt_embeddings.grad, prompts.grad, "prompt gradient")
    finally:
        client.tuning = None


def test_deep_prompt_tuning_gradients_match_local(client, reference):
    ids = batch(2)
    tuning = client.enable_tuning(TuningConfig("deep_ptune", pre_seq_len=3), seed=0)
    try:
        with torch.no_grad():
            tuning.deep_prompts.normal_(0, 0.5)
        loss = client(input_ids=ids, labels=ids).loss
        loss.backward()
        prompts = tuning.prompt_embeddings.detach().clone().requires_grad_(True)
        deep = tuning.deep_prompts.detach().clone().requires_grad_(True)

        def add_prompt(index):  # the reference: prompt added at positions < 3 before each layer
            def hook(module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                hidden = torch.cat([hidden[:, :3] + deep[index], hidden[:, 3:]], dim=1)
                return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
            return hook

        handles = [layer.register_forward_pre_hook(add_prompt(i), with_kwargs=True)
                   for i, layer in enumerate(reference.model.layers)]
        try:
            embeds = torch.cat([prompts.unsqueeze(0).expand(ids.shape[0], -1, -1),
                                reference.get_input_embeddings()(ids)], dim=1)
            logits = reference(inputs_embeds=embeds).logits[:, 3:].contiguous()
        finally:
            for handle in handles:
                handle.remove()
        want = reference.loss_function(logits=logits, labels=ids, vocab_size=reference.config.vocab_size)
        want.backward()
        assert abs(loss.item() - want.item()) < 1e-5
        assert_close(tuning.prompt_embeddings.grad, prompts.grad, "prompt gradient")
        assert_close(tuning.deep_prompts.grad, deep.grad, "deep prompt gradient")
    finally:
        client.tuning = None


def test_lora_gradients_match_peft(client, reference):
    ids = batch(3, size=4)
    tuning = client.enable_tuning(TuningConfig("lora", lora=LORA), seed=0)
    try:
        randomize_lora(tuning)
        # Split the batch into 1-sequence requests spread over the servers: the same gradients.
        client.swarm.config = ClientConfig(max_request_tokens=10)
        loss = client(input_ids=ids, labels=ids).loss
        loss.backward()
        twin, params = peft_twin(reference, tuning, LORA)
        want = twin(input_ids=ids, labels=ids).loss
        want.backward()
        assert abs(loss.item() - want.item()) < 1e-5
        for index, (weight, theirs) in enumerate(zip(tuning.lora_weights, params)):
            assert_close(weight.grad, theirs.grad, f"LoRA tensor {index} ({tuning.targets[index // 2 % len(tuning.targets)]})")
    finally:
        client.tuning = None
        client.swarm.config = ClientConfig()


def test_prompt_tuned_generation_matches_local(client, reference):
    ids = batch(4, size=1, length=6)
    tuning = client.enable_tuning(TuningConfig("ptune", pre_seq_len=3), seed=1)
    try:
        got = client.generate(ids, max_new_tokens=10, do_sample=False)
        embeds = torch.cat([tuning.prompt_embeddings.detach().unsqueeze(0), reference.get_input_embeddings()(ids)], 1)
        want = reference.generate(inputs_embeds=embeds, attention_mask=torch.ones(1, 9, dtype=torch.long),
                                  max_new_tokens=10, do_sample=False)
        assert got[0, 6:].tolist() == want[0].tolist()
    finally:
        client.tuning = None


def test_deep_prompts_in_an_inference_session_match_a_forward(client):
    ids = batch(5, size=2, length=7)
    tuning = client.enable_tuning(TuningConfig("deep_ptune", pre_seq_len=2), seed=2)
    try:
        with torch.no_grad():
            tuning.deep_prompts.normal_(0, 0.5)
            want = client(ids).logits
            with client.inference_session(max_length=7, batch_size=2):
                got = torch.cat([client(ids[:, :4]).logits, client(ids[:, 4:]).logits], dim=1)
        assert (got - want).abs().max() < 1e-4
    finally:
        client.tuning = None


def test_training_survives_a_server_dying_mid_step(local_swarm, tiny_llama, reference):
    """Servers A and B both hold blocks 0:3. The forward pass runs on A; A is killed before the backward pass, which
    re-runs those blocks on B: every step's loss and the trained weights equal local training with plain peft."""
    a, b, c = start_swarm(local_swarm, tiny_llama, [(0, 3), (0, 3), (3, 5)])
    settings = LoraSettings(r=4, alpha=8, target_modules=("q_proj", "v_proj"))
    model = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama, initial_peers=local_swarm.initial_peers,
                                                            tuning_mode="lora", lora=settings, seed=0)
    try:
        twin, params = peft_twin(reference, model.tuning, settings)
        ours = torch.optim.Adam(model.tuning.parameters(), lr=2e-2)
        theirs = torch.optim.Adam(params, lr=2e-2)
        ids = batch(6, size=4, length=12)
        losses = []
        for step in range(4):
            ours.zero_grad()
            theirs.zero_grad()
            if step == 1:  # this step's forward may use only A (and C)
                model.swarm.config = ClientConfig(allowed_servers=(peer_of(a), peer_of(c)))
            loss = model(input_ids=ids, labels=ids).loss
            if step == 1:
                model.swarm.config = ClientConfig()
                local_swarm.kill(a)
            loss.backward()
            if step == 1:
                assert peer_of(a) in model.swarm._bans  # the backward pass did hit the dead server
            ours.step()
            want = twin(input_ids=ids, labels=ids).loss
            want.backward()
            theirs.step()
            assert abs(loss.item() - want.item()) < 1e-4, step
            losses.append(loss.item())
        assert not a.alive()
        assert losses[-1] < losses[0] - 0.05  # it trains
        for index, (weight, twin_weight) in enumerate(zip(model.tuning.lora_weights, params)):
            assert (weight - twin_weight).abs().max() < 1e-4, index
    finally:
        model.close()


def test_prompt_tuning_saved_in_peft_format_loads_in_plain_peft(client, reference, tmp_path):
    ids = batch(7, size=2, length=8)
    tuning = client.enable_tuning(TuningConfig("ptune", pre_seq_len=4), seed=3)
    try:
        with torch.no_grad():
            swarm_logits = client(ids).logits
        tuning.save_pretrained(tmp_path / "prompt")
    finally:
        client.tuning = None
    plain = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path / "prompt").eval()
    with torch.no_grad():
        logits = plain(input_ids=ids).logits[:, 4:]  # peft returns the prompt positions' logits too
    assert (logits - swarm_logits).abs().max() < 1e-4
    assert (reference(ids).logits - swarm_logits).abs().max() > 1e-3


def test_a_clients_lora_session_does_not_leak_into_anothers(client, reference, tiny_llama, tiny_swarm):
    """Two clients decode at the same time on the same servers, one with its own LoRA weights: each gets exactly
    its own model's tokens (the weights travel with the session and apply to its steps only)."""
    import threading

    ids = batch(8, size=1, length=5)
    tuned = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama, initial_peers=tiny_swarm.initial_peers,
                                                            tuning_mode="lora", lora=LORA, seed=4)
    try:
        randomize_lora(tuned.tuning)
        want_tuned = peft_twin(reference, tuned.tuning, LORA)[0].generate(ids, max_new_tokens=16, do_sample=False)
        want_plain = reference.generate(ids, max_new_tokens=16, do_sample=False)
        results = {}
        threads = [threading.Thread(target=lambda m=m, k=k: results.__setitem__(k, m.generate(
            ids, max_new_tokens=16, do_sample=False))) for k, m in (("tuned", tuned), ("plain", client))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert results["tuned"].tolist() == want_tuned.tolist()
        assert results["plain"].tolist() == want_plain.tolist()
        assert want_tuned.tolist() != want_plain.tolist()
    finally:
        tuned.close()
