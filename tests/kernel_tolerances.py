"""Device, dtypes and the tolerance rule shared by the kernel tests (tests/test_kernels_*.py).

fp32 results are compared with the reference evaluated in float64, to an absolute (and, where a
test says so, relative) tolerance each test module states. fp16/bf16 results must satisfy
max|ours - ref| <= 2 * max|torch_lowp - ref| + eps, where ref is the float64 reference on the
upcast inputs, torch_lowp the torch reference run in the low-precision dtype itself, and eps is
LOWP_EPS plus, for bf16 under the interpreter, one bf16 ulp of max|ref|.
"""

import math

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The Triton 3.9 interpreter truncates fp32 -> bf16 casts where the GPU rounds to nearest, so under
# it bf16 outputs may carry up to one more bf16 ulp (2^-7 relative) of error than torch's.
TRUNCATING_BF16 = DEVICE == "cpu"
LOWP_EPS = {torch.float16: 1e-4, torch.bfloat16: 1e-3}


def assert_matches(
    ours: torch.Tensor, ref64: torch.Tensor, torch_lowp: torch.Tensor, what: str, *, atol: float, rtol: float = 0.0,
    computed_in: torch.dtype | None = None,
) -> None:
    """ours (fp32, fp16 or bf16) against ref64 by the rule above; atol and rtol apply to fp32 only. computed_in: the
    precision of the computation where it differs from ours.dtype (an fp32 result of fp16 matmuls): the rule for it."""
    assert ours.dtype == torch_lowp.dtype and ours.shape == ref64.shape
    assert torch.isfinite(ours).all(), what
    precision = computed_in or ours.dtype
    if precision == torch.float32:
        torch.testing.assert_close(ours.double(), ref64, atol=atol, rtol=rtol, msg=what)
        return
    err = (ours.double() - ref64).abs().max().item()
    base = (torch_lowp.double() - ref64).abs().max().item()
    slack = LOWP_EPS[precision]
    if precision == torch.bfloat16 and TRUNCATING_BF16:
        slack += 2.0 ** (math.floor(math.log2(max(ref64.abs().max().item(), 1e-30))) - 7)
    assert err <= 2 * base + slack, f"{what}: max err {err:.3g} vs torch's {base:.3g} (+{slack:.3g})"
