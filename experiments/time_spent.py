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
from model import GPT, GPTConfig, KVCache  # noqa: E402
from speed import VOCAB, trainer  # noqa: E402


def decode_cost(n_embd, rounds=40):
    """(microseconds, operator calls) for one cached step of the forward, positions 64 to 126, one thread."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, n_embd=n_embd)).eval()
    prompt, idx, seconds = torch.zeros(1, 64, dtype=torch.long), torch.tensor([[3]]), 0.0
    with torch.inference_mode():
        for _ in range(rounds):
            cache = KVCache()
            model(prompt, cache=cache)
            start = time.perf_counter()
            for _ in range(63):
                model(idx, cache=cache)
            seconds += time.perf_counter() - start
        cache = KVCache()
        model(prompt, cache=cache)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(idx, cache=cache)
    top_level = [e for e in prof.events() if e.cpu_parent is None]
    return seconds / (rounds * 63) * 1e6, len(top_level)


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
