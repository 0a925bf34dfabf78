"""experiments/context.py's sliding windows: the figure that sampling's context sees."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
from context import windows  # noqa: E402


@pytest.mark.parametrize("n, T", [(16, 16), (17, 16), (100, 16), (103, 16), (1000, 128), (129, 128)])
def test_sliding_windows_score_each_target_once_each_after_at_least_half_a_window(n, T):
    starts, firsts = windows(n, T)
    scored = [(s + j, j) for s, f in zip(starts, firsts) for j in range(f, T)]  # (target, its place in the window)
    assert sorted(k for k, _ in scored) == list(range(n))
    assert all(j >= T // 2 for k, j in scored if k >= T)  # past the first window: half a window before it at least
