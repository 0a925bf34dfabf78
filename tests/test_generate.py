"""Decoding: the cached decode against the forward pass for every switch, the CUDA graph's step,
the sliding context, sampling and the end of a story."""

import pytest
import torch

from conftest import cuda, small_model
from generate import EOS_CHECK, decode, generate, new_cache, pick


def larger_weights(model):
    """At GPT-2's small initial scale attention barely moves the argmax; larger weights make the
    output hinge on every part of the model, positions included."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.5)
    return model


# small_model has two blocks: each switch is held to forward across n_layer > 1 too.
SWITCHES = [{}, {"rope": True}, {"swiglu": True}, {"tie_weights": True}, {"token_shift": True}]


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: ",".join(s) or "default")
def test_cached_decoding_gives_the_logits_of_the_forward_pass(switches):
    model = larger_weights(small_model(**switches))
    idx = torch.randint(0, 20, (2, 12))
    w = {name: t.detach() for name, t in model.state_dict().items()}
    cache = new_cache(model, 2, torch.empty(0))
    with torch.no_grad():
        steps = [decode(model, w, idx[:, :5], 0, cache)]  # a prompt, then one character at a time
        steps += [decode(model, w, idx[:, t - 1:t], t - 1, cache) for t in range(6, 13)]
        for t, logits in zip(range(5, 13), steps):
            torch.testing.assert_close(logits, model(idx[:, :t])[0])


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: ",".join(s) or "default")
def test_decoding_at_a_position_tensor_gives_the_logits_of_the_forward_pass(switches):
    # The CUDA graph's form of a step: the position is data, the cache written with index_copy_ and
    # attended over the whole block under a mask.
    model = larger_weights(small_model(**switches))
    idx = torch.randint(0, 20, (2, 12))
    w = {name: t.detach() for name, t in model.state_dict().items()}
    cache = new_cache(model, 2, torch.empty(0))
    with torch.no_grad():
        decode(model, w, idx[:, :5], 0, cache)
        for t in range(6, 13):
            logits = decode(model, w, idx[:, t - 1:t], torch.tensor([t - 1]), cache)
            torch.testing.assert_close(logits, model(idx[:, :t])[0])


DEVICES = ["cpu", pytest.param("cuda", marks=cuda)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: ",".join(s) or "default")
def test_cached_greedy_output_equals_uncached_within_block_size(switches, device):
    model = larger_weights(small_model(**switches)).to(device)  # on CUDA through the CUDA graph
    idx = torch.randint(0, 20, (2, 3), device=device)
    cached = generate(model, idx, 13, temperature=0, use_cache=True)
    assert cached == generate(model, idx, 13, temperature=0, use_cache=False)
    assert len(cached[0]) == 13


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: ",".join(s) or "default")
def test_the_static_step_samples_what_the_eager_step_samples_past_block_size(switches):
    # On the CPU the static step runs without a graph: the same tensors and draws as on CUDA.
    model = larger_weights(small_model(block_size=8, **switches))
    idx = torch.randint(0, 20, (2, 3))
    runs = [generate(model, idx, 40, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1),
                           graph=graph) for graph in (False, True)]
    assert runs[0] == runs[1]


@cuda
def test_greedy_output_through_the_cuda_graph_equals_the_cpus_past_block_size():
    model = larger_weights(small_model(block_size=8))
    idx = torch.randint(0, 20, (2, 3))
    expected = generate(model, idx, 40, temperature=0)
    assert generate(model.to("cuda"), idx.to("cuda"), 40, temperature=0) == expected


def test_past_block_size_the_cache_restarts_from_the_last_half_of_the_context(monkeypatch):
    model = larger_weights(small_model(block_size=8))
    ids = torch.randint(0, 20, (1, 40))
    seen = []  # the logits generate picks from at each step

    def pick_the_given_ids(logits, *args):
        seen.append(logits)
        return ids[:, 2 + len(seen):3 + len(seen)]

    monkeypatch.setattr("generate.pick", pick_the_given_ids)
    generate(model, ids[:, :3], 37, temperature=0)
    start = 0  # where the context the cache holds begins
    for t, logits in zip(range(3, 40), seen, strict=True):
        if t - start > 8:  # the context no longer fits: the cache starts again from the last 4,
            start = t - 4  # so past block_size every step sees at least half of it
        with torch.no_grad():
            torch.testing.assert_close(logits, model(ids[:, start:t])[0], msg=f"character {t}")


def test_generation_continues_past_block_size():
    model = small_model(block_size=8)
    out = generate(model, torch.zeros(1, 1, dtype=torch.long), 50, temperature=0)
    assert len(out[0]) == 50


def test_greedy_decoding_is_deterministic():
    model = small_model()
    idx = torch.randint(0, 20, (1, 4))
    assert generate(model, idx, 30, temperature=0) == generate(model, idx, 30, temperature=0)


def test_seeded_sampling_is_reproducible():
    model = small_model()
    idx = torch.randint(0, 20, (1, 4))
    runs = [generate(model, idx, 30, temperature=1.0, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
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
    out = generate(model, idx, 10, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert len(out) == 5 and all(len(row) == 10 for row in out)
    assert len({tuple(row) for row in out}) > 1  # the rows are sampled independently


def scripted_picks(monkeypatch, rows):
    """Make generate draw rows (one list of ids per row) instead of sampling; returns the calls made."""
    calls = []

    def pick_scripted(logits, *args):
        calls.append(len(calls))
        return torch.tensor([[row[len(calls) - 1]] for row in rows])

    monkeypatch.setattr("generate.pick", pick_scripted)
    return calls


def test_each_row_ends_at_its_own_end_of_story_token(monkeypatch):
    scripted_picks(monkeypatch, [[1, 3, 5] + [6] * 97, [2, 2] + [7] * 37 + [5] + [8] * 60])  # eos_id 5
    out = generate(small_model(), torch.zeros(2, 1, dtype=torch.long), 100, temperature=0, eos_id=5)
    assert out == [[1, 3, 5], [2, 2] + [7] * 37 + [5]]


def test_generation_stops_at_the_first_look_after_every_row_has_ended(monkeypatch):
    calls = scripted_picks(monkeypatch, [[1, 3, 5] + [6] * 97, [2, 2] + [7] * 37 + [5] + [8] * 60])
    generate(small_model(), torch.zeros(2, 1, dtype=torch.long), 100, temperature=0, eos_id=5)
    assert len(calls) == 2 * EOS_CHECK  # the last row ends at its 40th character


def test_a_row_stops_at_the_end_of_story_token():
    model = small_model()
    eos = generate(model, torch.zeros(1, 1, dtype=torch.long), 1, temperature=0)[0][0]  # the greedy first pick
    out = generate(model, torch.zeros(1, 1, dtype=torch.long), 20, temperature=0, eos_id=eos)
    assert out == [[eos]]
