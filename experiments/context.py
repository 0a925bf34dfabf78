"""The validation loss of checkpoints by how much context each character is predicted from.

    python experiments/context.py pretrained/tinystories-char.pt [more checkpoints] [--dataset=...]

train.py's figure cuts the validation split into windows of block_size characters that do not
overlap, so the first characters of each window are predicted from the few before them in it. For
each checkpoint this prints that figure, by quarter of the window, and the figure with every
character predicted from at least half a window before it (a window every block_size // 2
characters, each scoring the targets the one before did not reach): what sampling sees, whose
context never falls below half a window. A longer context lowers the first figure by cutting
fewer characters short; only the second says whether the model predicts better.
"""

import sys
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import checkpoint  # noqa: E402
import config  # noqa: E402
import data  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from tokenizer import EOS, load_tokenizer  # noqa: E402


def target_losses(model, x, y):
    """The cross-entropy of each target of y (B, T), 0 at padding."""
    logits, _ = model(x, y)
    return F.cross_entropy(logits.transpose(1, 2), y, ignore_index=data.PAD, reduction="none")


def in_windows(model, cfg, tokenizer):
    """(train.py's figure, its four quarters by position in the window): losses are per character,
    as every id of the char tokenizer is one."""
    T = model.config.block_size
    total, count = torch.zeros(T), torch.zeros(T)
    for x, y in data.validation_batches(cfg, tokenizer)[0]:
        total += target_losses(model, x, y).sum(0)
        count += (y != data.PAD).sum(0)
    quarters = [total[i:i + T // 4].sum() / count[i:i + T // 4].sum() for i in range(0, T, T // 4)]
    return float(total.sum() / count.sum()), [float(q) for q in quarters]


def windows(n, T):
    """(starts, firsts) of the windows of T targets that score n targets once each: a window every T // 2,
    and one ending at the last; firsts[i], the first of window i's targets that it scores (0 in the first
    window, else where the window before stopped, at least T // 2 in)."""
    starts = list(range(0, n - T + 1, T // 2))
    starts += [n - T] * (starts[-1] + T < n)
    return starts, [0] + [prev + T - s for prev, s in zip(starts, starts[1:])]


def sliding(model, cfg, tokenizer, batch=64):
    """(loss, targets) with each target after the first half window predicted from at least T // 2 ids."""
    T = model.config.block_size
    ds = data.open_split(cfg["dataset"], "validation")
    ids = torch.tensor([i for story in data.stories(ds, lines=False) for i in [EOS, *tokenizer.encode(story)]])
    n = len(ids) - 1  # targets
    starts, first = windows(n, T)
    total, count = 0.0, 0
    for i in range(0, len(starts), batch):
        s, f = starts[i:i + batch], torch.tensor(first[i:i + batch])
        x = torch.stack([ids[j:j + T] for j in s])
        y = torch.stack([ids[j + 1:j + T + 1] for j in s])
        scored = torch.arange(T) >= f.view(-1, 1)
        total += float(target_losses(model, x, y)[scored].sum())
        count += int(scored.sum())
    assert count == n
    return total / count, count


@torch.no_grad()
def main(argv):
    paths = [a for a in argv if not a.startswith("--")]
    for path in paths:
        state = checkpoint.load(path)
        if state["tokenizer"].get("kind", "char") != "char":
            raise config.UserError(f"{path} has a {state['tokenizer']['kind']} tokenizer: this script counts "
                                   "one character per id, as the char tokenizer has them")
        model = GPT(GPTConfig(**state["model_args"])).eval()
        model.load_state_dict(state["model"])
        tokenizer = load_tokenizer(state["tokenizer"])
        T = model.config.block_size
        cfg = config.load([a for a in argv if a.startswith("--")] + [f"--block_size={T}"])
        figure, quarters = in_windows(model, cfg, tokenizer)
        loss, count = sliding(model, cfg, tokenizer)
        print(f"{path}: {T} characters of context; in train.py's windows {figure:.4f} nats/char (by quarter "
              f"of the window: {', '.join(f'{q:.4f}' for q in quarters)}); each character after at least "
              f"{T // 2} others: {loss:.4f} ({count:,} characters)")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except config.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
