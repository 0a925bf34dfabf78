"""Decoding: the cached decode against the forward pass for every switch, the CUDA graph's step,
the sliding context, sampling and the end of a story."""

import pytest
import torch

from conftest import cuda, small_model
import generate as generate_module
from generate import EOS_CHECK, decode, generate, new_cache, pick, static_step


def larger_weights(model):
    """At GPT-2's small initial scale attention barely moves the argmax; larger weights make the
    output hinge on every part of the model, positions included."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.5)
    return model


# small_model has two blocks: each switch is held to forward across n_layer > 1 too.
SWITCHES = [{}, {"rope": True}, {"swiglu": True}, {"tie_weights": True}, {"token_shift": True}, {"mlp_hidden": 24},
            {"bigram": 64}, {"key_offset": True}, {"key_offset": True, "rope": True, "token_shift": True},
            {"token_shift": True, "shift_reach": 2}, {"attn_gate": True},
            {"token_shift": True, "shift_reach": 3, "key_offset": True, "attn_gate": True},
            {"token_shift": True, "shift_reach": 2, "shift_gate": True}]


def decoding(switches):
    """(model, idx, w, cache): a small model with switches and larger weights (and pair rows not hashed,
    as a trained one has them), 12 random ids in each of 2 rows, its weights by name, and an empty
    cache for decode."""
    model = larger_weights(small_model(**switches))
    if model.config.bigram:
        model.pair_index.random_(0, model.config.bigram)
    idx = torch.randint(0, 20, (2, 12))
    return model, idx, {name: t.detach() for name, t in model.state_dict().items()}, new_cache(model, 2, torch.empty(0))


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: ",".join(s) or "default")
def test_cached_decoding_gives_the_logits_of_the_forward_pass(switches):
    model, idx, w, cache = decoding(switches)
    with torch.no_grad():
        steps = [decode(model, w, idx[:, :5], 0, cache)]  # a prompt, then one character at a time
        steps += [decode(model, w, idx[:, t - 1:t], t - 1, cache, idx[:, t - 2:t - 1]) for t in range(6, 13)]
        for t, logits in zip(range(5, 13), steps):
            torch.testing.assert_close(logits, model(idx[:, :t])[0])


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: ",".join(s) or "default")
def test_decoding_at_a_position_tensor_gives_the_logits_of_the_forward_pass(switches):
    # The CUDA graph's form of a step: the position is data, the cache written with index_copy_ and
    # attended over the whole block under a mask.
    model, idx, w, cache = decoding(switches)
    with torch.no_grad():
        decode(model, w, idx[:, :5], 0, cache)
        for t in range(6, 13):
            logits = decode(model, w, idx[:, t - 1:t], torch.tensor([t - 1]), cache, idx[:, t - 2:t - 1])
            torch.testing.assert_close(logits, model(idx[:, :t])[0])


@pytest.mark.parametrize("at_tensor", [False, True], ids=["sliced", "position-tensor"])
def test_decoding_after_a_prompt_shorter_than_the_shift_reach_gives_the_logits_of_the_forward_pass(at_tensor):
    # The positions before the first are zeros, as model.Mix has them, in both forms of a step.
    model, idx, w, cache = decoding({"token_shift": True, "shift_reach": 3, "key_offset": True})
    with torch.no_grad():
        decode(model, w, idx[:, :1], 0, cache)
        for t in range(2, 6):
            start = torch.tensor([t - 1]) if at_tensor else t - 1
            logits = decode(model, w, idx[:, t - 1:t], start, cache, idx[:, t - 2:t - 1])
            torch.testing.assert_close(logits, model(idx[:, :t])[0])


def test_decoding_at_a_position_tensor_under_bf16_autocast_casts_into_the_float32_cache():
    # A run's autocast makes the keys and values bfloat16; index_copy_ does not cast as copy_ does.
    model = larger_weights(small_model(token_shift=True))
    idx = torch.randint(0, 20, (2, 6))
    w = {name: t.detach() for name, t in model.state_dict().items()}
    caches = [new_cache(model, 2, torch.empty(0)) for _ in range(2)]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for cache in caches:
            decode(model, w, idx[:, :5], 0, cache)
        at_tensor = decode(model, w, idx[:, 5:], torch.tensor([5]), caches[0])
        sliced = decode(model, w, idx[:, 5:], 5, caches[1])
    assert caches[0].dtype == torch.float32
    torch.testing.assert_close(at_tensor, sliced)


def static_steps(capture, n=8):
    """The ids (2, n) a greedy static step made with capture draws after a four-character prompt."""
    model = larger_weights(small_model())
    w = {name: t.detach() for name, t in model.state_dict().items()}
    step, cache = static_step(model, w, 2, 0.0, 0, capture)
    prompt = torch.randint(0, 20, (2, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        token, before = pick(decode(model, w, prompt, 0, cache), 0, 0), prompt[:, -1:]
        ids = []
        for at in range(4, 4 + n):
            token, before = step(token, before, at, None), token
            ids.append(token)
    return torch.cat(ids, 1)


def test_a_capture_that_fails_leaves_the_eager_step_and_one_note(capsys):
    def failing(body, device):
        raise RuntimeError("operation not permitted when stream is capturing\n"
                           "CUDA kernel errors might be asynchronously reported")  # CUDA's errors run on

    eager = static_steps(None)
    assert torch.equal(static_steps(failing), eager)
    note = capsys.readouterr().err.splitlines()
    assert len(note) == 1 and "capturing the CUDA graph failed" in note[0] and "not permitted" in note[0]


def test_a_capture_that_records_nothing_is_caught_by_its_check(capsys):
    # A graph captured on another device than its tensors' replays nothing: each step would
    # return the previous one's token.
    eager = static_steps(None)
    assert torch.equal(static_steps(lambda body, device: lambda: None), eager)
    note = capsys.readouterr().err.splitlines()
    assert len(note) == 1 and "does not compute what its step does" in note[0]


def test_a_capture_that_passes_its_check_is_what_each_step_runs(capsys):
    replays = []

    def faithful(body, device):
        return lambda: replays.append(body())

    assert torch.equal(static_steps(faithful, n=8), static_steps(None))
    assert len(replays) == 1 + 8  # the check, then every step
    assert capsys.readouterr().err == ""


def count_static_steps(monkeypatch):
    """A list that grows by one each time generate makes a static step."""
    made, make = [], generate_module.static_step
    monkeypatch.setattr(generate_module, "static_step", lambda *args: made.append(1) or make(*args))
    return made


def test_the_static_step_is_made_once_and_reused_by_later_calls(monkeypatch):
    made = count_static_steps(monkeypatch)
    model = larger_weights(small_model())
    idx = torch.randint(0, 20, (2, 3))
    runs = [generate(model, idx, 12, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(s),
                     graph=True) for s in (1, 2, 1)]
    assert len(made) == 1
    assert runs[0] == runs[2] != runs[1]  # each call's generator draws, not the first call's
    assert runs[0] == generate(model, idx, 12, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1),
                               graph=False)
    generate(model, idx, 12, temperature=0.5, top_k=5, graph=True)  # another temperature: a step of its own
    generate(model, idx[:1], 12, temperature=1.0, top_k=5, graph=True)  # another batch too
    assert len(made) == 3


def test_a_reused_static_step_reads_weights_trained_in_place(monkeypatch):
    made = count_static_steps(monkeypatch)
    model = larger_weights(small_model())
    idx = torch.randint(0, 20, (2, 3))
    before = generate(model, idx, 12, temperature=0, graph=True)
    with torch.no_grad():  # a training step between samples: the same tensors, new values
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    after = generate(model, idx, 12, temperature=0, graph=True)
    assert len(made) == 1
    assert after == generate(model, idx, 12, temperature=0, graph=False) != before


def test_a_static_step_is_made_again_for_weights_replaced_by_other_tensors(monkeypatch):
    made = count_static_steps(monkeypatch)
    model = larger_weights(small_model())
    idx = torch.randint(0, 20, (2, 3))
    before = generate(model, idx, 12, temperature=0, graph=True)
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    after = generate(model, idx, 12, temperature=0, graph=True)
    assert len(made) == 2
    assert after == generate(model, idx, 12, temperature=0, graph=False) != before


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


@cuda
def test_the_cuda_graph_passes_its_check_even_under_bf16_autocast(capsys):
    model = larger_weights(small_model(block_size=8)).to("cuda")
    idx = torch.randint(0, 20, (2, 3), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        generate(model, idx, 20, temperature=0)
    generate(model, idx, 20, temperature=1.0, top_k=5)
    assert capsys.readouterr().err == ""  # no note: neither capture fell back to the eager step


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_greedy_output_through_the_cuda_graph_on_a_second_gpu_equals_the_cpus(capsys):
    # Captured on the current device, cuda:0, the graph would record nothing of cuda:1's step.
    model = larger_weights(small_model(block_size=8))
    idx = torch.randint(0, 20, (2, 3))
    expected = generate(model, idx, 40, temperature=0)
    assert generate(model.to("cuda:1"), idx.to("cuda:1"), 40, temperature=0) == expected
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("setting, graph", [("True", None), ("False", False)])
def test_sample_py_turns_the_cuda_graph_off_with_cuda_graph_false(monkeypatch, setting, graph):
    import sample
    given = {}
    monkeypatch.setattr(sample, "generate", lambda *args, **kwargs: given.update(kwargs) or [[]])
    sample.main([f"--checkpoint={sample.PRETRAINED}", "--device=cpu", f"--cuda_graph={setting}"])
    assert given["graph"] is graph  # None: generate's default, the graph on CUDA


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
