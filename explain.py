"""Explain a checkpoint on one text: a single HTML page that shows the model at work on it.

    python explain.py                                      # the shipped model on a validation story
    python explain.py --text 'Tom saw a big dog. Tom said, "Hi!"'
    python explain.py --prompt "Lily found a" --out lily.html   # the model's own story, then explained
    python explain.py --png pictures                       # the pictures as PNG files too (matplotlib)

Takes the checkpoint as sample.py does (--checkpoint=PATH, else the newest in --out_dir, else the
shipped model) and writes --out (explain.html): how surprised the model was by each character, where
each attention head looked, which parts of the network a prediction came from, the model's own
tables, and samples at a few temperatures. The page opens from disk in any browser and fetches
nothing: its styles, script and data are inside it. docs/explain.md says how to read each view.

Every number on the page comes from model.py's forward with a trace (GPT.forward(..., trace=...)):
nothing here computes the network a second time. A text longer than the context is read as
sampling reads it: when the block_size positions are full, the context starts again from the last
block_size // 2 characters (GPT.generate).
"""

import base64
import codecs
import json
import math
import os
import sys
import zlib
from contextlib import closing
from itertools import islice
from pathlib import Path

import torch
from torch.nn import functional as F

import checkpoint
import config
import data
from config import UserError
from device import pick_device
from model import pair_index
from sample import PRETRAINED, check_sampling, continuations, load_model
from tokenizer import EOS, UNK, byte_symbols

READS = ("explain", "CHECKPOINT", "OUT_DIR", "DEVICE", "DATASET", "PROMPT", "MAX_NEW_TOKENS", "TEMPERATURE", "TOP_K",
         "SEED", "every command")  # config.py's settings that explain.py reads, for --help
TEMPERATURES = (0.5, 1.0, 1.5)  # the samples' temperatures, and greedy
TOP = 5  # the likeliest next characters shown for each position
TEMPLATE = Path(__file__).parent / "explain_page.html"


def story(cfg, n):
    """Story n of cfg's dataset's validation split."""
    ds = data.open_split(cfg["dataset"], "validation")
    if ds is None:
        raise UserError(f"{cfg['dataset']} has no validation split: give a text with --text")
    with closing(data.stories(ds, data.is_line_based(cfg["dataset"]))) as stories:
        found = list(islice(stories, n, n + 1))
    if not found:
        raise UserError(f"the validation split of {cfg['dataset']} has fewer than {n + 1} stories: "
                        "pick a lower --story")
    return found[0]


def checkpoint_name(cfg):
    """The checkpoint load_model takes, in words, for the page."""
    if cfg["checkpoint"]:
        return cfg["checkpoint"]
    if checkpoint.paths(cfg["out_dir"]):
        return f"the newest intact checkpoint in {cfg['out_dir']}/"
    return os.path.relpath(PRETRAINED)


def pieces(tokenizer, text, ids):
    """Each id's text, as the page shows it: the characters themselves (those outside the vocabulary too,
    not the unknown token's), or a BPE token's share of the text's UTF-8 bytes, a character split across
    tokens shown in the token holding its last byte (and nothing in those before)."""
    if tokenizer.kind == "char":
        return list(text)
    symbols, utf8 = byte_symbols(), codecs.getincrementaldecoder("utf-8")(errors="replace")
    return [tokenizer.decode([i]) if i == EOS else
            utf8.decode(bytes(symbols[s] for s in tokenizer.tok.id_to_token(i))) for i in ids]


def windows(n, T):
    """(start, first) for each window of the inputs that predict n targets: window k reads inputs start ..
    start + T - 1 and its predictions from first on are the ones shown. As GPT.generate slides the context:
    when T positions are full, the next window starts from the last T // 2 of them, so that every
    prediction after the first window's is made from at least T // 2 ids."""
    spans = [(0, 0)]
    while spans[-1][0] + T < n:
        start = spans[-1][0] + T - T // 2 + 1  # its first T // 2 ids end with the first id yet to be read
        spans.append((start, T // 2 - 1))
    return spans


def attribution(model, terms, targets):
    """{term: its share of the logit of each target (B, T)}: each term of the residual stream taken through
    the final LayerNorm and the head, with the LayerNorm's division by the position's standard deviation
    held at what the whole stream gives it. The LayerNorm's bias goes into the "biases" term. Their sum
    is the logit: LayerNorm's centring is linear, so it splits over the terms; only the division does not."""
    ln, head = model.transformer.ln_f, model.lm_head.weight[targets]  # (B, T, n_embd): each target's row
    stream = sum(terms.values())
    sigma = (stream.var(-1, unbiased=False, keepdim=True) + ln.eps).sqrt()
    shares = {name: ((t - t.mean(-1, keepdim=True)) / sigma * ln.weight * head).sum(-1) for name, t in terms.items()}
    shares["biases"] = shares.get("biases", 0) + (ln.bias * head).sum(-1)
    return shares


@torch.no_grad()
def analyse(model, ids):
    """The page's views of the text ids (EOS first): for each of ids[1:], the window it was predicted in,
    its loss, the likeliest ids in its place, each term's share of its logit, and every head's attention
    from the position that predicted it, one traced forward of model.py per window."""
    device, T = next(model.parameters()).device, model.config.block_size
    x_all, y_all = torch.tensor(ids[:-1], device=device), torch.tensor(ids[1:], device=device)
    out = {"window": [], "loss": [], "top_ids": [], "top_p": [], "logit": [], "shares": [], "attention": []}
    for start, first in windows(len(y_all), T):
        x, y = x_all[None, start:start + T], y_all[None, start:start + T]
        trace = {}
        logits, _ = model(x, y, trace=trace)
        logits = logits[0, first:].float()
        out["window"] += [start] * len(logits)
        out["loss"].append(F.cross_entropy(logits, y[0, first:], reduction="none"))
        top = logits.softmax(-1).topk(min(TOP, logits.size(-1)))
        out["top_ids"].append(top.indices)
        out["top_p"].append(top.values)
        out["logit"].append(logits.gather(1, y[0, first:, None])[:, 0])
        shares = attribution(model, trace["terms"], y)
        out["shares"].append(torch.stack([s[0, first:] for s in shares.values()], 1))
        # Each prediction's attention rows, over the window's positions up to its own: (layer, head, weights).
        seen = torch.ones(x.size(1), x.size(1), dtype=torch.bool, device=device).tril()[first:]
        out["attention"].append(torch.stack([a[0, :, first:][:, seen] for a in trace["attention"]]))
    out = {key: torch.cat(value, -1 if key == "attention" else 0).cpu() if key != "window" else value
           for key, value in out.items()}
    out["terms"] = list(shares)
    return out


@torch.no_grad()
def tables(model, tokenizer):
    """The model's own tables: its character embeddings along their two principal axes, the cosine
    similarity of every pair of position embeddings, and the largest rows of the bigram table with
    the pairs of ids that read them."""
    wte = model.transformer.wte.weight.float().cpu()
    centred = wte - wte.mean(0)
    _, s, v = torch.linalg.svd(centred, full_matrices=False)
    pca = [[round(x, 4) for x in xy] for xy in (centred @ v[:2].T).tolist()]  # 4 digits, as the page holds them
    # The axes span the middle 96% of the ids, so that a few far out (ids training hardly moved) do
    # not squash the rest: the page and --png draw those at the edge of this span, in grey.
    low, high = math.floor(0.02 * (len(pca) - 1)), math.ceil(0.98 * (len(pca) - 1))
    span = [[axis[low], axis[high]] for axis in map(sorted, zip(*pca))]
    out = {"pca": pca, "pca_span": span, "pca_share": float((s[:2] ** 2).sum() / (s ** 2).sum())}
    if not model.config.rope:
        wpe = F.normalize(model.transformer.wpe.weight.float().cpu(), dim=1)
        out["positions"] = wpe @ wpe.T
    if model.config.bigram:
        rows, index = model.bigram.weight.float().cpu().norm(dim=1), model.pair_index.long().cpu()
        V = index.size(1)
        hashed = pair_index(V, model.config.bigram)  # each pair's row where no count gave it one of its own
        out["bigram"] = []
        for r in rows.argsort(descending=True)[:16].tolist():
            pairs = [(a - 1, b) for a, b in (index == r).nonzero().tolist()]  # a previous -1: a window's start
            own = [p for p in pairs if hashed[p[0] + 1, p[1]] != r]  # given this row as one of the commonest
            rest = [p for p in pairs if hashed[p[0] + 1, p[1]] == r]
            out["bigram"].append({"row": r, "norm": round(float(rows[r]), 3), "own": own, "hashed": rest[:6],
                                  "n_hashed": len(rest)})
    return out


def label(name, n_layer):
    """A term of the residual stream, in words."""
    if name.startswith("block"):
        block, part = name[len("block"):].split(".")
        return ("" if n_layer == 1 else f"block {block} ") + ("MLP" if part == "mlp" else f"head {part[len('head'):]}")
    return {"token": "token embedding", "position": "position embedding", "shift": "token shift at the embedding",
            "bigram": "bigram table", "biases": "biases, ln_f's too"}.get(name, name)


def head_names(c):
    return [f"block {i} head {h}" if c.n_layer > 1 else f"head {h}" for i in range(c.n_layer) for h in range(c.n_head)]


def as_bytes(weights, low=0.0, high=1.0):
    """weights in [low, high] as one byte each (0-255), deflated and base64: the page's compact form of a
    picture (attention's weights are mostly near 0, and deflate takes them to a fraction)."""
    scaled = ((weights.float() - low) / (high - low) * 255).round().clamp(0, 255).to(torch.uint8)
    return base64.b64encode(zlib.compress(scaled.numpy().tobytes(), 9)).decode()


def page(model, tokenizer, text, ids, views, tabs, samples, about):
    """The page: explain_page.html with the data it draws from put in as JSON."""
    c, bits = model.config, views["loss"] / math.log(2)
    rounded = (lambda t, digits: [round(v, digits) for v in t.flatten().tolist()])
    found = {
        "about": {**about, "vocab_size": tokenizer.vocab_size, "unit": tokenizer.unit, "kind": tokenizer.kind,
                  "block_size": c.block_size, "characters": len(text), "bits_per_char": float(bits.sum()) / len(text),
                  "parameters": model.num_params(), "settings": vars(c)},
        "tokens": pieces(tokenizer, text, ids[1:]), "ids": ids[1:],
        "unknown": [i for i, t in enumerate(ids[1:]) if t == UNK and tokenizer.kind == "char"],
        "vocab": [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)],
        "window": views["window"], "bits": rounded(bits, 4), "logit": rounded(views["logit"], 4),
        "top_ids": views["top_ids"].flatten().tolist(), "top_p": rounded(views["top_p"], 4),
        "terms": [label(t, c.n_layer) for t in views["terms"]], "shares": rounded(views["shares"], 4),
        "heads": head_names(c), "attention": [as_bytes(a) for a in views["attention"].flatten(0, 1)],
        "pca": tabs["pca"], "pca_span": tabs["pca_span"], "pca_share": tabs["pca_share"],
        "positions": as_bytes(tabs["positions"], -1, 1) if "positions" in tabs else None,
        "bigram": tabs.get("bigram"), "samples": samples,
    }
    # "<" escaped inside the JSON, so that no "</script>" in a text can end the script that holds it.
    found = json.dumps(found, ensure_ascii=False).replace("<", "\\u003c")
    return TEMPLATE.read_text(encoding="utf-8").replace("__DATA__", found)


def pattern(views, layer_head, n):
    """One head's attention over the whole text as an (n, n) matrix: row j, the position that predicted
    target j; column i, the input it weighed (0: the end-of-story token the text starts after)."""
    lengths = torch.tensor([j - start + 1 for j, start in enumerate(views["window"])])
    rows = torch.arange(n).repeat_interleave(lengths)
    cols = torch.cat([torch.arange(start, j + 1) for j, start in enumerate(views["window"])])
    matrix = torch.zeros(n, n)
    matrix[rows, cols] = views["attention"].flatten(0, 1)[layer_head]
    return matrix


def need_matplotlib():
    try:
        from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
    except ImportError:
        raise UserError("--png needs matplotlib, which is not installed: pip install matplotlib") from None
    return Figure


def write_pngs(folder, model, tokenizer, views, tabs):
    """The page's pictures as PNG files in folder: each head's attention pattern, the position embeddings'
    similarity, the character embeddings' two principal axes. Returns their paths."""
    Figure, folder, written = need_matplotlib(), Path(folder), []
    folder.mkdir(parents=True, exist_ok=True)
    n = len(views["window"])
    pictures = [(f"attention_{h.replace(' ', '_')}.png", h + ": row, the position predicting; column, the one weighed",
                 pattern(views, k, n), "Blues", (0, 1)) for k, h in enumerate(head_names(model.config))]
    if "positions" in tabs:
        pictures.append(("positions.png", "cosine similarity of the position embeddings", tabs["positions"],
                         "RdBu_r", (-1, 1)))
    for name, title, matrix, cmap, (low, high) in pictures:
        fig = Figure(figsize=(6, 6))
        ax = fig.add_subplot()
        ax.imshow(matrix.numpy(), cmap=cmap, vmin=low, vmax=high, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        fig.savefig(folder / name, dpi=120)
        written.append(folder / name)
    fig = Figure(figsize=(8, 8))
    ax = fig.add_subplot()
    low, high = torch.tensor(tabs["pca_span"]).T  # (x, y) of the span's corners
    pca = torch.tensor(tabs["pca"])
    xy = pca.clamp(low, high)  # those beyond it at its edge, in grey as on the page
    inside = (xy == pca).all(1).tolist()
    ax.scatter(xy[:, 0], xy[:, 1], s=4, color="#bbb")
    for (x, y), token, seen in zip(xy.tolist(), (tokenizer.decode([i]) for i in range(tokenizer.vocab_size)), inside):
        ax.annotate(token if token.isprintable() and token.strip() else repr(token), (x, y), fontsize=7,
                    color="black" if seen else "#aaa")
    ax.set_title(f"the {tokenizer.unit} embeddings along their two principal axes "
                 f"({tabs['pca_share']:.0%} of their variance)", fontsize=9)
    fig.savefig(folder / "embeddings.png", dpi=120)
    return written + [folder / "embeddings.png"]


def main(argv):
    cfg = config.load(argv, __doc__, READS)
    named = {arg.partition("=")[0] for arg in argv}  # the settings given, not left at their defaults
    if "--text" in named and "--prompt" in named:
        raise UserError("--text and --prompt both give the text: --text explains a text, --prompt the model's own "
                        "continuation of one")
    if cfg["story"] < 0:
        raise UserError(f"--story takes a whole number of 0 or more, not {cfg['story']}")
    if cfg["png"]:
        need_matplotlib()  # before the work, not after it
    device = pick_device(cfg["device"])
    if device.type == "cpu":
        torch.set_num_threads(1)  # as sample.py: a window or a character is too little work to share out
    model, tokenizer = load_model(cfg, device)
    check_sampling(cfg, tokenizer.vocab_size)

    def sample(prompt, temperature):  # to the end of the story
        return continuations(model, tokenizer, tokenizer.encode(prompt), cfg["max_new_tokens"], temperature,
                             cfg["top_k"], cfg["seed"])[0]

    if "--text" in named:
        text, about = cfg["text"], {"source": "the text given with --text"}
    elif "--prompt" in named:
        text = cfg["prompt"] + sample(cfg["prompt"], cfg["temperature"])
        about = {"source": f"the model's own story from the prompt {cfg['prompt']!r} (temperature "
                           f"{cfg['temperature']}, top-k {cfg['top_k']}, seed {cfg['seed']})"}
    else:
        text = story(cfg, cfg["story"])
        about = {"source": f"story {cfg['story']} of the validation split of {cfg['dataset']}"}
    if not text:
        raise UserError("the text is empty: there is nothing to explain; give one with --text=...")
    ids = [EOS] + tokenizer.encode(text)  # a story starts after an end-of-story token, as in training
    if tokenizer.unknown:
        print(f"note: {tokenizer.unknown_report()}; the page marks them", file=sys.stderr)
    about["checkpoint"] = checkpoint_name(cfg)

    views, tabs = analyse(model, ids), tables(model, tokenizer)
    prompt = cfg["prompt"]
    samples = [[f"temperature {t}" if t else "greedy", prompt, sample(prompt, t)]
               for t in (*TEMPERATURES, 0)]
    html = page(model, tokenizer, text, ids, views, tabs, samples, about)
    out = Path(cfg["out"])
    try:
        out.write_text(html, encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot write {out} ({e.strerror or e}): choose another --out") from e
    bits = float(views["loss"].sum()) / math.log(2) / len(text)
    print(f"wrote {out}: {len(text):,} characters at {bits:.4f} bits/char, {len(html.encode()) / 1e6:.2f} MB")
    if cfg["png"]:
        for path in write_pngs(cfg["png"], model, tokenizer, views, tabs):
            print(f"wrote {path}")


if __name__ == "__main__":
    config.command(main)
