"""The static decode step (the CUDA-graph path) gives the same logits as the ordinary cached decode.

On the CPU it runs eagerly over its fixed buffers (attention over the whole cache, masked by each
row's length), which checks everything but the capture; on a CUDA machine the graph is captured and
replayed too. Tolerance: fp32 1e-4 on logits, as the parity suite.
"""

from __future__ import annotations

import pytest
import torch

from gpt2 import GPT2, GPT2Config
from gpt2.decode_graph import StaticDecodeStep
from gpt2.generation import decode_one_token, prefill

FP32_ATOL = 1e-4
CONFIG = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=300)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
@torch.inference_mode()
def test_static_decode_matches_dynamic_decode(device, backend):
    torch.manual_seed(0)
    model = GPT2(CONFIG, backend=backend).to(device).eval()
    rows = [[1, 2, 3, 4, 5, 6], [7], [8, 9, 10]]
    caches = [model.new_cache(3, 20) for _ in range(2)]
    for cache in caches:
        prefill(model, cache, rows)
    static = StaticDecodeStep(model, caches[1], use_graph=device == "cuda")
    for step in range(5):
        tokens = torch.tensor([11 + step, 40, 200 - step], device=device)
        expected = decode_one_token(model, caches[0], tokens)
        got = static(tokens)
        assert (got - expected).abs().max().item() <= FP32_ATOL, f"step {step}"
        assert caches[1].lengths == caches[0].lengths


def test_static_decode_refuses_a_full_cache():
    model = GPT2(CONFIG).eval()
    cache = model.new_cache(1, 4)
    prefill(model, cache, [[1, 2, 3, 4]])
    with pytest.raises(ValueError, match="KV cache full"):
        StaticDecodeStep(model, cache, use_graph=False)(torch.tensor([5]))
