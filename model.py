"""The GPT: token and learned position embeddings, n_layer pre-norm GPT-2 blocks, a final
LayerNorm and an untied linear head. GPT.forward is the one implementation of the network:
training, evaluation, sampling (GPT.generate, through a KVCache) and explain.py (through a trace)
all run it.

Switches, all off in GPTConfig, the reference architecture: rotary positions instead of learned
ones (rope; with rope_half, half of each head's channel pairs not turned; with rope_unturned_first,
the first half of its channels), a SwiGLU MLP (swiglu), a head tied to the token embedding
(tie_weights), the MLP's width (mlp_hidden), a gate on each attention head (attn_gate: a sigmoid of
a learned projection of the sublayer's input, so a head can add nothing where its average has
nothing to say), and three that hand the one block what it cannot easily find through attention's
averages:
- token shift (token_shift, RWKV's name): the embedding and each sublayer's input get a learned
  per-channel share of the shift_reach positions before added; with shift_gate, scaled at each
  position by 2 sigmoid of a learned projection of that input, so a character takes more or less;
- a bigram table (bigram rows, from zero): a learned vector for each (previous, current) pair of
  characters added to the input, the commonest pairs of the training data a row each (pair_index);
- key offset (key_offset): the first half of each head's key channels are the previous
  position's, so a query can match the character before a position and read the one at it: an
  induction head in one layer.
config.py's recipe turns them all on, token shift reaching two back, with rotary positions (the
second half of each head's channels turned), the attention gate and a SwiGLU MLP (docs/speedrun.md
says why).
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
    rope_half: bool = False  # rotary: half of each head's channel pairs not turned, the rest at 1 to 1/1024 a position
    rope_unturned_first: bool = False  # rope_half's unturned half: each head's first channels (key offset's)
    swiglu: bool = False  # a SwiGLU MLP instead of GELU; by default of about the GELU MLP's parameter count
    tie_weights: bool = False  # lm_head uses wte's weights
    token_shift: bool = False  # add to each position a learned share of the previous one's embedding and sublayer inputs
    shift_reach: int = 1  # token shift's reach: the shares of this many positions before are added
    mlp_hidden: int = 0  # hidden width of the MLP; 0: 4 * n_embd (SwiGLU: 8/3 * n_embd)
    bigram: int = 0  # rows of a table of (previous, current) character pairs added to the input; 0: none
    key_offset: bool = False  # the first half of each head's key channels come from the position before
    attn_gate: bool = False  # each head's output scaled by a sigmoid of a learned projection of its input
    shift_gate: bool = False  # token shift's shares at each position scaled by 2 sigmoid of a projection of its input


class KVCache:
    """What sampling keeps of the positions seen, so a new character costs one position's work: pos,
    how many, and under each module's own key what it needs of them: attention its keys and values,
    token shift the inputs before, key offset the last key, the bigram table the last id."""

    def __init__(self):
        self.pos, self.kept = 0, {}

    def extend(self, key, new, dim, keep=0):
        """What is kept under key with new after it along dim; kept in its place: all of it, or its last keep."""
        if key in self.kept:
            new = torch.cat((self.kept[key], new), dim)
        n = new.size(dim)
        self.kept[key] = new.narrow(dim, max(n - keep, 0), min(n, keep)) if keep else new
        return new


class Rotary(nn.Module):
    """Rotary position embeddings (Su et al., RoFormer): each pair of channels (i, i + d / 2) of a
    query or key's last d channels (all head_dim of them, but for unturned_first) is turned by an
    angle proportional to its position, so q . k depends on their distance."""

    def __init__(self, head_dim, block_size, half=False, unturned_first=False):
        super().__init__()
        # unturned_first: rope_half's unturned channels are the first half, key offset's, and the
        # second half is turned in pairs of its own: the character before a key matches by content alone
        self.skip = head_dim - 2 * (head_dim // 4) if half and unturned_first else 0
        d = head_dim - self.skip
        if half:  # modded-nanogpt's: half the pairs not turned, so they match content at any distance
            turned = 1024 ** -torch.linspace(0, 1, head_dim // 4)
            inv_freq = torch.cat((turned, torch.zeros(d // 2 - len(turned))))
        else:
            inv_freq = 10000.0 ** (-torch.arange(0, d, 2).float() / d)
        angles = torch.outer(torch.arange(block_size).float(), inv_freq)  # (block_size, d / 2)
        # The rotation as x * cos + (x's halves swapped) * sin, with sin's first half negated: two
        # products of the whole head instead of four of its halves. Not persistent: derived from
        # the config, so checkpoints stay weights and moments only.
        self.register_buffer("cos", angles.cos().repeat(1, 2), persistent=False)
        self.register_buffer("sin", torch.cat((-angles.sin(), angles.sin()), 1), persistent=False)

    def forward(self, x, start):
        """x (..., T, head_dim) at positions start .. start + T - 1, rotated."""
        kept, x = x[..., :self.skip], x[..., self.skip:]
        T, half = x.size(-2), x.size(-1) // 2
        swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
        x = x * self.cos[start:start + T] + swapped * self.sin[start:start + T]
        return torch.cat((kept, x), dim=-1) if self.skip else x


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
        head_dim = config.n_embd // config.n_head
        self.rotary = Rotary(head_dim, config.block_size, config.rope_half,
                             config.rope_unturned_first) if config.rope else None
        self.key_offset = config.key_offset

    def forward(self, x, cache=None, trace=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.rotary is not None:
            start = 0 if cache is None else cache.pos
            q, k = self.rotary(q, start), self.rotary(k, start)
        if self.key_offset:  # a query can then find the position after a match: induction in one layer
            k = offset_keys(k) if cache is None else offset_keys(cache.extend((self, "key"), k, 2, keep=1))[:, :, -T:]
        if cache is not None:  # after the keys and values of the positions before
            k, v = cache.extend((self, "k"), k, 2), cache.extend((self, "v"), v, 2)
        if trace is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:  # the weights themselves, which the fused kernel never holds, for a view of the inside
            causal = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril(k.size(2) - T)
            att = F.softmax((q @ k.transpose(-2, -1) / math.sqrt(k.size(-1))).masked_fill(~causal, -math.inf), -1)
            y = att @ v
            trace["attention"].append(att)
        if self.c_gate is not None:
            y = y * torch.sigmoid(self.c_gate(x)).transpose(1, 2).unsqueeze(-1)
        if trace is not None:  # each head through its slice of the output projection: what it adds to the stream
            trace["heads"].append(torch.einsum("bhtd,chd->bhtc", y, self.c_proj.weight.view(C, self.n_head, -1)))
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


def offset_keys(k):
    """key_offset's keys: k (B, n_head, T, head_dim) with the first half of each position's channels
    replaced by those of the position before (zeros at position 0)."""
    half = k.size(-1) // 2
    return torch.cat((F.pad(k[..., :half], (0, 0, 1, 0))[:, :, :-1], k[..., half:]), dim=-1)


class MLP(nn.Module):
    """GPT-2's GELU MLP; with swiglu, silu(x W) * (x V) (Shazeer, GLU Variants Improve Transformer),
    W and V in one product, by default 8/3 n_embd wide: about GELU's parameters at 4 n_embd."""

    def __init__(self, config):
        super().__init__()
        self.swiglu = config.swiglu
        self.hidden = config.mlp_hidden or (8 * config.n_embd // 3 if config.swiglu else 4 * config.n_embd)
        self.c_fc = nn.Linear(config.n_embd, (1 + config.swiglu) * self.hidden)
        self.c_proj = nn.Linear(self.hidden, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.swiglu:
            gate, value = h.split(self.hidden, dim=-1)
            return self.dropout(self.c_proj(F.silu(gate) * value))
        return self.dropout(self.c_proj(F.gelu(h)))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        # Token shift's shares for attention's input and the MLP's, alternating: of the position before,
        # then of the one two before, ... Registered first, as the parameter order is what an
        # optimizer's saved state is keyed by.
        self.shift = shift_shares(config, 2)
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)
        self.shift_gate_1, self.shift_gate_2 = shift_gate(config), shift_gate(config)

    def forward(self, x, cache=None, trace=None):
        shares = list(self.shift)
        x = x + self.attn(mix(self.ln_1(x), shares[0::2], self.shift_gate_1, cache, (self, 1)), cache, trace)
        out = self.mlp(mix(self.ln_2(x), shares[1::2], self.shift_gate_2, cache, (self, 2)))
        if trace is not None:
            trace["mlp"].append(out - self.mlp.c_proj.bias)
        return x + out


def shift_shares(config, sites):
    """token_shift's shares (per channel, from 0) of shift_reach positions for each of sites sites:
    an empty list without token_shift."""
    n = sites * config.shift_reach if config.token_shift else 0
    return nn.ParameterList(nn.Parameter(torch.zeros(config.n_embd)) for _ in range(n))


def shift_gate(config):
    """shift_gate's projection of a site's input (n_embd -> 1), or None without it. Its weights start at
    zero (GPT zeroes them), so the gate starts at 1: the model without it."""
    return nn.Linear(config.n_embd, 1) if config.token_shift and config.shift_gate else None


def mix(x, shares, gate=None, cache=None, key=None):
    """token_shift: x (B, T, C) plus shares[k - 1] (C) times x moved k positions later, for each k; with
    gate (shift_gate's projection) what the shares add is scaled at each position by 2 sigmoid(gate(x)),
    so that a character can take more or less of those before it. cache keeps, under key, the inputs
    of the len(shares) positions before x's (fewer, or none, near position 0)."""
    if not shares:
        return x
    if cache is None:
        out = Mix.apply(x, *shares)
    else:  # sampling: no gradient wanted, so not through autograd.Function, whose call costs as much again
        T = x.size(1)
        out = shifted(cache.extend(key, x, 1, keep=len(shares)), shares)[:, -T:]
    return out if gate is None else x + 2 * torch.sigmoid(gate(x)) * (out - x)


def shifted(x, shares):
    """x (B, T, C) plus shares[k - 1] (C) times x moved k positions later, each added into a slice in place."""
    out = x.clone()
    for k, share in enumerate(shares, 1):
        out[:, k:].addcmul_(x[:, :-k], share)
    return out


class Mix(torch.autograd.Function):
    """mix's shares added, its gradient written out: each product added into a slice in place, without
    the padded copies and zero-filled gradients of autograd's x + share * pad(x)[:, :-k]: the recipe
    trains 1.066 times as fast on one CPU thread (docs/speedrun.md, "After record 8")."""

    @staticmethod
    def forward(ctx, x, *shares):
        ctx.save_for_backward(x, *shares)
        return shifted(x, shares)

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
    """The bigram table's row for each pair of ids, a (vocab_size + 1, vocab_size) table indexed by
    (previous + 1, current), previous -1 at a window's start: ((previous + 1) * PAIR_HASH + current)
    % bigram. With counts (how often each pair occurs in the training text, of that shape), the
    bigram commonest pairs get a row each instead, commonest first (docs/speedrun.md measures it)."""
    index = (torch.arange(vocab_size + 1).view(-1, 1) * PAIR_HASH + torch.arange(vocab_size)) % bigram
    if counts is not None:
        top = counts.flatten().argsort(descending=True, stable=True)[:bigram]
        top = top[counts.flatten()[top] > 0]
        index.view(-1)[top] = torch.arange(len(top))
    return index.int()  # half the size in a checkpoint: a BPE vocabulary makes the table large


def pair_rows(idx, index):
    """The bigram table's row for each position of idx (B, T), read from index (pair_index's table)
    for the id before it and its own; none is before the first (-1: a window's start)."""
    return index[F.pad(idx[:, :-1], (1, 0), value=-1) + 1, idx]


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.shift = shift_shares(config, 1)  # token shift's at the embedding; first, as the blocks' are
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

    def forward(self, idx, targets=None, cache=None, trace=None):
        """(logits, loss): logits for every position when training (targets given), else for the last
        one only. With cache (a KVCache) idx's positions come after those the cache holds, whose
        keys, values and the rest they read, and what later calls need of them is kept there; a
        cache takes a prompt, then one id at a time. With trace (a dict), what explain.py shows is
        put there: "terms", the parts that add up to the residual stream entering ln_f, by name, and
        "attention", each block's attention weights (B, n_head, T, T)."""
        B, T = idx.shape
        start = 0 if cache is None else cache.pos
        assert start + T <= self.config.block_size, "sequence longer than block_size"
        assert start == 0 or T == 1, "a cache takes a prompt first, then one id at a time"
        x = tok = self.transformer.wte(idx)
        if not self.config.rope:
            x = x + self.transformer.wpe.weight[start:start + T]  # a slice: cheaper than a lookup
        shifted = mix(x, list(self.shift), self.shift_gate, cache, self)
        if trace is not None:
            trace.update(terms={"token": tok}, attention=[], heads=[], mlp=[])
            if not self.config.rope:
                trace["terms"]["position"] = self.transformer.wpe.weight[start:start + T].expand_as(tok)
            if self.config.token_shift:
                trace["terms"]["shift"] = shifted - x
        x = shifted
        if self.config.bigram:
            ids = idx if cache is None else cache.extend(self.bigram, idx, 1, keep=1)  # and the id before idx's first
            rows = self.bigram(pair_rows(ids, self.pair_index)[:, -T:])
            if trace is not None:
                trace["terms"]["bigram"] = rows
            x = x + rows
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, cache, trace)
        x = self.transformer.ln_f(x)
        if trace is not None:
            record_blocks(trace, self)
        if cache is not None:
            cache.pos += T
        if targets is None:
            return self.lm_head(x[:, -1, :]), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @torch.inference_mode()  # cheaper than no_grad: no version counters on the new tensors
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=0, eos_id=None, generator=None):
        """Continue each row of idx (B, T) by up to max_new_tokens ids; one list of new ids per row.
        temperature 0 is greedy; top_k > 0 samples among the k likeliest only. A row stops at eos_id,
        looked for every EOS_CHECK ids (each look waits for the device; what a row drew past its end
        is trimmed). When the key/value cache is full it starts again from the last block_size // 2
        ids, so every step sees at least that many and costs the same."""
        T = self.config.block_size
        draw_on = torch.device("cpu") if idx.device.type == "mps" else idx.device  # see pick
        if generator is not None and generator.device != draw_on:  # one for the device, seeded from it
            generator = torch.Generator(draw_on).manual_seed(int(torch.randint(2**62, (), generator=generator)))
        cache, new = KVCache(), []
        logits = self(idx[:, -T:], cache=cache)[0]
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)  # the rows that drew eos_id
        while len(new) < max_new_tokens:
            new.append(pick(logits, temperature, top_k, generator))
            if eos_id is not None and len(new) % EOS_CHECK == 0:
                done |= (torch.cat(new[-EOS_CHECK:], 1) == eos_id).any(1)
                if done.all():
                    break
            if len(new) == max_new_tokens:
                break
            if cache.pos == T:
                cache = KVCache()
                logits = self(torch.cat([idx, *new[-(T // 2):]], 1)[:, -(T // 2):], cache=cache)[0]
            else:
                logits = self(new[-1], cache=cache)[0]
        rows = torch.cat(new, 1).tolist() if new else [[] for _ in range(idx.size(0))]
        return [row[:row.index(eos_id) + 1] if eos_id in row else row for row in rows]

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


def record_blocks(trace, model):
    """The blocks' terms of trace: each head's and each MLP's output, and the output projections'
    biases summed."""
    for i, (heads, mlp) in enumerate(zip(trace.pop("heads"), trace.pop("mlp"))):
        trace["terms"].update({f"block{i}.head{h}": heads[:, h] for h in range(heads.size(1))})
        trace["terms"][f"block{i}.mlp"] = mlp
    biases = sum(block.attn.c_proj.bias + block.mlp.c_proj.bias for block in model.transformer.h)
    trace["terms"]["biases"] = biases.expand_as(trace["terms"]["token"])


# generate looks for the end of a story every this many ids: each look waits for the device.
EOS_CHECK = 32


def pick(logits, temperature, top_k, generator=None):
    """The next id for each row of logits (B, vocab), as a (B, 1) tensor on logits' device."""
    device, logits = logits.device, logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    if device.type == "mps":  # sampling ops on MPS have returned out-of-range indices: drawn on the CPU
        return pick(logits.cpu(), temperature, top_k, generator).to(device)
    if top_k:
        logits, ids = torch.topk(logits, min(top_k, logits.size(-1)))
    # The largest p_i / e_i, with each e_i drawn from Exp(1), is i with probability p_i:
    # torch.multinomial's distribution at a third of its cost for one row, and no wait for the host.
    probs = F.softmax(logits / temperature, dim=-1)
    choice = probs.div_(torch.empty_like(probs).exponential_(generator=generator)).argmax(dim=-1, keepdim=True)
    return ids.gather(1, choice) if top_k else choice


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
