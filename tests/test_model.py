"""The GPT module: its size, its switches and its training forward pass."""

import torch

from conftest import small_model
from model import GPT, GPTConfig


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
