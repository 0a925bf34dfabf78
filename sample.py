"""Continue a prompt with a trained model: greedy, or top-k sampling with a temperature.

    python sample.py --prompt "Once upon a time"
    python sample.py --greedy --max_new_tokens=300
    python sample.py --num_samples=4 --top_k=10 --temperature=0.9 --seed=7

Loads --checkpoint=PATH, or the newest checkpoint in --out_dir, or, where the default --out_dir holds
none yet, the model shipped in pretrained/ (and says so). Runs on cuda, else cpu (--device=mps on
Apple silicon). Only the prompt and its continuation go to stdout; notes go to stderr.
"""

import sys
from pathlib import Path

import torch

import checkpoint
import config
from config import UserError
from device import pick_device
from model import GPT, GPTConfig
from tokenizer import EOS, load_tokenizer

READS = ("sampling", "CHECKPOINT", "OUT_DIR", "DEVICE", "SEED", "every command")  # for --help
# The default run's final model, trained by `python train.py` (pretrained/README.md): a fresh clone
# samples it until it has a checkpoint of its own.
PRETRAINED = Path(__file__).parent / "pretrained" / "tinystories-char.pt"


def load_model(cfg, device):
    """(model, tokenizer) from --checkpoint, or the newest checkpoint in --out_dir, or the shipped model
    where the default --out_dir has none."""
    if cfg["checkpoint"]:
        state = checkpoint.load(cfg["checkpoint"])
    elif found := checkpoint.load_newest(cfg["out_dir"]):
        state = found[1]
    elif cfg["out_dir"] == config.OUT_DIR and PRETRAINED.is_file():
        print(f"note: no checkpoint in {cfg['out_dir']}/ yet, so this is the shipped model {PRETRAINED} "
              "(its README says how it was made); `python train.py` trains your own", file=sys.stderr)
        state = checkpoint.load(PRETRAINED)
    else:
        raise UserError(f"no checkpoint in {Path(cfg['out_dir']).resolve()}: train one with "
                        "`python train.py`, or pass --out_dir=DIR or --checkpoint=PATH")
    model = GPT(GPTConfig(**state["model_args"]))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), load_tokenizer(state["tokenizer"])


def check_sampling(cfg, vocab_size):
    """Refuse a temperature or a top-k that no draw can use."""
    if cfg["temperature"] < 0:
        raise UserError(f"--temperature must be 0 (greedy) or more, not {cfg['temperature']}")
    if not 0 <= cfg["top_k"] <= vocab_size:
        raise UserError(f"--top_k must be between 1 and the vocabulary size {vocab_size}, or 0 for all")


def continuations(model, tokenizer, ids, max_new_tokens, temperature, top_k, seed, rows=1, stop=True):
    """rows continuations, as text, of the story that begins with ids (it starts after an end-of-story token, as in
    training), drawn by model.generate with a generator seeded by seed; with stop, each ends at the end of its
    story, which is left out."""
    idx = torch.tensor([[EOS] + ids] * rows, dtype=torch.long, device=next(model.parameters()).device)
    outs = model.generate(idx, max_new_tokens, temperature, top_k, eos_id=EOS if stop else None,
                          generator=torch.Generator().manual_seed(seed))
    return [tokenizer.decode(out[:-1] if stop and out and out[-1] == EOS else out) for out in outs]


def main(argv):
    cfg = config.load(argv, __doc__, READS)
    if cfg["num_samples"] < 1 or cfg["max_new_tokens"] < 0:
        raise UserError("--num_samples must be at least 1 and --max_new_tokens at least 0")
    device = pick_device(cfg["device"])
    if device.type == "cpu":  # one character is too little work to share: more threads only wait on each other
        torch.set_num_threads(1)
    model, tokenizer = load_model(cfg, device)
    check_sampling(cfg, tokenizer.vocab_size)
    ids = tokenizer.encode(cfg["prompt"])
    if tokenizer.unknown:
        print(f"warning: the prompt has characters outside the vocabulary, read as unknown: "
              f"{''.join(tokenizer.unknown)!r}", file=sys.stderr)
    block_size = model.config.block_size
    if len(ids) + 1 > block_size:
        word = "character" if tokenizer.unit == "char" else "token"
        print(f"note: the prompt is longer than the model's {block_size}-{word} context; "
              f"it continues from the last {block_size} {word}s", file=sys.stderr)
    texts = continuations(model, tokenizer, ids, cfg["max_new_tokens"], 0.0 if cfg["greedy"] else cfg["temperature"],
                          cfg["top_k"], cfg["seed"], cfg["num_samples"], stop=not cfg["ignore_eos"])
    print("\n---\n".join(cfg["prompt"] + text for text in texts))


if __name__ == "__main__":
    config.command(main)
