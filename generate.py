"""Decoding: continue a prompt with a GPT of model.py, one character at a time, greedy or sampled.

decode is GPT.forward written again over plain weight tensors, with a key/value cache: each new
character costs one position's work, not the whole context's. A change to the network in model.py
goes into decode too; tests/test_generate.py holds the two to the same logits for every switch.
On CUDA a step and its draw are replayed as one CUDA graph (static_step). generate slides the
context past block_size and stops each row at the end of its story.
"""

import sys

import torch
from torch.nn import functional as F

from model import Mix, pair_rows

# generate looks for the end of a story every this many characters: each look waits for the device.
EOS_CHECK = 32


def new_cache(model, batch, like):
    """An empty key/value cache for decode, zeros of like's dtype and device: (n_layer, batch, n_head,
    slots, block_size, head_dim), the slots keys and values, with token_shift also the unshifted
    embedding and sublayer inputs, and with key_offset the keys before the offset."""
    c = model.config
    slots = 2 + 3 * c.token_shift + c.key_offset
    return like.new_zeros(c.n_layer, batch, c.n_head, slots, c.block_size, c.n_embd // c.n_head)


def decode(model, w, idx, start, cache, before=None):
    """Logits (B, vocab) for what follows idx (B, T), whose characters sit at positions start ..
    start + T - 1, after the keys and values in cache (from new_cache); theirs are written there.
    Either start is 0 (a prompt) or T is 1 (one character); then before (B, 1) is the id before it,
    which the bigram table reads (and only it). start is an int, or a one-element
    tensor (T is then 1): a CUDA graph replays the same kernels at every step, so the position
    has to be data, not a slice bound; the step then writes the cache with index_copy_ and
    attends over the whole block, masked past start.

    The same computation as GPT.forward and its blocks in model.py, written as plain tensor
    operations over w, the weights as plain tensors by state_dict name: a change there is made here
    too. At one character per step every operation is tiny, so its fixed cost is what counts, and
    an nn.Module call or an nn.Parameter argument costs about as much again.
    tests/test_generate.py holds the two to the same output, for every switch.
    """
    c = model.config
    B, T = idx.shape
    sliced = isinstance(start, int)  # the cheaper form on the CPU: slices, and only the context so far
    prompt = sliced and start == 0  # else one character, after those the cache holds
    x = w["transformer.wte.weight"][idx]
    if not c.rope:
        x = x + (w["transformer.wpe.weight"].narrow(0, start, T) if sliced
                 else w["transformer.wpe.weight"].index_select(0, start))
    mask = None if sliced else (torch.arange(c.block_size, device=idx.device) <= start).view(1, 1, 1, -1)
    heads = (B, T, c.n_head, -1)  # a position's channels as n_head heads
    # One character after others: what token_shift and key_offset keep in the cache, read at the
    # reach positions before (shift_reach's; zeros before position 0) in one operation for every
    # layer (n_layer, B, n_head, slots, reach, head_dim), not one per slot: a captured step costs
    # what its kernels do. None for a prompt.
    earlier, reach = [None] * c.n_layer, c.shift_reach if c.token_shift else 1
    if (c.token_shift or c.key_offset) and not prompt:
        if sliced:
            earlier = cache.narrow(4, max(start - reach, 0), min(start, reach))
            earlier = F.pad(earlier, (0, 0, reach - earlier.size(4), 0)) if start < reach else earlier
        else:
            at = start - reach + torch.arange(reach, device=start.device)
            earlier = cache.index_select(4, at.clamp(min=0))
            if reach > 1:  # a graph replays one step for every position: the zeros before 0 by a mask
                earlier = earlier * (at >= 0).view(-1, 1).to(earlier.dtype)
    shift_gate = (lambda p: (w[p + "weight"], w[p + "bias"]) if c.token_shift and c.shift_gate else None)
    x = mix(x, [w[name] for name in model.shares], cache[0], earlier[0], 2, start, heads, shift_gate("shift_gate."))
    if c.bigram:
        pairs = pair_rows(idx, w["pair_index"], None if prompt else before)
        x = x + w["bigram.weight"][pairs]
    for i, block in enumerate(model.transformer.h):
        p = f"transformer.h.{i}."
        h = F.layer_norm(x, (c.n_embd,), w[p + "ln_1.weight"], w[p + "ln_1.bias"])
        shares = [[w[p + name] for name in site] for site in block.shares]  # each sublayer's, as model.Block's
        h = mix(h, shares[0], cache[i], earlier[i], 3, start, heads, shift_gate(p + "shift_gate_1."))
        qkv = F.linear(h, w[p + "attn.c_attn.weight"], w[p + "attn.c_attn.bias"])
        qkv = qkv.view(B, T, 3, c.n_head, -1).transpose(1, 3)  # (B, n_head, q k v, T, head_dim)
        if c.rope:
            qkv[:, :, :2] = block.attn.rotary(qkv[:, :, :2], start)
        if c.key_offset:
            offset_cached(qkv.select(2, 1), cache[i], earlier[i], 2 + 3 * c.token_shift, start)
        # narrow and select rather than [...] indexing, which costs microseconds per slice
        kv = cache[i].narrow(2, 0, 2)
        write(kv, start, qkv.narrow(2, 1, 2))
        keys, values = (kv.narrow(3, 0, start + T) if sliced else kv).unbind(2)
        y = F.scaled_dot_product_attention(qkv.select(2, 0), keys, values, attn_mask=mask, is_causal=T > 1)
        if c.attn_gate:
            gate = torch.sigmoid(F.linear(h, w[p + "attn.c_gate.weight"], w[p + "attn.c_gate.bias"]))
            y = y * gate.transpose(1, 2).unsqueeze(-1)
        y = y.transpose(1, 2).reshape(B, T, c.n_embd)
        x = x + F.linear(y, w[p + "attn.c_proj.weight"], w[p + "attn.c_proj.bias"])
        h = F.layer_norm(x, (c.n_embd,), w[p + "ln_2.weight"], w[p + "ln_2.bias"])
        h = mix(h, shares[1], cache[i], earlier[i], 4, start, heads, shift_gate(p + "shift_gate_2."))
        h = F.linear(h, w[p + "mlp.c_fc.weight"], w[p + "mlp.c_fc.bias"])
        if c.swiglu:
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        else:
            h = F.gelu(h)
        x = x + F.linear(h, w[p + "mlp.c_proj.weight"], w[p + "mlp.c_proj.bias"])
    x = F.layer_norm(x.select(1, -1), (c.n_embd,), w["transformer.ln_f.weight"], w["transformer.ln_f.bias"])
    return F.linear(x, w["lm_head.weight"])


def mix(h, shares, cache, earlier, slot, start, heads, gate=None):
    """token_shift's h + shares[k - 1] * (h k positions before), as model.mix, for h (B, T, n_embd) at
    positions start .. start + T - 1 as in decode, heads its shape split into heads; h itself without
    token_shift (no shares). cache is a layer's (B, n_head, slots, block_size, head_dim): its slot keeps
    each position's h, for the characters of later calls. earlier is the same at the reach positions
    before start (B, n_head, slots, reach, head_dim, read once by decode), None for a prompt. gate:
    shift_gate's (weight, bias), or None."""
    if not shares:
        return h
    write(cache.select(2, slot), start, h.view(*heads).transpose(1, 2))  # unpacked: view reads ints faster
    if earlier is None:  # a prompt: the positions before are its own
        out = Mix.apply(h, *shares)
    else:
        out, earlier = h, earlier.select(2, slot)
        for k, share in enumerate(shares, 1):  # as Mix adds them, for the same rounding
            back = earlier.narrow(2, earlier.size(2) - k, 1).transpose(1, 2).flatten(2)
            out = torch.addcmul(out, back, share)
    return out if gate is None else h + 2 * torch.sigmoid(F.linear(h, *gate)) * (out - h)


def offset_cached(k, cache, earlier, slot, start):
    """key_offset's keys, as model.offset_keys makes them, in decode's form: the first half of each
    key's channels replaced, in k (B, n_head, T, head_dim) at positions start .. start + T - 1 as in
    decode, by those of the key before it (zeros before position 0). The slot of cache keeps each
    position's key as computed, for later calls; cache and earlier as in mix."""
    raw, half = cache.select(2, slot), k.size(-1) // 2
    write(raw, start, k)
    if earlier is None:  # a prompt
        before = F.pad(raw.narrow(2, 0, k.size(2) - 1), (0, 0, 1, 0))
    else:
        before = earlier.select(2, slot)
        before = before.narrow(2, before.size(2) - 1, 1)  # the position just before
    k[..., :half] = before[..., :half]


def write(cached, start, t):
    """t (..., T, head_dim) into cached, a part of the cache of the same shape but block_size
    positions, at positions start .. start + T - 1."""
    if isinstance(start, int):
        cached.narrow(-2, start, t.size(-2)).copy_(t)  # copy_ casts to the cache's dtype
    else:  # index_copy_ does not: under autocast t is bfloat16, the cache the weights' float32
        cached.index_copy_(cached.dim() - 2, start, t.to(cached.dtype))


def static_step(model, w, batch, temperature, top_k, capture=None):
    """(step, cache): step(token, before, pos, generator) -> the next ids (B, 1), decoding token (B, 1)
    at pos (before: the ids before it) and drawing what follows, through tensors allocated once (the
    token, the one before, the position, the random draws and cache, a new_cache that goes with the
    step). capture(body, device) -> a replay of body, as cuda_graph captures one: on CUDA one launch
    instead of some 40 kernels, and no wait for the host. The capture is checked against body; where
    it fails or the check does, a note says so and the step runs body eagerly, as it does with no
    capture (the CPU's tests run it so).

    Make it before the prompt is decoded: capturing runs the step, which writes the cache at
    position 0 until the prompt overwrites it."""
    # Zeros, not empty: the step attends over the whole block, and a NaN left in memory would
    # reach the output through its zero attention weight.
    cache = new_cache(model, batch, w["lm_head.weight"])
    device, vocab = cache.device, model.config.vocab_size
    token = torch.zeros(batch, 1, dtype=torch.long, device=device)
    before = torch.zeros_like(token)
    pos = torch.zeros(1, dtype=torch.long, device=device)
    noise = torch.ones(batch, min(top_k, vocab) if top_k else vocab, device=device)  # Exp(1) draws for pick

    def body():
        logits = decode(model, w, token, pos, cache, before)
        if model.config.bigram:
            before.copy_(token)
        token.copy_(pick(logits, temperature, top_k, noise=noise))
        pos.add_(1)  # the next step's position, so a step in sequence needs no copy from the host

    run = body
    if capture is not None:
        try:
            replay = capture(body, device)
            if does_as_body(replay, body, (token, before, pos, cache)):
                run = replay
            else:
                print("note: the captured CUDA graph does not compute what its step does; "
                      "sampling runs the step without it", file=sys.stderr)
        except Exception as e:  # noqa: BLE001 -- any failure to capture leaves the eager step, which is correct
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""  # CUDA's errors run to several lines
            print(f"note: capturing the CUDA graph failed ({type(e).__name__}: {first}); "
                  "sampling runs the step without it", file=sys.stderr)
    last = [None]  # what the previous step returned: the graph's state already follows it

    def step(given, given_before, at, generator):
        if given is not last[0]:  # after the prompt or a rebuilt cache
            token.copy_(given)
            before.copy_(given_before)
            pos.fill_(at)
        if temperature:
            noise.exponential_(generator=generator)  # drawn outside the graph, so any generator serves
        run()
        last[0] = token.clone()
        return last[0]

    return step, cache


def cuda_graph(body, device):
    """The replay of body captured as a CUDA graph on device. The capture and its side stream
    belong to device, not to the current device: captured on another, the graph records none of
    body's kernels and its replay changes nothing."""
    with torch.cuda.device(device):
        side = torch.cuda.Stream(device)  # warm up on a side stream before capturing, as torch.cuda.graph asks
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            body()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=torch.cuda.Stream(device)):
            body()
    return graph.replay


def does_as_body(replay, body, state):
    """Whether one replay changes the tensors of state as one run of body does (from the same
    values; state is then put back)."""
    before = [t.clone() for t in state]
    replay()
    replayed = [t.clone() for t in state]
    for t, b in zip(state, before):
        t.copy_(b)
    body()
    same = all(torch.allclose(r.double(), t.double()) for r, t in zip(replayed, state))
    for t, b in zip(state, before):
        t.copy_(b)
    return same


def reused_step(model, w, batch, temperature, top_k):
    """static_step's (step, cache) for model's weights w, kept on the model and reused by later calls
    for the same batch, temperature and top_k: a CUDA graph costs a capture, a wait for the device
    and an emptied memory cache each time it is made. A step reads the weights where they lay when
    it was made: changed in place (training between samples) it reads the new values; moved to
    another device or replaced by other tensors, its steps are dropped and made again."""
    where = tuple(t.data_ptr() for t in w.values())  # the weights' memory, on their device
    steps = {key: kept for key, kept in getattr(model, "_static_steps", {}).items() if key[0] == where}
    key = (where, batch, temperature, top_k)
    if key not in steps:
        device = w["lm_head.weight"].device
        steps[key] = static_step(model, w, batch, temperature, top_k, cuda_graph if device.type == "cuda" else None)
    model._static_steps = steps
    return steps[key]


@torch.inference_mode()  # cheaper than no_grad: no version counters on the new tensors
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=0, eos_id=None,
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
    c, device = model.config, idx.device
    T, B = c.block_size, idx.size(0)
    w = {name: t.detach() for name, t in model.state_dict().items()}
    draw_on = torch.device("cpu") if device.type == "mps" else device  # see pick
    if generator is not None and generator.device != draw_on:  # one for the device, seeded from it
        generator = torch.Generator(draw_on).manual_seed(int(torch.randint(2**62, (), generator=generator)))
    if not use_cache:
        graph = False
    if graph is None:
        graph = device.type == "cuda"
    if graph:
        step, cache = reused_step(model, w, B, temperature, top_k)
    else:
        cache = new_cache(model, B, w["lm_head.weight"])

        def step(token, before, at, generator):
            return pick(decode(model, w, token, at, cache, before), temperature, top_k, generator)
    context = idx[:, -T:]
    logits = decode(model, w, context, 0, cache) if use_cache else model(context)[0]
    pos = context.size(1)  # positions the cache holds
    new = []  # the new ids, (B, 1) each, left on the device
    done = torch.zeros(B, dtype=torch.bool, device=device)  # the rows that have drawn eos_id
    for n in range(max_new_tokens):
        if n == 0:
            token, before = pick(logits, temperature, top_k, generator), context[:, -1:]
        elif not use_cache:
            token = pick(model(torch.cat([context, *new[-T:]], 1)[:, -T:])[0], temperature, top_k, generator)
        elif pos == T:  # the cache is full: it starts again from the last T // 2 characters
            pos = T // 2
            recent = torch.cat([context, *new[-pos:]], 1)[:, -pos:]
            token, before = pick(decode(model, w, recent, 0, cache), temperature, top_k, generator), recent[:, -1:]
        else:
            token, before = step(token, before, pos, generator), token
            pos += 1
        new.append(token)
        if eos_id is not None and len(new) % EOS_CHECK == 0:
            done |= (torch.cat(new[-EOS_CHECK:], 1) == eos_id).any(1)
            if done.all():  # the one wait for the device in EOS_CHECK characters
                break
    rows = torch.cat(new, 1).tolist() if new else [[] for _ in range(B)]
    return [row[:row.index(eos_id) + 1] if eos_id in row else row for row in rows]


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

