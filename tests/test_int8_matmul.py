"""int8 matmuls on the plain int8 weight (gpt2.cpu.int8_matmul): a prefill's rows, through the C kernel in passes of
16 or through torch._int_mm, get what the C kernel (the int8 decode step's) gives each of them alone, so one plain
weight serves both.

The bound: both quantize each row the same way and sum the same int8 products exactly in int32; they differ only
where the final fp32 scaling rounds differently (an FMA or not), a few units in the last place: 1e-5 of the largest
output.
"""

from __future__ import annotations

import pytest
import torch

from gpt2.cpu import build, int8_matmul
from gpt2.cpu.int8_linear import Int8Linear

pytestmark = pytest.mark.skipif(not build.int8_available(), reason="no avx512_vnni on this CPU, or no C kernels")


def edge_rows(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """Gaussian rows of various scales, among them one of a single sign, one of zeros, one spanning less than the least
    scale (widened to it), one negative with a tiny range, and one with an outlier."""
    x = torch.randn(rows, cols, generator=generator) * torch.logspace(-2, 1, rows)[:, None]
    x[0] = x[0].abs()
    x[1] = 0.0
    x[2] = torch.rand(cols, generator=generator) * 1e-4 - 5e-5
    x[3] = -torch.rand(cols, generator=generator) * 1e-4
    x[4, 7] = 300.0
    return x


@pytest.mark.parametrize("rows", [37, 70])  # the C kernel's passes of 16 rows; torch._int_mm's path
@pytest.mark.parametrize("out_features, in_features", [(48, 64), (33, 192), (260, 128)])
def test_many_rows_match_the_c_kernel_row_by_row(rows, out_features, in_features):
    generator = torch.Generator().manual_seed(out_features)
    layer = Int8Linear(torch.randn(out_features, in_features, generator=generator) / 8,
                       torch.randn(out_features, generator=generator))
    x = edge_rows(rows, in_features, generator)
    y = int8_matmul.matmul(x, layer.step_weight, layer.step_rows)
    by_row = torch.cat([int8_matmul.matmul(x[j:j + 1], layer.step_weight, layer.step_rows) for j in range(rows)])
    assert (y - by_row).abs().max() <= 1e-5 * by_row.abs().max()


def test_quantize_rows_recovers_each_row_within_half_a_step():
    x = edge_rows(9, 64, torch.Generator().manual_seed(0))
    q, scale, zero_point = int8_matmul.quantize_rows(x)
    back = scale * (q.int() + 128 - zero_point)
    assert ((back - x).abs() <= scale / 2 * (1 + 1e-5)).all()
    assert q.dtype == torch.int8 and scale.shape == zero_point.shape == (9, 1)


@pytest.mark.parametrize("tokens", [20, 80])
def test_a_prefill_through_the_plain_weight_gives_the_decode_steps_outputs(tokens):
    """A layer's forward over a prompt's tokens, and each token alone (a decode step's call, the C kernel)."""
    generator = torch.Generator().manual_seed(1)
    layer = Int8Linear(torch.randn(96, 128, generator=generator) / 8, torch.randn(96, generator=generator))
    x = torch.randn(1, tokens, 128, generator=generator)
    with torch.inference_mode():
        whole = layer(x)
        alone = torch.cat([layer(x[:, t:t + 1]) for t in range(tokens)], dim=1)
    assert whole.shape == (1, tokens, 96) and layer.packed is None
    assert (whole - alone).abs().max() <= 1e-5 * alone.abs().max()
