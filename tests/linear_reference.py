"""The check the CPU matmul kernels' tests share: a kernel's x W^T + b (then gelu_new) against F.linear (and F.gelu).

Tolerance: 1e-5 relative to the output's scale. Both sum in fp32, in another order than torch (measured 1-4e-7 of
it); the kernels' fused gelu_new, on their own exp, adds about 1 ulp.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F


def check_matches_linear(kernel: ModuleType, n_rows: int, out_features: int, in_features: int, with_bias: bool,
                         gelu: bool) -> None:
    """kernel (a module with `applies` and `matmul`) on inputs (B*T, C), (B, T, C) and a strided view."""
    torch.manual_seed(out_features + n_rows)
    weight = torch.randn(out_features, in_features) * 0.02  # GPT-2's initialisation scale
    bias = torch.randn(out_features) * 0.02 if with_bias else None
    inputs = [torch.randn(n_rows, in_features), torch.randn(n_rows, 1, in_features),
              torch.randn(n_rows, 2 * in_features)[:, :in_features]]
    for x in inputs:
        assert kernel.applies(x, weight, bias)
        expected = F.linear(x, weight, bias)
        if gelu:
            expected = F.gelu(expected, approximate="tanh")
        got = kernel.matmul(x, weight, bias, gelu=gelu)
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
