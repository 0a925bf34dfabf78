"""The GPT: token and learned position embeddings, n_layer pre-norm GPT-2 blocks, a final
LayerNorm and an untied linear head. Plain nn.Module, no framework.

Four switches, all off in GPTConfig, the reference architecture: rotary position embeddings
instead of learned ones (rope), a SwiGLU MLP instead of GELU (swiglu), a head that shares the
token embedding's weights (tie_weights), and token shift (token_shift, RWKV's name for it): each
position's embedding, and the input of each sublayer, gets a learned per-channel share of the
previous position's added. One block sees the characters before it only through attention's
averages; the shift hands it the last one directly, for n_embd parameters at the embedding and
2 x n_embd per block. The speedrun's recipe in config.py turns it on (README, "The 10-minute CPU
speedrun", says why).

Attention goes through torch's scaled_dot_product_attention, which picks a fused (flash)
kernel on CPU and GPU. Sampling runs decode, the same forward pass written over plain weight
tensors, with a key/value cache: each new character costs one position's work, not the whole
context's. On CUDA that step and the draw are replayed as one CUDA graph (static_step).

Also the device helpers the scripts share: which device, which compute dtype and its
matrix-product rate (MFU's yardstick), deterministic kernels, and a torchrun process's GPU.
"""

import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from config import UserError


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int = 128  # characters of context
    n_layer: int = 1
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    rope: bool = False  # rotary position embeddings on queries and keys instead of a learned wpe
    swiglu: bool = False  # SwiGLU MLP of about the GELU MLP's parameter count
    tie_weights: bool = False  # lm_head uses wte's weights
    token_shift: bool = False  # add to each position a learned share of the previous one's embedding and sublayer inputs


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
        self.rotary = Rotary(config.n_embd // config.n_head, config.block_size) if config.rope else None

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.rotary is not None:
            q, k = self.rotary(q, 0), self.rotary(k, 0)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class SwiGLU(nn.Module):
    """silu(x W) * (x V), projected back (Shazeer, GLU Variants Improve Transformer). Two input
    matrices instead of one, so the hidden width is 2/3 of GELU's 4 * n_embd: about the same
    parameters and work."""

    def __init__(self, config):
        super().__init__()
        self.hidden = 8 * config.n_embd // 3
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
        self.token_shift = config.token_shift
        if config.token_shift:  # per channel, the share of the previous position's input; from 0
            self.shift_1 = nn.Parameter(torch.zeros(config.n_embd))
            self.shift_2 = nn.Parameter(torch.zeros(config.n_embd))

    def forward(self, x):
        h = self.ln_1(x)
        if self.token_shift:
            h = h + self.shift_1 * shifted(h)
        x = x + self.attn(h)
        h = self.ln_2(x)
        if self.token_shift:
            h = h + self.shift_2 * shifted(h)
        return x + self.mlp(h)


def shifted(x):
    """x (B, T, C) moved one position later: position t holds x[:, t - 1], position 0 zeros."""
    return F.pad(x, (0, 0, 1, 0))[:, :-1]


# generate looks for the end of a story every this many characters: each look waits for the device.
EOS_CHECK = 32


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
        if config.token_shift:
            self.shift = nn.Parameter(torch.zeros(config.n_embd))
        self.apply(self._init_weights)
        # GPT-2: scale the projections into the residual stream so its variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

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
        """Logits for every position when training (targets given), else for the last one only."""
        B, T = idx.shape
        assert T <= self.config.block_size, "sequence longer than block_size"
        x = self.transformer.wte(idx)
        if not self.config.rope:
            x = x + self.transformer.wpe.weight[:T]  # a slice: cheaper than a lookup
        if self.config.token_shift:
            x = x + self.shift * shifted(x)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, -1, :]), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def optimizer(self, learning_rate, weight_decay, betas, device_type, muon=False):
        """AdamW with weight decay on the matrices and embeddings only, not on biases and norms. With
        muon, the blocks' matrices go to Muon instead (orthogonalised momentum; its rate scaled to
        match AdamW's update size, so one learning rate serves both), the rest stays with AdamW."""
        params = dict(self.named_parameters())
        hidden = [p for name, p in params.items() if muon and name.startswith("transformer.h.") and p.dim() == 2]
        rest = [p for p in params.values() if not any(p is q for q in hidden)]
        groups = [
            {"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
        ]
        adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")
        if not hidden:
            return adamw
        return Optimizers(adamw, Muon(hidden, lr=learning_rate, weight_decay=weight_decay,
                                      adjust_lr_fn="match_rms_adamw"))

    def new_cache(self, batch, like):
        """An empty key/value cache for decode, zeros of like's dtype and device: (n_layer, batch, n_head,
        slots, block_size, head_dim), the slots keys and values, and with token_shift also the unshifted
        embedding and sublayer inputs."""
        c = self.config
        return like.new_zeros(c.n_layer, batch, c.n_head, 5 if c.token_shift else 2, c.block_size, c.n_embd // c.n_head)

    def decode(self, w, idx, start, cache):
        """Logits (B, vocab) for what follows idx (B, T), whose characters sit at positions start ..
        start + T - 1, after the keys and values in cache (from new_cache); theirs are written there.
        Either start is 0 (a prompt) or T is 1 (one character). start is an int, or a one-element
        tensor (T is then 1): a CUDA graph replays the same kernels at every step, so the position
        has to be data, not a slice bound; the step then writes the cache with index_copy_ and
        attends over the whole block, masked past start.

        The same computation as forward, written as plain tensor operations over w, the weights as
        plain tensors by state_dict name. At one character per step every operation is tiny, so its
        fixed cost is what counts, and an nn.Module call or an nn.Parameter argument costs about as
        much again. tests/test_model.py holds the two to the same output.
        """
        c = self.config
        B, T = idx.shape
        sliced = isinstance(start, int)  # the cheaper form on the CPU: slices, and only the context so far
        x = w["transformer.wte.weight"][idx]
        if not c.rope:
            x = x + (w["transformer.wpe.weight"].narrow(0, start, T) if sliced
                     else w["transformer.wpe.weight"].index_select(0, start))
        mask = None if sliced else (torch.arange(c.block_size, device=idx.device) <= start).view(1, 1, 1, -1)

        def mix(h, i, slot, share):
            """token_shift's h + share * (the previous position's h): the cache keeps each position's h
            in a slot after its keys and values, for the characters of later calls."""
            if not c.token_shift:
                return h
            kept = cache[i].select(2, slot)  # (B, n_head, block_size, head_dim)
            if sliced and start == 0:  # a prompt
                before = shifted(h)
            else:  # one character, whose predecessor the cache holds
                prev = kept.narrow(2, start - 1, 1) if sliced else kept.index_select(2, (start - 1).clamp(min=0))
                before = prev.transpose(1, 2).reshape(B, 1, c.n_embd)
            here = h.view(B, T, c.n_head, -1).transpose(1, 2)
            if sliced:
                kept.narrow(2, start, T).copy_(here)
            else:
                kept.index_copy_(2, start, here)
            return h + share * before

        x = mix(x, 0, 2, w.get("shift"))
        for i, block in enumerate(self.transformer.h):
            p = f"transformer.h.{i}."
            h = mix(F.layer_norm(x, (c.n_embd,), w[p + "ln_1.weight"], w[p + "ln_1.bias"]), i, 3, w.get(p + "shift_1"))
            qkv = F.linear(h, w[p + "attn.c_attn.weight"], w[p + "attn.c_attn.bias"])
            qkv = qkv.view(B, T, 3, c.n_head, -1).transpose(1, 3)  # (B, n_head, q k v, T, head_dim)
            if c.rope:
                qkv[:, :, :2] = block.attn.rotary(qkv[:, :, :2], start)
            # narrow and select rather than [...] indexing, which costs microseconds per slice
            kv = cache[i].narrow(2, 0, 2)
            if sliced:
                kv.narrow(3, start, T).copy_(qkv.narrow(2, 1, 2))
                keys, values = kv.narrow(3, 0, start + T).unbind(2)
            else:
                keys, values = kv.index_copy_(3, start, qkv.narrow(2, 1, 2)).unbind(2)
            y = F.scaled_dot_product_attention(qkv.select(2, 0), keys, values, attn_mask=mask, is_causal=T > 1)
            y = y.transpose(1, 2).reshape(B, T, c.n_embd)
            x = x + F.linear(y, w[p + "attn.c_proj.weight"], w[p + "attn.c_proj.bias"])
            h = mix(F.layer_norm(x, (c.n_embd,), w[p + "ln_2.weight"], w[p + "ln_2.bias"]), i, 4, w.get(p + "shift_2"))
            h = F.linear(h, w[p + "mlp.c_fc.weight"], w[p + "mlp.c_fc.bias"])
            if c.swiglu:
                gate, value = h.chunk(2, dim=-1)
                h = F.silu(gate) * value
            else:
                h = F.gelu(h)
            x = x + F.linear(h, w[p + "mlp.c_proj.weight"], w[p + "mlp.c_proj.bias"])
        x = F.layer_norm(x.select(1, -1), (c.n_embd,), w["transformer.ln_f.weight"], w["transformer.ln_f.bias"])
        return F.linear(x, w["lm_head.weight"])

    def static_step(self, w, cache, temperature, top_k, generator, batch):
        """step(token, pos) -> the next ids (B, 1): decode token (B, 1) at pos and draw what follows,
        through tensors allocated once (the token, the position, the random draws). On CUDA the step
        is captured once as a CUDA graph and replayed: one launch instead of some 40 kernels, and no
        wait for the host. Elsewhere the same step runs eagerly (tests/test_model.py runs it so).

        Call it before the prompt is decoded: capturing runs the step once, which writes the cache
        at position 0 until the prompt overwrites it."""
        device, vocab = cache.device, self.config.vocab_size
        token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        pos = torch.zeros(1, dtype=torch.long, device=device)
        noise = torch.ones(batch, min(top_k, vocab) if top_k else vocab, device=device)  # Exp(1) draws for pick

        def body():
            token.copy_(pick(self.decode(w, token, pos, cache), temperature, top_k, noise=noise))
            pos.add_(1)  # the next step's position, so a step in sequence needs no copy from the host

        run = body
        if device.type == "cuda":
            side = torch.cuda.Stream()  # warm up on a side stream before capturing, as torch.cuda.graph asks
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                body()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                body()
            run = graph.replay
        last = [None]  # what the previous step returned: the graph's state already follows it

        def step(given, at):
            if given is not last[0]:  # after the prompt or a rebuilt cache
                token.copy_(given)
                pos.fill_(at)
            if temperature:
                noise.exponential_(generator=generator)  # drawn outside the graph, so any generator serves
            run()
            last[0] = token.clone()
            return last[0]

        return step

    @torch.inference_mode()  # cheaper than no_grad: no version counters on the new tensors
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=0, eos_id=None,
                 generator=None, use_cache=True, graph=None):
        """Continue each row of idx (B, T) by up to max_new_tokens; returns one list of new ids per row.

        temperature 0 is greedy decoding; top_k > 0 samples among the k likeliest only. A row stops at
        eos_id (looked for every EOS_CHECK characters, so the device need not wait for the host each
        character; what a row drew past its end is trimmed). Past block_size the context slides: with
        the key/value cache, when it is full it is rebuilt from the last block_size // 2 characters, so
        every step sees at least that many and the cost per character stays flat; without it
        (use_cache=False, the slow reference) every step reruns forward over the last block_size
        characters. graph: decode one character through static_step, by default on CUDA (a CUDA
        graph); elsewhere True runs the same step eagerly.
        """
        c, device = self.config, idx.device
        T, B = c.block_size, idx.size(0)
        w = {name: t.detach() for name, t in self.state_dict().items()}
        # Zeros, not empty: the static step attends over the whole block, and a NaN left in memory
        # would reach the output through its zero attention weight.
        cache = self.new_cache(B, w["lm_head.weight"])
        draw_on = torch.device("cpu") if device.type == "mps" else device  # see pick
        if generator is not None and generator.device != draw_on:  # one for the device, seeded from it
            generator = torch.Generator(draw_on).manual_seed(int(torch.randint(2**62, (), generator=generator)))
        if not use_cache:
            graph = False
        if graph is None:
            graph = device.type == "cuda"
        step = (self.static_step(w, cache, temperature, top_k, generator, B) if graph else
                lambda token, at: pick(self.decode(w, token, at, cache), temperature, top_k, generator))
        context = idx[:, -T:]
        logits = self.decode(w, context, 0, cache) if use_cache else self(context)[0]
        pos = context.size(1)  # positions the cache holds
        new = []  # the new ids, (B, 1) each, left on the device
        done = torch.zeros(B, dtype=torch.bool, device=device)  # the rows that have drawn eos_id
        for n in range(max_new_tokens):
            if n == 0:
                token = pick(logits, temperature, top_k, generator)
            elif not use_cache:
                token = pick(self(torch.cat([context, *new[-T:]], 1)[:, -T:])[0], temperature, top_k, generator)
            elif pos == T:  # the cache is full: it starts again from the last T // 2 characters
                pos = T // 2
                recent = torch.cat([context, *new[-pos:]], 1)[:, -pos:]
                token = pick(self.decode(w, recent, 0, cache), temperature, top_k, generator)
            else:
                token = step(token, pos)
                pos += 1
            new.append(token)
            if eos_id is not None and len(new) % EOS_CHECK == 0:
                done |= (torch.cat(new[-EOS_CHECK:], 1) == eos_id).any(1)
                if done.all():  # the one wait for the device in EOS_CHECK characters
                    break
        rows = torch.cat(new, 1).tolist() if new else [[] for _ in range(B)]
        return [row[:row.index(eos_id) + 1] if eos_id in row else row for row in rows]


def grow_vocabulary(weights, model):
    """weights, a state_dict of a model like model with fewer ids (or as many), for model to load: the
    token embedding and the head keep their rows for the old ids and take those of the new ids from
    model's own initialisation, as a fresh model has them; every other weight is unchanged."""
    own = model.state_dict()
    return {name: torch.cat([w, own[name][len(w):]]) if name in ("transformer.wte.weight", "lm_head.weight") else w
            for name, w in weights.items()}


class Muon(torch.optim.Muon):
    """torch.optim.Muon with its Newton-Schulz iteration in float32 rather than bfloat16. A CPU
    without bfloat16 matrix instructions (AVX2 only, as some of this project's machines are) computes
    the bfloat16 iteration 14 times slower: 193 ms of a 470 ms training step there, against 14 ms
    in float32. On a GPU either is cheap.
    Otherwise torch's step (Nesterov momentum, decoupled weight decay, match_rms_adamw scaling) and
    torch's state, so checkpoints of either load into the other."""

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


def pick(logits, temperature, top_k, generator=None, noise=None):
    """The next id for each row of logits (B, vocab), as a (B, 1) tensor on logits' device. noise, if
    given, holds the Exp(1) draws to use (B, top_k or vocab), so that a CUDA graph can take them in."""
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
    if noise is None:
        noise = torch.empty_like(probs).exponential_(generator=generator)
    choice = probs.div_(noise).argmax(dim=-1, keepdim=True)
    return ids.gather(1, choice) if top_k else choice


def compute_dtype(device):
    """The dtype a run's matrix products are computed in: bfloat16 (under autocast) on a CUDA device
    that supports it, else float32. MFU is taken against the matrix-product rate of this dtype: the
    float32 rate would put a bf16 run far above 100%."""
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def autocast_for(device):
    """The context a run computes in: autocast to compute_dtype(device), or none for float32."""
    dtype = compute_dtype(device)
    return nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def matmul_rate(device, dtype=torch.float32, n=2048):
    """The matrix-product rate of device in dtype, in FLOP/s: the yardstick of MFU."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        (a @ b).sum().item()  # .item() waits for an asynchronous device to finish
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def make_deterministic():
    """Deterministic kernels from here on, so that on CUDA two runs with the same seed compute the
    same losses (on the CPU they do already). cuBLAS reads CUBLAS_WORKSPACE_CONFIG when CUDA starts:
    call this before anything touches the device."""
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # a fixed workspace: no reductions split by chance
    torch.use_deterministic_algorithms(True)


def rank_device(name, local_rank, local_ranks, gpus):
    """The device of torchrun's process local_rank of the local_ranks on this machine, for a DEVICE
    setting: on CUDA each process takes a GPU of its own, of the gpus there are."""
    device = pick_device(name)
    if device.type != "cuda":
        return device
    if local_ranks > gpus:
        raise UserError(f"torchrun starts {local_ranks} processes on this machine, which has {gpus} GPU"
                        f"{'' if gpus == 1 else 's'}: one process per GPU, so --nproc_per_node={gpus} at most; "
                        "--device=cpu runs the processes on the CPU")
    return torch.device("cuda", local_rank)


def pick_device(name):
    """torch.device for a DEVICE setting: auto takes cuda, else mps, else cpu."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
