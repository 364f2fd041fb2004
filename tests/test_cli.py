"""`gpt2 bench` from the command line: it says roughly how long it will take before it starts."""

from __future__ import annotations

import pytest

import gpt2.cli
from gpt2.bench import quick_bench_seconds
from gpt2.cli import main


def test_bench_says_how_long_before_the_work_starts(monkeypatch, capsys):
    printed_before = []

    def fake_quick_bench(*args, **kwargs) -> str:  # records what was printed before the benchmark started
        printed_before.append(capsys.readouterr())
        return "the report"

    monkeypatch.setattr(gpt2.cli, "quick_bench", fake_quick_bench)
    assert main(["bench", "--sizes", "tiny", "--repeats", "2", "--no-progress"]) == 0
    (before,) = printed_before
    assert before.out == ""
    first, = before.err.splitlines()
    assert first.startswith("gpt2 bench: ") and " min" in first  # "roughly N min" or "less than a minute"
    assert "1 size x 2 batch sizes x" in first and "x 2 repeats" in first
    assert capsys.readouterr().out == "the report\n"


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_bench_estimate_grows_with_the_work(device):
    base = dict(sizes=["small"], batches=[1, 8], prompt_len=32, n_new=16, repeats=3, device=device)
    seconds = quick_bench_seconds(**base)
    assert seconds > 0
    for more in (dict(repeats=6), dict(sizes=["small", "medium"]), dict(sizes=["medium"]), dict(batches=[1, 8, 16]),
                 dict(n_new=32), dict(prompt_len=128)):
        assert quick_bench_seconds(**{**base, **more}) > seconds, more
    assert quick_bench_seconds(**{**base, "sizes": ["tiny"]}) < seconds
