"""The ways a decode step runs (`gpt2.dispatch.decode_step_for`), forced one at a time for tests that must hold on
each: the model's forward, the CPU's one-call C step, and the CUDA-graph step with its pooled cache (on the CPU its
static step runs eagerly; on a CUDA machine the graph is captured and replayed).

Import as `from tests.decode_paths import PATHS, use_path`.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import gpt2.dispatch
from gpt2.cpu import build
from gpt2.cpu.decode_step import CpuDecodeStep
from gpt2.cuda.decode_graph import StaticDecodeStep

PATHS = ("forward", "c-step", "graph-pool")


def use_path(path: str, monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Make decode steps run on path for the rest of the test; returns a count of the steps each path ran, to check
    that the steps were taken where the test meant them to be."""
    steps: Counter = Counter()
    if path == "c-step" and build.library() is None:
        pytest.skip(f"the C kernels are not built here: {build.status()}")
    if path == "forward":
        monkeypatch.setattr(gpt2.dispatch.CpuDecodeStep, "build", classmethod(lambda cls, model, cache: None))
        monkeypatch.setattr(gpt2.dispatch, "cuda_graphs_enabled", lambda model: False)
    if path == "graph-pool" and not torch.cuda.is_available():
        monkeypatch.setattr(gpt2.dispatch, "cuda_graphs_enabled", lambda model: True)
    for name, cls in (("c-step", CpuDecodeStep), ("graph-pool", StaticDecodeStep)):
        real = cls.__call__

        def counted(self, tokens, real=real, name=name):
            steps[name] += 1
            return real(self, tokens)

        monkeypatch.setattr(cls, "__call__", counted)
    real_forward_step = gpt2.dispatch.decode_one_token

    def forward_step(model, cache, tokens):
        steps["forward"] += 1
        return real_forward_step(model, cache, tokens)

    monkeypatch.setattr(gpt2.dispatch, "decode_one_token", forward_step)
    return steps
