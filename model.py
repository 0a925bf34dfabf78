"""The GPT: token and learned position embeddings, n_layer pre-norm GPT-2 blocks, a final
LayerNorm and an untied linear head. Plain nn.Module, no framework.

Switches, all off in GPTConfig, the reference architecture: rotary position embeddings instead of
learned ones (rope), a SwiGLU MLP instead of GELU (swiglu), a head that shares the token
embedding's weights (tie_weights), the MLP's hidden width (mlp_hidden), a gate on each attention
head's output (attn_gate: a sigmoid of a learned n_embd -> n_head projection of the sublayer's
input, so that a head can add nothing where its average has nothing to say), and three that hand
the one block what it cannot easily find through attention's averages:
- token shift (token_shift, RWKV's name for it): each position's embedding, and the input of each
  sublayer, gets a learned per-channel share of the previous position's added, and with
  shift_reach k of each of the k positions before; k x n_embd parameters at the embedding and
  2k x n_embd per block. With shift_gate, what the shares add is scaled at each position by
  2 sigmoid of a learned n_embd -> 1 projection of that input (from 1), so a character can take
  more or less of those before it;
- a bigram table (bigram rows of n_embd, from zero): a learned vector for each pair of (previous,
  current) characters, added to the input, so the block starts from the pair, not from the two
  characters apart; the commonest pairs of the training data get a row each (pair_index);
- key offset (key_offset): the first half of each head's key channels are the previous position's,
  so a query can match the character before a position and read the one at it: in one layer, the
  copying of a name seen earlier that otherwise takes two (an induction head).
The speedrun's recipe in config.py turns the three and both gates on, token shift reaching two
positions back (docs/speedrun.md says why, with the screens).

Attention goes through torch's scaled_dot_product_attention, which picks a fused (flash)
kernel on CPU and GPU. Sampling runs generate.py's decode, the same pass written again over
plain weight tensors with a key/value cache: a change to the network goes there too.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int = 128  # characters of context
    n_layer: int = 1
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    rope: bool = False  # rotary position embeddings on queries and keys instead of a learned wpe
    swiglu: bool = False  # a SwiGLU MLP instead of GELU; by default of about the GELU MLP's parameter count
    tie_weights: bool = False  # lm_head uses wte's weights
    token_shift: bool = False  # add to each position a learned share of the previous one's embedding and sublayer inputs
    shift_reach: int = 1  # token shift's reach: the shares of this many positions before are added
    mlp_hidden: int = 0  # hidden width of the MLP; 0: 4 * n_embd (SwiGLU: 8/3 * n_embd)
    bigram: int = 0  # rows of a table of (previous, current) character pairs added to the input; 0: none
    key_offset: bool = False  # the first half of each head's key channels come from the position before
    attn_gate: bool = False  # each head's output scaled by a sigmoid of a learned projection of its input
    shift_gate: bool = False  # token shift's shares at each position scaled by 2 sigmoid of a projection of its input


class Rotary(nn.Module):
    """Rotary position embeddings (Su et al., RoFormer): each pair of channels of a query or key
    is turned by an angle proportional to its position, so q . k depends on their distance."""

    def __init__(self, head_dim, block_size, base=10000.0):
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_dim, 2).float() / head_dim)
        angles = torch.outer(torch.arange(block_size).float(), inv_freq)  # (block_size, head_dim / 2)
        # Not persistent: derived from the config, so checkpoints stay weights and moments only.
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x, start):
        """x (..., T, head_dim) at positions start .. start + T - 1, rotated. start is an int, or a
        one-element tensor (then T is 1), which a CUDA graph can take as an input."""
        T, half = x.size(-2), x.size(-1) // 2
        if isinstance(start, int):
            cos, sin = self.cos[start:start + T], self.sin[start:start + T]
        else:
            cos, sin = self.cos.index_select(0, start), self.sin.index_select(0, start)
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v in one product
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.c_gate = nn.Linear(config.n_embd, config.n_head) if config.attn_gate else None
        self.rotary = Rotary(config.n_embd // config.n_head, config.block_size) if config.rope else None
        self.key_offset = config.key_offset

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.rotary is not None:
            q, k = self.rotary(q, 0), self.rotary(k, 0)
        if self.key_offset:  # a query can then find the position after a match: induction in one layer
            k = offset_keys(k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        if self.c_gate is not None:
            y = y * torch.sigmoid(self.c_gate(x)).transpose(1, 2).unsqueeze(-1)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


def offset_keys(k):
    """key_offset's keys: k (B, n_head, T, head_dim) with the first half of each position's channels
    replaced by those of the position before (zeros at position 0)."""
    half = k.size(-1) // 2
    return torch.cat((F.pad(k[..., :half], (0, 0, 1, 0))[:, :, :-1], k[..., half:]), dim=-1)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden = config.mlp_hidden or 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, hidden)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(hidden, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class SwiGLU(nn.Module):
    """silu(x W) * (x V), projected back (Shazeer, GLU Variants Improve Transformer). Two input
    matrices instead of one, so the hidden width is mlp_hidden, or else 2/3 of GELU's 4 * n_embd:
    at the same width, about 3/2 of GELU's parameters and work."""

    def __init__(self, config):
        super().__init__()
        self.hidden = config.mlp_hidden or 8 * config.n_embd // 3
        self.c_fc = nn.Linear(config.n_embd, 2 * self.hidden)  # gate and value in one product
        self.c_proj = nn.Linear(self.hidden, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        gate, value = self.c_fc(x).split(self.hidden, dim=-1)
        return self.dropout(self.c_proj(F.silu(gate) * value))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = SwiGLU(config) if config.swiglu else MLP(config)
        # Per channel, the shares of the positions before in each sublayer's input, from 0: shift_1 and
        # shift_2 for the one before, shift_1_back2 and shift_2_back2 for the one two before, ...
        self.shares = share_names(config, ("shift_1", "shift_2"))
        for name in [name for position in zip(*self.shares) for name in position]:
            setattr(self, name, nn.Parameter(torch.zeros(config.n_embd)))
        self.shift_gate_1, self.shift_gate_2 = (shift_gate(config) for _ in range(2))

    def forward(self, x):
        h = mix(self.ln_1(x), [getattr(self, name) for name in self.shares[0]], self.shift_gate_1)
        x = x + self.attn(h)
        h = mix(self.ln_2(x), [getattr(self, name) for name in self.shares[1]], self.shift_gate_2)
        return x + self.mlp(h)


def share_names(config, sites):
    """token_shift's parameter names, [[site's share of the position before, of the one two before,
    ...] for each site]; empty lists without token_shift."""
    reach = config.shift_reach if config.token_shift else 0
    return [[site + (f"_back{k}" if k > 1 else "") for k in range(1, reach + 1)] for site in sites]


def shift_gate(config):
    """shift_gate's projection of a site's input (n_embd -> 1), or None without it. Its weights start at
    zero (GPT zeroes them), so the gate starts at 1: the model without it."""
    return nn.Linear(config.n_embd, 1) if config.token_shift and config.shift_gate else None


def mix(x, shares, gate=None):
    """token_shift: x (B, T, C) plus shares[k - 1] (C) times x moved k positions later, for each k; with
    gate (shift_gate's projection) what the shares add is scaled at each position by 2 sigmoid(gate(x)),
    so that a character can take more or less of those before it."""
    if not shares:
        return x
    out = Mix.apply(x, *shares)
    return out if gate is None else x + 2 * torch.sigmoid(gate(x)) * (out - x)


class Mix(torch.autograd.Function):
    """mix, its gradient written out: each share's product is added into a slice in place, so that
    neither pass makes the padded copies of x and the zero-filled gradients of them that autograd's
    form of it (x + share * pad(x)[:, :-k]) does: the speedrun's recipe trains 1.066 times as fast
    on one CPU thread (docs/speedrun.md, "After record 8")."""

    @staticmethod
    def forward(ctx, x, *shares):
        ctx.save_for_backward(x, *shares)
        out = x.clone()
        for k, share in enumerate(shares, 1):
            out[:, k:].addcmul_(x[:, :-k], share)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, *shares = ctx.saved_tensors
        grad_x = grad.clone()
        grad_shares = []
        for k, share in enumerate(shares, 1):
            grad_x[:, :-k].addcmul_(grad[:, k:], share)
            grad_shares.append((grad[:, k:] * x[:, :-k]).sum((0, 1)))
        return grad_x, *grad_shares


# Odd, and much larger than any vocabulary: (a + 1) * PAIR_HASH + b gives distinct pairs distinct
# numbers, and their rows do not depend on the vocabulary's size, which fine-tuning may grow.
PAIR_HASH = 1_000_003


def pair_index(vocab_size, bigram, counts=None):
    """The bigram table's row for each pair of ids, as a (vocab_size + 1, vocab_size) table indexed by
    (previous + 1, current); previous is -1 at a window's start, where none is in view. Each pair is
    hashed to ((previous + 1) * PAIR_HASH + current) % bigram. With counts, a table of that shape (how
    often each pair occurs in the training text), the bigram commonest pairs get a row each instead,
    commonest first, and the rest keep their hashed rows: hashed, common pairs share rows too
    (docs/speedrun.md measures what a row of their own is worth)."""
    index = (torch.arange(vocab_size + 1).view(-1, 1) * PAIR_HASH + torch.arange(vocab_size)) % bigram
    if counts is not None:
        top = counts.flatten().argsort(descending=True, stable=True)[:bigram]
        top = top[counts.flatten()[top] > 0]
        index.view(-1)[top] = torch.arange(len(top))
    return index.int()  # half the size in a checkpoint: a BPE vocabulary makes the table large


def pair_rows(idx, index, before=None):
    """The bigram table's row for each position of idx (B, T), read from index (pair_index's table)
    for the id before it and its own. The id before the first position is before (B, 1); None means
    a window's start, where none is in view."""
    before = idx.new_full((idx.size(0), 1), -1) if before is None else before
    previous = before if idx.size(1) == 1 else torch.cat([before, idx[:, :-1]], 1)  # one id: no copy to make
    return index[previous + 1, idx]


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        modules = dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        )
        if config.rope:  # rotary embeddings place positions inside attention instead
            del modules["wpe"]
        # In this order, so that the default model's initial weights and parameter order (which
        # the optimizer's saved state is keyed by) stay what they were before the switches.
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.transformer.wte.weight
        self.shares = share_names(config, ["shift"])[0]  # the embedding's shares, as the blocks'
        for name in self.shares:
            setattr(self, name, nn.Parameter(torch.zeros(config.n_embd)))
        self.shift_gate = shift_gate(config)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            # GPT-2: scale the projections into the residual stream so its variance does not grow with depth.
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
            elif "shift_gate" in name and name.endswith("weight"):  # the shift gate starts at 1
                nn.init.zeros_(p)
        if config.bigram:  # made last, from zero: the model starts as the one without it, weight for weight
            self.bigram = nn.Embedding(config.bigram, config.n_embd)
            nn.init.zeros_(self.bigram.weight)
            # Hashed rows; a fresh run of train.py gives the commonest pairs of its data a row each.
            self.register_buffer("pair_index", pair_index(config.vocab_size, config.bigram))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self):
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def flops_per_char(self):
        """Floating-point operations to train on one character, forward and backward: 6 per weight
        of every matrix product, plus attention's scores and weighted sum over the full context (as
        nanoGPT and the PaLM paper count them)."""
        matrix_weights = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        c = self.config
        return 6 * matrix_weights + 12 * c.n_layer * c.n_embd * c.block_size

    def forward(self, idx, targets=None):
        """Logits for every position when training (targets given), else for the last one only.
        generate.decode is this pass and the blocks' again, for sampling: a change here goes there too."""
        B, T = idx.shape
        assert T <= self.config.block_size, "sequence longer than block_size"
        x = self.transformer.wte(idx)
        if not self.config.rope:
            x = x + self.transformer.wpe.weight[:T]  # a slice: cheaper than a lookup
        x = mix(x, [getattr(self, name) for name in self.shares], self.shift_gate)
        if self.config.bigram:
            x = x + self.bigram(pair_rows(idx, self.pair_index))
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, -1, :]), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def param_groups(self, weight_decay, muon=False):
        """(AdamW's parameter groups, Muon's parameters) for optim.optimizer: weight decay on the
        matrices and embeddings only, not on biases and norms; with muon the blocks' matrices go to
        Muon instead (none without). The bigram table is a group of its own, named "bigram", for its
        own learning rate (train.py's BIGRAM_LR)."""
        params = dict(self.named_parameters())
        hidden = [p for name, p in params.items() if muon and name.startswith("transformer.h.") and p.dim() == 2]
        rest = [p for name, p in params.items() if name != "bigram.weight" and not any(p is q for q in hidden)]
        groups = [
            {"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
        ]
        if self.config.bigram:
            groups.append({"params": [self.bigram.weight], "weight_decay": weight_decay, "name": "bigram"})
        return groups, hidden


def grow_vocabulary(weights, model):
    """weights, a state_dict of a model like model with fewer ids (or as many), for model to load: the
    token embedding and the head keep their rows for the old ids and take those of the new ids from
    model's own initialisation, as a fresh model has them; the old pairs keep their rows of the bigram
    table, the new ones take model's hashed rows; every other weight is unchanged."""
    own = model.state_dict()

    def grown(name, w):
        if name in ("transformer.wte.weight", "lm_head.weight"):
            return torch.cat([w, own[name][len(w):]])
        if name == "pair_index":
            index = own[name].clone()
            index[:w.size(0), :w.size(1)] = w  # new ids come last, so the old pairs keep their places
            return index
        return w
    return {name: grown(name, w) for name, w in weights.items()}
