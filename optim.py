"""Training's optimizers: AdamW for the embeddings, head, biases and norms, and with MUON, Muon for
the blocks' matrices, stepped, zeroed, saved and restored as one. model.py's GPT.param_groups says
which parameters go where."""

import torch


def optimizer(model, learning_rate, weight_decay, betas, device_type, muon=False, eps=1e-8):
    """AdamW over model's parameter groups; with muon also Muon over the blocks' matrices (orthogonalised
    momentum, its rate scaled to match AdamW's update size, so one learning rate serves both)."""
    groups, hidden = model.param_groups(weight_decay, muon)
    # Fused (one kernel for all parameters) on a GPU; not on the CPU, whose fused AdamW rounds
    # differently, and the CPU runs' records and the shipped model are reproduced bit for bit.
    adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=device_type in ("cuda", "mps"))
    if not hidden:
        return adamw
    return Optimizers(adamw, Muon(hidden, lr=learning_rate, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw"))


class Muon(torch.optim.Muon):
    """torch.optim.Muon with its Newton-Schulz iteration in float32 rather than bfloat16. A CPU
    without bfloat16 matrix instructions (AVX2 only, as some of this project's machines are) computes
    the bfloat16 iteration 14 times slower: 193 ms of a 470 ms training step there, against 14 ms
    in float32. On a GPU either is cheap.
    Otherwise torch's step (Nesterov momentum, decoupled weight decay, match_rms_adamw scaling) and
    torch's state, so checkpoints of either load into the other."""

    # The loop is a copy of torch's (torch/optim/_muon.py, as of 2.13): its private
    # _zeropower_via_newtonschulz casts to bfloat16 itself, and no argument of Muon's nor an optimizer
    # hook reaches that cast; replacing the private function would change every Muon in the process.
    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            assert group["nesterov"] and group["adjust_lr_fn"] == "match_rms_adamw"
            a, b, c = group["ns_coefficients"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                buf.lerp_(p.grad, 1 - group["momentum"])
                x = p.grad.lerp(buf, group["momentum"])
                tall = x.size(0) > x.size(1)  # iterate on the wide side: X @ X.T is then the small product
                x = x.T if tall else x
                x = x / x.norm().clamp(min=group["eps"])
                for _ in range(group["ns_steps"]):
                    gram = x @ x.T
                    x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(x.T if tall else x, alpha=-group["lr"] * 0.2 * max(p.shape) ** 0.5)


class Optimizers:
    """Several optimizers stepped, zeroed, saved and restored as one."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):  # looked up each time: load_state_dict replaces an optimizer's groups
        return [group for o in self.optimizers for group in o.param_groups]

    def step(self):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none=True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return [o.state_dict() for o in self.optimizers]

    def load_state_dict(self, states):
        for o, state in zip(self.optimizers, states, strict=True):
            o.load_state_dict(state)
