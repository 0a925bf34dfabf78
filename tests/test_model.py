"""The GPT module: its size, its switches and its training forward pass."""

import pytest
import torch

from conftest import small_model
import config
import model
from checkpoint import MODEL_KEYS
from model import PAIR_HASH, GPT, CausalSelfAttention, GPTConfig, Rotary, pair_index, pair_rows


def test_default_model_has_the_reference_parameter_count():
    assert GPT(GPTConfig(vocab_size=94)).num_params() == 238_976


def test_token_shift_adds_one_share_per_channel_at_the_embedding_and_each_sublayer():
    plain, shifted = small_model().num_params(), small_model(token_shift=True).num_params()
    assert shifted - plain == (1 + 2 * 2) * 16  # 2 layers of 16 channels


def test_token_shift_starts_as_the_plain_model_its_shares_at_zero():
    idx = torch.randint(0, 20, (2, 16))
    torch.testing.assert_close(small_model(token_shift=True)(idx, idx), small_model()(idx, idx), rtol=0, atol=0)


def test_the_shift_gate_adds_a_projection_to_one_number_at_the_embedding_and_each_sublayer():
    plain, gated = small_model(token_shift=True).num_params(), small_model(token_shift=True, shift_gate=True).num_params()
    assert gated - plain == (1 + 2 * 2) * (16 + 1)  # 2 layers of 16 channels: weights and a bias each


def test_the_shift_gate_starts_at_one_so_the_model_starts_as_the_one_without_it():
    idx = torch.randint(0, 20, (2, 16))
    plain = small_model(token_shift=True)
    with torch.no_grad():  # shares away from their zeros, so that the gate has something to scale
        for name, p in plain.named_parameters():
            if "shift" in name:
                p.normal_()
    gated = small_model(token_shift=True, shift_gate=True)
    gated.load_state_dict(plain.state_dict(), strict=False)
    assert not gated.shift_gate.weight.any() and not gated.transformer.h[1].shift_gate_2.weight.any()
    torch.testing.assert_close(gated(idx, idx), plain(idx, idx))


def test_the_shift_gate_is_off_without_token_shift():
    assert small_model(shift_gate=True).num_params() == small_model().num_params()


def test_each_position_of_shift_reach_adds_one_share_per_channel_at_the_embedding_and_each_sublayer():
    once, thrice = small_model(token_shift=True).num_params(), small_model(token_shift=True, shift_reach=3).num_params()
    assert thrice - once == 2 * (1 + 2 * 2) * 16


def test_a_longer_shift_reach_starts_as_the_plain_model_its_shares_at_zero():
    idx = torch.randint(0, 20, (2, 16))
    reaching = small_model(token_shift=True, shift_reach=3)
    torch.testing.assert_close(reaching(idx, idx), small_model()(idx, idx), rtol=0, atol=0)


def test_mix_adds_each_share_times_the_position_that_many_before():
    x, near, far = torch.randn(2, 5, 3), torch.randn(3), torch.randn(3)
    mixed = model.mix(x, [near, far])
    torch.testing.assert_close(mixed[:, 0], x[:, 0])
    torch.testing.assert_close(mixed[:, 1], x[:, 1] + near * x[:, 0])
    torch.testing.assert_close(mixed[:, 4], x[:, 4] + near * x[:, 3] + far * x[:, 2])


def test_the_attention_gate_scales_each_heads_output_by_a_sigmoid_of_the_sublayers_input():
    torch.manual_seed(0)
    plain, gated = (CausalSelfAttention(GPTConfig(vocab_size=20, n_embd=8, n_head=2, attn_gate=on)) for on in (0, 1))
    gated.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(1, 4, 8)
    with torch.no_grad():
        gated.c_gate.weight.zero_()
        gated.c_gate.bias.fill_(30.0)  # a gate all open: the plain attention
        torch.testing.assert_close(gated(x), plain(x))
        gated.c_gate.bias.copy_(torch.tensor([30.0, -30.0]))  # the second head shut: its channels add nothing
        plain.c_proj.weight[:, 4:] = 0
        torch.testing.assert_close(gated(x), plain(x))


def test_training_forward_returns_logits_for_every_position_and_a_loss():
    model = small_model()
    idx = torch.randint(0, 20, (3, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 16, 20)
    assert abs(loss.item() - torch.log(torch.tensor(20.0)).item()) < 0.5  # near uniform at init


def test_rotary_positions_replace_the_learned_position_table():
    model = small_model(rope=True)
    assert "transformer.wpe.weight" not in model.state_dict()
    a, b = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[3, 1, 2, 4]])
    assert not torch.equal(model(a)[0], model(b)[0])  # the order of the characters still counts


def test_rotary_turns_each_channel_pair_by_its_frequency_times_the_position():
    head_dim, start, T = 8, 3, 5
    x = torch.randn(2, 4, T, head_dim)
    z = torch.complex(x[..., :head_dim // 2], x[..., head_dim // 2:])  # channels i and i + head_dim / 2 as one number
    freq = 10000.0 ** (-torch.arange(0, head_dim, 2).float() / head_dim)
    turned = z * torch.polar(torch.ones(T, head_dim // 2), torch.outer(torch.arange(start, start + T).float(), freq))
    torch.testing.assert_close(Rotary(head_dim, 16)(x, start), torch.cat((turned.real, turned.imag), -1))


def test_rope_half_leaves_half_of_each_heads_pairs_unturned_and_turns_the_rest_at_1_to_1_1024th_radian():
    head_dim, start, T = 16, 3, 5
    x = torch.randn(2, 4, T, head_dim)
    out = Rotary(head_dim, 16, half=True)(x, start)
    pair = lambda t, i: torch.complex(t[..., i], t[..., i + head_dim // 2])  # channels i and i + head_dim / 2
    positions = torch.arange(start, start + T).float()
    for i, radians_a_position in ((0, 1.0), (3, 1 / 1024)):  # the first and the last of the turned pairs
        turned = pair(x, i) * torch.polar(torch.ones(T), positions * radians_a_position)
        torch.testing.assert_close(pair(out, i), turned)
    for i in range(4, 8):
        assert torch.equal(pair(out, i), pair(x, i))


def test_rope_unturned_first_leaves_each_heads_first_half_unturned_and_turns_the_second_in_pairs_of_its_own():
    head_dim, start, T = 16, 3, 5
    x = torch.randn(2, 4, T, head_dim)
    out = Rotary(head_dim, 16, half=True, unturned_first=True)(x, start)
    assert torch.equal(out[..., :8], x[..., :8])  # key offset's channels
    pair = lambda t, i: torch.complex(t[..., 8 + i], t[..., 12 + i])  # channels 8 + i and 12 + i
    positions = torch.arange(start, start + T).float()
    for i, radians_a_position in ((0, 1.0), (3, 1 / 1024)):  # the first and the last pair
        torch.testing.assert_close(pair(out, i), pair(x, i) * torch.polar(torch.ones(T), positions * radians_a_position))


def test_swiglu_keeps_the_parameter_count_within_one_percent():
    gelu, swiglu = GPT(GPTConfig(vocab_size=94)).num_params(), GPT(GPTConfig(vocab_size=94, swiglu=True)).num_params()
    assert abs(swiglu - gelu) / gelu < 0.01


def test_tied_head_shares_the_token_embedding():
    model = small_model(tie_weights=True)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.num_params() == small_model().num_params() - 20 * 16


def test_the_bigram_table_starts_at_zero_so_the_model_starts_as_the_plain_one():
    idx = torch.randint(0, 20, (2, 16))
    torch.testing.assert_close(small_model(bigram=64)(idx, idx), small_model()(idx, idx), rtol=0, atol=0)


def test_a_pair_row_hashes_the_previous_and_current_id_and_a_window_start_has_no_previous():
    index, h = pair_index(20, 64), PAIR_HASH
    rows = pair_rows(torch.tensor([[3, 5, 7]]), index)
    assert rows.tolist() == [[(0 * h + 3) % 64, (4 * h + 5) % 64, (6 * h + 7) % 64]]


def test_a_pairs_hashed_row_does_not_depend_on_the_vocabulary_size_which_fine_tuning_grows():
    idx = torch.tensor([[3, 5, 7]])
    assert torch.equal(pair_rows(idx, pair_index(20, 64)), pair_rows(idx, pair_index(24, 64)))


def test_the_commonest_pairs_get_a_row_each_commonest_first_and_the_rest_keep_their_hashed_rows():
    counts = torch.zeros(21, 20)
    counts[4, 5], counts[6, 7], counts[0, 3] = 9, 5, 7  # (3, 5), (5, 7), and 3 at a window's start
    assert pair_rows(torch.tensor([[3, 5, 7]]), pair_index(20, 3, counts)).tolist() == [[1, 0, 2]]
    two_rows, hashed = pair_index(20, 2, counts), pair_index(20, 2)
    assert two_rows[6, 7] == hashed[6, 7]  # the third pair has no row of its own
    assert torch.equal(two_rows[1:4], hashed[1:4])  # nor have the pairs that never occur


def test_a_grown_vocabulary_keeps_the_old_pairs_rows_and_hashes_the_new_ones():
    small = GPT(GPTConfig(vocab_size=20, bigram=64))
    small.pair_index.copy_(pair_index(20, 64, torch.rand(21, 20)))
    grown = GPT(GPTConfig(vocab_size=24, bigram=64))
    index = model.grow_vocabulary(small.state_dict(), grown)["pair_index"]
    assert torch.equal(index[:21, :20], small.pair_index)
    assert torch.equal(index[21:], pair_index(24, 64)[21:]) and torch.equal(index[:, 20:], pair_index(24, 64)[:, 20:])


def test_mlp_hidden_sets_the_hidden_width():
    model = small_model(mlp_hidden=24)
    assert model.transformer.h[0].mlp.c_fc.weight.shape == (24, 16)


def test_mlp_hidden_sets_the_hidden_width_of_swiglu_too():
    mlp = small_model(mlp_hidden=24, swiglu=True).transformer.h[0].mlp
    assert mlp.c_fc.weight.shape == (2 * 24, 16) and mlp.c_proj.weight.shape == (16, 24)  # gate and value


def test_key_offset_takes_the_first_half_of_each_keys_channels_from_the_position_before(monkeypatch):
    attn = CausalSelfAttention(GPTConfig(vocab_size=20, n_embd=8, n_head=2, key_offset=True))
    x = torch.randn(1, 4, 8)
    seen = {}
    monkeypatch.setattr(model.F, "scaled_dot_product_attention", lambda q, k, v, **kw: seen.setdefault("k", k) * 0)
    attn(x)
    k = attn.c_attn(x).split(8, dim=2)[1].view(1, 4, 2, 4).transpose(1, 2)  # (batch, head, position, channel)
    torch.testing.assert_close(seen["k"][..., 2:], k[..., 2:])
    torch.testing.assert_close(seen["k"][..., 1:, :2], k[..., :-1, :2])
    assert not seen["k"][..., 0, :2].any()


def test_the_recipes_model_keeps_within_the_speedruns_240000_parameters_at_the_slices_83_ids():
    cfg = config.load([])
    assert GPT(GPTConfig(vocab_size=83, **{key: cfg[key] for key in MODEL_KEYS})).num_params() <= 240_000


def test_mix_gradients_are_those_of_its_forward_pass_by_finite_differences():
    x, near, far = (torch.randn(*shape, dtype=torch.double, requires_grad=True) for shape in ((2, 5, 3), (3,), (3,)))
    torch.autograd.gradcheck(model.Mix.apply, (x, near, far))


TRACED = [{}, {"rope": True}, {"token_shift": True, "shift_reach": 2, "shift_gate": True}, {"bigram": 64},
          {"key_offset": True, "attn_gate": True, "swiglu": True}]


def traced(switches):
    """(model, idx, logits, trace, stream): a small model with switches and larger weights, its traced
    forward over 2 rows of 12 ids, and the residual stream that entered its final LayerNorm."""
    m = small_model(**switches)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(std=0.3)
    idx, trace, stream = torch.randint(0, 20, (2, 12)), {}, []
    m.transformer.ln_f.register_forward_pre_hook(lambda module, args: stream.append(args[0]))
    with torch.no_grad():
        logits = m(idx, idx, trace=trace)[0]
    return m, idx, logits, trace, stream[0]


@pytest.mark.parametrize("switches", TRACED, ids=lambda s: ",".join(s) or "default")
def test_a_traced_forward_gives_the_logits_of_the_plain_forward(switches):
    m, idx, logits, _, _ = traced(switches)
    with torch.no_grad():
        torch.testing.assert_close(logits, m(idx, idx)[0])


@pytest.mark.parametrize("switches", TRACED, ids=lambda s: ",".join(s) or "default")
def test_the_traced_terms_add_up_to_the_stream_entering_the_final_layernorm(switches):
    _, _, _, trace, stream = traced(switches)
    torch.testing.assert_close(sum(trace["terms"].values()), stream)


def test_the_trace_names_a_term_for_each_part_that_adds_into_the_stream():
    _, _, _, trace, _ = traced({"token_shift": True, "bigram": 64})
    heads = [f"block{i}.head{h}" for i in range(2) for h in range(2)]
    assert list(trace["terms"]) == ["token", "position", "shift", "bigram", *heads[:2], "block0.mlp", *heads[2:],
                                    "block1.mlp", "biases"]


def test_the_traced_attention_weights_are_causal_rows_that_sum_to_one():
    _, _, _, trace, _ = traced({})
    assert len(trace["attention"]) == 2
    for att in trace["attention"]:
        assert att.shape == (2, 2, 12, 12)
        torch.testing.assert_close(att.sum(-1), torch.ones(2, 2, 12))
        assert (att.triu(1) == 0).all()
