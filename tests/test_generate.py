"""Sampling: the forward pass with a key/value cache against the forward pass without, for every
switch; the sliding context, sampling and the end of a story."""

import pytest
import torch

from conftest import cuda, small_model
from model import EOS_CHECK, KVCache, pick


def larger_weights(model):
    """At GPT-2's small initial scale attention barely moves the argmax; larger weights make the
    output hinge on every part of the model, positions included."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.5)
    return model


# small_model has two blocks: each switch is held to forward across n_layer > 1 too.
SWITCHES = [{}, {"rope": True}, {"rope": True, "rope_half": True}, {"swiglu": True}, {"tie_weights": True},
            {"rope": True, "rope_half": True, "rope_unturned_first": True, "key_offset": True},
            {"token_shift": True}, {"mlp_hidden": 24}, {"bigram": 64}, {"key_offset": True},
            {"key_offset": True, "rope": True, "token_shift": True}, {"token_shift": True, "shift_reach": 2},
            {"attn_gate": True},
            {"token_shift": True, "shift_reach": 3, "key_offset": True, "attn_gate": True},
            {"token_shift": True, "shift_reach": 2, "shift_gate": True}]


def decoding(switches):
    """(model, idx): a small model with switches and larger weights (and pair rows not hashed, as a
    trained one has them), and 12 random ids in each of 2 rows."""
    model = larger_weights(small_model(**switches))
    if model.config.bigram:
        model.pair_index.random_(0, model.config.bigram)
    return model, torch.randint(0, 20, (2, 12))


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: ",".join(s) or "default")
def test_the_cached_forward_gives_the_logits_of_the_whole_forward(switches):
    model, idx = decoding(switches)
    cache = KVCache()
    with torch.no_grad():
        steps = [model(idx[:, :5], cache=cache)[0]]  # a prompt, then one character at a time
        steps += [model(idx[:, t - 1:t], cache=cache)[0] for t in range(6, 13)]
        for t, logits in zip(range(5, 13), steps):
            torch.testing.assert_close(logits, model(idx[:, :t])[0])


def test_the_cached_forward_after_a_prompt_shorter_than_the_shift_reach_gives_the_whole_forwards_logits():
    # The positions before the first are zeros, as model.Mix has them.
    model, idx = decoding({"token_shift": True, "shift_reach": 3, "key_offset": True})
    cache = KVCache()
    with torch.no_grad():
        model(idx[:, :1], cache=cache)
        for t in range(2, 6):
            torch.testing.assert_close(model(idx[:, t - 1:t], cache=cache)[0], model(idx[:, :t])[0])


def test_a_cache_counts_the_positions_it_holds():
    model, idx = decoding({})
    cache = KVCache()
    with torch.no_grad():
        model(idx[:, :5], cache=cache)
        model(idx[:, 5:6], cache=cache)
    assert cache.pos == 6


def test_a_cache_refuses_several_ids_after_the_prompt():
    model, idx = decoding({})
    cache = KVCache()
    with torch.no_grad(), pytest.raises(AssertionError, match="one id at a time"):
        model(idx[:, :5], cache=cache)
        model(idx[:, 5:7], cache=cache)


def uncached(model, idx, n):
    """Greedy ids (a list per row) from the whole forward over the context so far, the last
    block_size ids of it: the slow reference the cache stands in for."""
    with torch.no_grad():
        for _ in range(n):
            idx = torch.cat([idx, model(idx[:, -model.config.block_size:])[0].argmax(-1, keepdim=True)], 1)
    return idx[:, -n:].tolist()


DEVICES = ["cpu", pytest.param("cuda", marks=cuda)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: ",".join(s) or "default")
def test_cached_greedy_output_equals_uncached_within_block_size(switches, device):
    model = larger_weights(small_model(**switches)).to(device)
    idx = torch.randint(0, 20, (2, 3), device=device)
    cached = model.generate(idx, 13, temperature=0)
    assert cached == uncached(model, idx, 13)
    assert len(cached[0]) == 13


@cuda
def test_greedy_output_on_cuda_equals_the_cpus_past_block_size():
    model = larger_weights(small_model(block_size=8))
    idx = torch.randint(0, 20, (2, 3))
    expected = model.generate(idx, 40, temperature=0)
    assert model.to("cuda").generate(idx.to("cuda"), 40, temperature=0) == expected


def test_sampling_under_bf16_autocast_runs_the_cached_forward():
    # Under a run's autocast the keys and values are bfloat16, token shift's inputs float32.
    model = larger_weights(small_model(token_shift=True, key_offset=True, shift_reach=2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate(torch.zeros(2, 3, dtype=torch.long), 30, temperature=1.0, top_k=5,
                             generator=torch.Generator().manual_seed(0))
    assert [len(row) for row in out] == [30, 30]


def test_past_block_size_the_cache_restarts_from_the_last_half_of_the_context(monkeypatch):
    model = larger_weights(small_model(block_size=8))
    ids = torch.randint(0, 20, (1, 40))
    seen = []  # the logits generate picks from at each step

    def pick_the_given_ids(logits, *args):
        seen.append(logits)
        return ids[:, 2 + len(seen):3 + len(seen)]

    monkeypatch.setattr("model.pick", pick_the_given_ids)
    model.generate(ids[:, :3], 37, temperature=0)
    start = 0  # where the context the cache holds begins
    for t, logits in zip(range(3, 40), seen, strict=True):
        if t - start > 8:  # the context no longer fits: the cache starts again from the last 4,
            start = t - 4  # so past block_size every step sees at least half of it
        with torch.no_grad():
            torch.testing.assert_close(logits, model(ids[:, start:t])[0], msg=f"character {t}")


def test_generation_continues_past_block_size():
    model = small_model(block_size=8)
    out = model.generate(torch.zeros(1, 1, dtype=torch.long), 50, temperature=0)
    assert len(out[0]) == 50


def test_greedy_decoding_is_deterministic():
    model = small_model()
    idx = torch.randint(0, 20, (1, 4))
    assert model.generate(idx, 30, temperature=0) == model.generate(idx, 30, temperature=0)


def test_seeded_sampling_is_reproducible():
    model = small_model()
    idx = torch.randint(0, 20, (1, 4))
    runs = [model.generate(idx, 30, temperature=1.0, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert runs[0] == runs[1]


def test_top_k_never_picks_outside_the_k_likeliest():
    logits = torch.randn(64, 20)
    allowed = torch.topk(logits, 3).indices
    for seed in range(20):
        picked = pick(logits, temperature=2.0, top_k=3, generator=torch.Generator().manual_seed(seed))
        assert (picked == allowed).any(dim=1).all()


def test_a_batch_of_samples_gives_one_continuation_per_row():
    model = small_model()
    idx = torch.zeros(5, 1, dtype=torch.long)
    out = model.generate(idx, 10, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert len(out) == 5 and all(len(row) == 10 for row in out)
    assert len({tuple(row) for row in out}) > 1  # the rows are sampled independently


def scripted_picks(monkeypatch, rows):
    """Make generate draw rows (one list of ids per row) instead of sampling; returns the calls made."""
    calls = []

    def pick_scripted(logits, *args):
        calls.append(len(calls))
        return torch.tensor([[row[len(calls) - 1]] for row in rows])

    monkeypatch.setattr("model.pick", pick_scripted)
    return calls


def test_each_row_ends_at_its_own_end_of_story_token(monkeypatch):
    scripted_picks(monkeypatch, [[1, 3, 5] + [6] * 97, [2, 2] + [7] * 37 + [5] + [8] * 60])  # eos_id 5
    out = small_model().generate(torch.zeros(2, 1, dtype=torch.long), 100, temperature=0, eos_id=5)
    assert out == [[1, 3, 5], [2, 2] + [7] * 37 + [5]]


def test_generation_stops_at_the_first_look_after_every_row_has_ended(monkeypatch):
    calls = scripted_picks(monkeypatch, [[1, 3, 5] + [6] * 97, [2, 2] + [7] * 37 + [5] + [8] * 60])
    small_model().generate(torch.zeros(2, 1, dtype=torch.long), 100, temperature=0, eos_id=5)
    assert len(calls) == 2 * EOS_CHECK  # the last row ends at its 40th character


def test_a_row_stops_at_the_end_of_story_token():
    model = small_model()
    eos = model.generate(torch.zeros(1, 1, dtype=torch.long), 1, temperature=0)[0][0]  # the greedy first pick
    out = model.generate(torch.zeros(1, 1, dtype=torch.long), 20, temperature=0, eos_id=eos)
    assert out == [[eos]]
