"""The GPT module: its size, and decoding with and without the key/value cache."""

import pytest
import torch

from conftest import cuda
from model import EOS_CHECK, GPT, GPTConfig, Muon, compute_dtype, pick


def small_model(block_size=16, seed=0, **switches):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=20, block_size=block_size, n_layer=2, n_head=2, n_embd=16, **switches)).eval()


def test_default_model_has_the_reference_parameter_count():
    assert GPT(GPTConfig(vocab_size=94)).num_params() == 238_976


def test_token_shift_adds_one_share_per_channel_at_the_embedding_and_each_sublayer():
    plain, shifted = small_model().num_params(), small_model(token_shift=True).num_params()
    assert shifted - plain == (1 + 2 * 2) * 16  # 2 layers of 16 channels


def test_token_shift_starts_as_the_plain_model_its_shares_at_zero():
    idx = torch.randint(0, 20, (2, 16))
    torch.testing.assert_close(small_model(token_shift=True)(idx, idx), small_model()(idx, idx), rtol=0, atol=0)


def test_training_forward_returns_logits_for_every_position_and_a_loss():
    model = small_model()
    idx = torch.randint(0, 20, (3, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 16, 20)
    assert abs(loss.item() - torch.log(torch.tensor(20.0)).item()) < 0.5  # near uniform at init


def larger_weights(model):
    """At GPT-2's small initial scale attention barely moves the argmax; larger weights make the
    output hinge on every part of the model, positions included."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.5)
    return model


SWITCHES = [{}, {"rope": True}, {"swiglu": True}, {"tie_weights": True}, {"token_shift": True}]


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: ",".join(s) or "default")
def test_cached_decoding_gives_the_logits_of_the_forward_pass(switches):
    model = larger_weights(small_model(**switches))
    idx = torch.randint(0, 20, (2, 12))
    w = {name: t.detach() for name, t in model.state_dict().items()}
    cache = model.new_cache(2, torch.empty(0))
    with torch.no_grad():
        steps = [model.decode(w, idx[:, :5], 0, cache)]  # a prompt, then one character at a time
        steps += [model.decode(w, idx[:, t - 1:t], t - 1, cache) for t in range(6, 13)]
        for t, logits in zip(range(5, 13), steps):
            torch.testing.assert_close(logits, model(idx[:, :t])[0])


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: ",".join(s) or "default")
def test_decoding_at_a_position_tensor_gives_the_logits_of_the_forward_pass(switches):
    # The CUDA graph's form of a step: the position is data, the cache written with index_copy_ and
    # attended over the whole block under a mask.
    model = larger_weights(small_model(**switches))
    idx = torch.randint(0, 20, (2, 12))
    w = {name: t.detach() for name, t in model.state_dict().items()}
    cache = model.new_cache(2, torch.empty(0))
    with torch.no_grad():
        model.decode(w, idx[:, :5], 0, cache)
        for t in range(6, 13):
            logits = model.decode(w, idx[:, t - 1:t], torch.tensor([t - 1]), cache)
            torch.testing.assert_close(logits, model(idx[:, :t])[0])


DEVICES = ["cpu", pytest.param("cuda", marks=cuda)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: ",".join(s) or "default")
def test_cached_greedy_output_equals_uncached_within_block_size(switches, device):
    model = larger_weights(small_model(**switches)).to(device)  # on CUDA through the CUDA graph
    idx = torch.randint(0, 20, (2, 3), device=device)
    cached = model.generate(idx, 13, temperature=0, use_cache=True)
    assert cached == model.generate(idx, 13, temperature=0, use_cache=False)
    assert len(cached[0]) == 13


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: ",".join(s) or "default")
def test_the_static_step_samples_what_the_eager_step_samples_past_block_size(switches):
    # On the CPU the static step runs without a graph: the same tensors and draws as on CUDA.
    model = larger_weights(small_model(block_size=8, **switches))
    idx = torch.randint(0, 20, (2, 3))
    runs = [model.generate(idx, 40, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1),
                           graph=graph) for graph in (False, True)]
    assert runs[0] == runs[1]


@cuda
def test_greedy_output_through_the_cuda_graph_equals_the_cpus_past_block_size():
    model = larger_weights(small_model(block_size=8))
    idx = torch.randint(0, 20, (2, 3))
    expected = model.generate(idx, 40, temperature=0)
    assert model.to("cuda").generate(idx.to("cuda"), 40, temperature=0) == expected


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


def test_rotary_positions_replace_the_learned_position_table():
    model = small_model(rope=True)
    assert "transformer.wpe.weight" not in model.state_dict()
    a, b = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[3, 1, 2, 4]])
    assert not torch.equal(model(a)[0], model(b)[0])  # the order of the characters still counts


def test_swiglu_keeps_the_parameter_count_within_one_percent():
    gelu, swiglu = GPT(GPTConfig(vocab_size=94)).num_params(), GPT(GPTConfig(vocab_size=94, swiglu=True)).num_params()
    assert abs(swiglu - gelu) / gelu < 0.01


def test_tied_head_shares_the_token_embedding():
    model = small_model(tie_weights=True)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.num_params() == small_model().num_params() - 20 * 16


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


def test_a_cpu_run_computes_in_float32():
    assert compute_dtype(torch.device("cpu")) == torch.float32


@pytest.mark.parametrize("bf16", [True, False])
def test_a_cuda_run_computes_in_bf16_where_the_device_supports_it(monkeypatch, bf16):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    assert compute_dtype(torch.device("cuda")) == (torch.bfloat16 if bf16 else torch.float32)


def test_muon_moves_the_weights_as_torchs_muon_does_within_its_bfloat16_error():
    torch.manual_seed(0)
    start = [torch.randn(shape) for shape in ((48, 16), (16, 48))]
    ours, theirs = [torch.nn.Parameter(w.clone()) for w in start], [torch.nn.Parameter(w.clone()) for w in start]
    optimizers = [Muon(ours, lr=0.01, adjust_lr_fn="match_rms_adamw"),
                  torch.optim.Muon(theirs, lr=0.01, adjust_lr_fn="match_rms_adamw")]
    for _ in range(3):
        grads = [torch.randn_like(w) for w in start]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g, g.clone()
        for optimizer in optimizers:
            optimizer.step()
    for w, p, q in zip(start, ours, theirs):
        ours_moved, theirs_moved = p.detach() - w, q.detach() - w
        assert (ours_moved - theirs_moved).norm() < 0.05 * theirs_moved.norm()
        assert not torch.equal(ours_moved, theirs_moved)  # float32 is not bfloat16
    optimizers[1].load_state_dict(optimizers[0].state_dict())  # the same state: checkpoints carry over
