"""Muon with its Newton-Schulz iteration in float32, against torch's."""

import torch

from optim import Muon


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
