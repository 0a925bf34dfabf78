"""Apple silicon's MPS device: the cached forward, training and resuming there against the CPU (marked mps,
skipped where MPS is not available), and MPS's random state in a checkpoint (on any machine, with
torch.mps's answers replaced)."""

import shutil

import pytest
import torch

import checkpoint
import train
from conftest import TINY, progress_losses, small_model
from model import KVCache
from optim import optimizer

needs_mps = pytest.mark.skipif(not torch.backends.mps.is_available(), reason="needs Apple silicon's MPS")


def run(stories_dir, out_dir, *extra):
    train.main([f"--dataset={stories_dir}", f"--out_dir={out_dir}", *TINY, *extra])


SWITCHES = [{}, {"rope": True}, {"token_shift": True}]


@pytest.mark.mps
@needs_mps
@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: ",".join(s) or "default")
def test_the_cached_forward_on_mps_gives_the_logits_of_the_whole_forward(switches):
    model = small_model(**switches).to("mps")
    idx = torch.randint(0, 20, (2, 12), device="mps")
    cache = KVCache()
    with torch.no_grad():
        model(idx[:, :5], cache=cache)
        for t in range(6, 13):
            logits = model(idx[:, t - 1:t], cache=cache)[0]
            torch.testing.assert_close(logits, model(idx[:, :t])[0], rtol=1e-4, atol=1e-4)


@pytest.mark.mps
@needs_mps
def test_training_on_mps_follows_the_cpus_losses(stories_dir, tmp_path):
    run(stories_dir, tmp_path / "cpu", "--max_steps=10")
    run(stories_dir, tmp_path / "mps", "--max_steps=10", "--device=mps")
    cpu, mps = progress_losses(tmp_path / "cpu"), progress_losses(tmp_path / "mps")
    assert list(mps) == list(cpu)
    assert all(mps[s] == pytest.approx(cpu[s], rel=1e-3) for s in cpu)


@pytest.mark.mps
@needs_mps
def test_a_run_on_mps_resumes_where_it_stopped(stories_dir, tmp_path):
    args = ["--device=mps", "--max_steps=12", "--checkpoint_interval=6", "--keep_checkpoints=5", "--dropout=0.1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(stories_dir, straight, *args)
    resumed.mkdir()
    shutil.copy(straight / "ckpt_00000006.pt", resumed)
    run(stories_dir, resumed, *args)
    losses, resumed_losses = progress_losses(straight), progress_losses(resumed)
    assert list(resumed_losses) == list(range(7, 13))
    # Close, not bit for bit: MPS's embedding backward sums in no fixed order.
    assert all(resumed_losses[s] == pytest.approx(losses[s], rel=1e-3) for s in resumed_losses)


class Stream:
    """A data stream's state, as train.py's batches keep it."""

    def state_dict(self):
        return {"at": 3}

    def load_state_dict(self, state):
        self.state = state


def test_a_checkpoint_carries_mps_random_state_and_one_without_it_resumes(monkeypatch):
    mps_state, restored = torch.arange(8, dtype=torch.uint8), []
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: mps_state.clone())
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda state: restored.append(state))
    model = small_model()
    opt = optimizer(model, 1e-3, 0.0, (0.9, 0.99), "cpu")
    tokenizer = type("Tokenizer", (), {"state_dict": lambda self: {}})()
    mps = torch.device("mps")  # a device object only: nothing is put on it
    state = checkpoint.capture(2, [0], model, opt, tokenizer, {}, Stream(), mps)
    assert torch.equal(state["rng"][0]["mps"], mps_state)
    assert checkpoint.restore(state, 0, model, opt, Stream(), mps) == 2
    assert len(restored) == 1 and torch.equal(restored[0], mps_state)
    del state["rng"][0]["mps"]  # as a checkpoint written before MPS's state was kept
    assert checkpoint.restore(state, 0, model, opt, Stream(), mps) == 2
    assert len(restored) == 1


@pytest.mark.parametrize("kind, fused", [("cpu", False), ("cuda", True), ("mps", True)])
def test_adamw_is_fused_on_a_gpu_and_not_on_the_cpu(kind, fused):
    # The CPU's fused AdamW rounds differently: the CPU records and the shipped model would not reproduce.
    adamw = optimizer(small_model(), 1e-3, 0.0, (0.9, 0.99), kind)
    assert bool(adamw.defaults["fused"]) == fused
