"""Where the time goes, for the README's "Speed" section: torch.profiler over training steps of
the default model, and the cost of one sampled character against the number of operations it
takes, at two model widths (if the narrow model is barely faster, the fixed cost of each
operation, not arithmetic, is what a character costs).

    python experiments/time_spent.py
"""

import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from generate import decode, new_cache  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from speed import VOCAB, trainer  # noqa: E402


def decode_cost(n_embd, steps=2000):
    """(microseconds, operator calls) for one cached decode step at position 64, one thread."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, n_embd=n_embd)).eval()
    w = {name: t.detach() for name, t in model.state_dict().items()}
    cache = new_cache(model, 1, torch.empty(0))
    idx = torch.tensor([[3]])
    with torch.inference_mode():
        for _ in range(200):
            decode(model, w, idx, 64, cache)
        start = time.perf_counter()
        for _ in range(steps):
            decode(model, w, idx, 64, cache)
        seconds = (time.perf_counter() - start) / steps
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            decode(model, w, idx, 64, cache)
    top_level = [e for e in prof.events() if e.cpu_parent is None]
    return seconds * 1e6, len(top_level)


def main():
    step = trainer({})
    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            step()
    print("training, 5 steps of batch 64 x 128 (times are totals over the 5):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))

    torch.set_num_threads(1)  # as sample.py
    for n_embd in (32, 128):
        us, ops = decode_cost(n_embd)
        print(f"decode, n_embd {n_embd:3}: {us:6.1f} us per character, {ops} operator calls, "
              f"{us / ops:.1f} us each")


if __name__ == "__main__":
    main()
