"""Benchmark of the Triton kernels in kernels/ against their plain-torch counterparts.

On a CUDA GPU (the real benchmark), at DialoGPT shapes (C 768/1024/1280, H 12/16/20, D 64):
  layer_norm      vs F.layer_norm                               rows 1, 64, 1024, 8192, 65536
  add_layer_norm  vs x + r, then F.layer_norm                   rows 1, 64, 1024, 8192, 65536
  bias_gelu       vs F.gelu(x + b, approximate="tanh")          (rows, 4C)
  prefill         vs SDPA(is_causal=True)                       batch 1, T 128/512/1024
  decode          vs SDPA with a boolean mask over the cache    batch 1..64, context 1024
With --fused, the fused decode step's kernels instead (gpt2/cuda/fused_decode.py), each against what the unfused
decode step runs for the same work (the Triton backend's kernels and torch's matmuls), at batch 1 and 8:
  ln_qkv_append       vs layer_norm, F.linear, two cache scatters       weight (3C, C)
  attention_residual  vs attention_decode, F.linear, residual add      weight (C, C), cache of 128 positions
  ln_linear_gelu      vs layer_norm, F.linear, bias_gelu               weight (4C, C)
  linear_residual     vs F.linear, residual add                         weight (C, 4C)
  ln_lm_head          vs layer_norm, F.linear                           weight (50257, C)
with GB/s counting the weights (and the cache) read once: how near each comes to the memory bound.
Each row reports the device time of both (ms, median of CUDA-graph replays by
triton.testing.do_bench_cudagraph: no Python launch cost, as in the model's captured decode step), the
achieved GB/s (memory-bound kernels) or TFLOP/s (prefill), the speedup torch_ms / ours_ms and the
max |ours - torch|.

    python -m benchmarks.bench_kernels [--dtype fp16 bf16 fp32] [--fused] [--save]
    python -m benchmarks.bench_kernels --smoke     # CPU, Triton interpreter, seconds; for CI (fused kernels too)

--save writes benchmarks/results/kernels-<device-name>.json (kernels-fused-<device-name>.json with --fused; every
dtype run) and the table beside it (.md), with the device-to-device copy bandwidth measured in the same run.
--smoke runs one tiny shape of each case under the Triton interpreter with a wall-clock timer (numbers
meaningless), so the script keeps working without a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# (n_embd, n_head) of DialoGPT small, medium, large; head_dim is 64 for all three.
MODELS = [(768, 12), (1024, 16), (1280, 20)]
HEAD_DIM = 64
ROWS = [1, 64, 1024, 8192, 65536]  # 65536 rows: tensors well past the L2, for the bandwidth figures
PREFILL_T = [128, 512, 1024]
DECODE_BATCH = [1, 4, 16, 64]
DECODE_CONTEXT = 1024
FUSED_BATCH = [1, 8]
FUSED_CONTEXT = 128  # a chat turn's cache: the generation benchmarks' 32 + 32 tokens, rounded to the pool's bucket
VOCAB = 50257
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class Case:
    """One benchmark: two zero-argument callables computing the same result, and their work."""

    kernel: str
    shape: str
    ours: Callable
    torch: Callable
    work: float  # bytes moved (metric "GB/s") or FLOPs (metric "TFLOP/s")
    metric: str


@dataclass
class Row:
    kernel: str
    shape: str
    dtype: str
    ours_ms: float
    torch_ms: float
    ours_rate: float
    torch_rate: float
    metric: str
    speedup: float
    max_abs_diff: float


def _norm_cases(K, device: str, dtype: torch.dtype, models: list[tuple[int, int]], rows: list[int]) -> list[Case]:
    cases = []
    for C, _ in models:
        w = torch.randn(C, device=device, dtype=dtype)
        b = torch.randn(C, device=device, dtype=dtype)
        bias = torch.randn(4 * C, device=device, dtype=dtype)
        for M in rows:
            x = torch.randn(M, C, device=device, dtype=dtype)
            r = torch.randn(M, C, device=device, dtype=dtype)
            u = torch.randn(M, 4 * C, device=device, dtype=dtype)
            elt = x.element_size()
            cases.append(Case("layer_norm", f"M={M} C={C}", lambda x=x, w=w, b=b: K.layer_norm(x, w, b),
                              lambda x=x, w=w, b=b: F.layer_norm(x, (x.shape[-1],), w, b, 1e-5),
                              2 * M * C * elt, "GB/s"))
            cases.append(Case("add_layer_norm", f"M={M} C={C}",
                              lambda x=x, r=r, w=w, b=b: K.add_layer_norm(x, r, w, b),
                              lambda x=x, r=r, w=w, b=b: _add_then_norm(x, r, w, b),
                              4 * M * C * elt, "GB/s"))
            cases.append(Case("bias_gelu", f"M={M} N={4 * C}", lambda u=u, bias=bias: K.bias_gelu(u, bias),
                              lambda u=u, bias=bias: F.gelu(u + bias, approximate="tanh"),
                              2 * M * 4 * C * elt, "GB/s"))
    return cases


def _add_then_norm(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    h = x + r
    return h, F.layer_norm(h, (h.shape[-1],), w, b, 1e-5)


def _attention_cases(K, device: str, dtype: torch.dtype, models: list[tuple[int, int]], prefill_t: list[int],
                     decode_batch: list[int], context: int) -> list[Case]:
    cases = []
    for C, H in models:
        D = C // H
        scale = D**-0.5
        for T in prefill_t:
            # The cache holds the whole context; prefill reads its first T positions (a view).
            q = torch.randn(1, H, T, D, device=device, dtype=dtype)
            cache = torch.randn(2, 1, H, max(T, context), D, device=device, dtype=dtype)
            k, v = cache[0, :, :, :T], cache[1, :, :, :T]
            zero = torch.zeros(1, dtype=torch.int32, device=device)
            length = torch.full((1,), T, dtype=torch.int32, device=device)
            cases.append(Case("prefill", f"B=1 H={H} T={T} D={D}",
                              lambda q=q, k=k, v=v, z=zero, n=length, s=scale: K.attention_prefill(q, k, v, z, n, s),
                              lambda q=q, k=k, v=v, s=scale: F.scaled_dot_product_attention(
                                  q, k, v, is_causal=True, scale=s),
                              2.0 * H * T * T * D, "TFLOP/s"))  # causal: half of 4*T*T*D per head
        for B in decode_batch:
            q = torch.randn(B, H, D, device=device, dtype=dtype)
            cache = torch.randn(2, B, H, context, D, device=device, dtype=dtype)
            k, v = cache[0], cache[1]
            kv_len = torch.full((B,), context, dtype=torch.int32, device=device)
            mask = (torch.arange(context, device=device) < kv_len[:, None])[:, None, None, :]  # (B, 1, 1, S)
            elt = q.element_size()
            cases.append(Case("decode", f"B={B} H={H} S={context} D={D}",
                              lambda q=q, k=k, v=v, n=kv_len, s=scale: K.attention_decode(q, k, v, n, s),
                              lambda q=q, k=k, v=v, m=mask, s=scale: F.scaled_dot_product_attention(
                                  q[:, :, None], k, v, attn_mask=m, scale=s)[:, :, 0],
                              2.0 * B * H * context * D * elt, "GB/s"))
    return cases


def _fused_cases(K, device: str, dtype: torch.dtype, models: list[tuple[int, int]], batches: list[int],
                 context: int, vocab: int) -> list[Case]:
    """The fused decode kernels against the unfused step's ops for the same work. Residuals: fp32 for ours (the fused
    step's stream), dtype for the unfused ops; the in-place kernels' first calls (the compared ones) start alike."""
    cases = []
    for C, H in models:
        D = C // H
        elt = torch.finfo(dtype).bits // 8

        def rand(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
            return torch.randn(*shape, device=device, dtype=dt) * shape[-1] ** -0.5

        ln_w, ln_b = 1 + rand(C), rand(C)
        w_qkv, b_qkv, w_o, b_o = rand(3 * C, C), rand(3 * C), rand(C, C), rand(C)
        w_fc, b_fc, w_proj, b_proj, wte = rand(4 * C, C), rand(4 * C), rand(C, 4 * C), rand(C), rand(vocab, C)
        for B in batches:
            r = torch.randn(B, C, device=device)  # fp32: the fused step's residual
            r_low = r.to(dtype)
            caches = torch.randn(2, B, H, context, D, device=device, dtype=dtype)
            slots = torch.full((B,), context - 1, dtype=torch.int32, device=device)
            kv_len = torch.full((B,), context, dtype=torch.int32, device=device)
            q = torch.randn(B, H, D, device=device, dtype=dtype)
            hidden = torch.randn(B, 4 * C, device=device, dtype=dtype)
            shape = f"B={B} C={C}"

            def unfused_qkv(r=r_low, caches=caches, slots=slots, B=B) -> torch.Tensor:
                qkv = F.linear(K.layer_norm(r, ln_w, ln_b), w_qkv, b_qkv).view(B, 3, H, 1, D)
                index = slots.long().view(B, 1, 1, 1).expand(B, H, 1, D)
                caches[0].scatter_(2, index, qkv[:, 1])
                caches[1].scatter_(2, index, qkv[:, 2])
                return qkv[:, 0].reshape(B, C)

            cases.append(Case("ln_qkv_append", shape,
                              lambda r=r, c=caches, s=slots: K.ln_qkv_append(r, ln_w, ln_b, w_qkv, b_qkv, c[0], c[1], s,
                                                                             1e-5),
                              unfused_qkv, 3 * C * C * elt, "GB/s"))
            cases.append(Case("attention_residual", shape + f" S={context}",
                              lambda q=q, c=caches, n=kv_len, r=r.clone(): K.attention_residual(
                                  q, c[0], c[1], n, D ** -0.5, w_o, b_o, r),
                              lambda q=q, c=caches, n=kv_len, r=r_low, B=B: r + F.linear(
                                  K.attention_decode(q, c[0], c[1], n, D ** -0.5).view(B, C), w_o, b_o),
                              (C * C + 2 * B * H * context * D) * elt, "GB/s"))
            cases.append(Case("ln_linear_gelu", shape,
                              lambda r=r: K.ln_linear(r, ln_w, ln_b, w_fc, b_fc, 1e-5, gelu=True),
                              lambda r=r_low: K.bias_gelu(F.linear(K.layer_norm(r, ln_w, ln_b), w_fc), b_fc),
                              4 * C * C * elt, "GB/s"))
            cases.append(Case("linear_residual", shape,
                              lambda h=hidden, r=r.clone(): K.linear_residual(h, w_proj, b_proj, r),
                              lambda h=hidden, r=r_low: r + F.linear(h, w_proj, b_proj),
                              4 * C * C * elt, "GB/s"))
            cases.append(Case("ln_lm_head", shape + f" V={vocab}",
                              lambda r=r: K.ln_linear(r, ln_w, ln_b, wte, None, 1e-5),
                              lambda r=r_low: F.linear(K.layer_norm(r, ln_w, ln_b), wte),
                              vocab * C * elt, "GB/s"))
    return cases


def _max_abs_diff(a: torch.Tensor | tuple, b: torch.Tensor | tuple) -> float:
    if isinstance(a, tuple):
        return max(_max_abs_diff(x, y) for x, y in zip(a, b))
    return (a.float() - b.float()).abs().max().item()


def _run(cases: list[Case], dtype_name: str, timer: Callable[[Callable], float]) -> list[Row]:
    rows = []
    for c in cases:
        diff = _max_abs_diff(c.ours(), c.torch())  # also compiles before timing
        ours_ms, torch_ms = timer(c.ours), timer(c.torch)
        scale = 1e-9 if c.metric == "GB/s" else 1e-12
        rows.append(Row(c.kernel, c.shape, dtype_name, ours_ms, torch_ms,
                        c.work * scale / (ours_ms * 1e-3), c.work * scale / (torch_ms * 1e-3),
                        c.metric, torch_ms / ours_ms, diff))
    return rows


def table(rows: list[Row], copy_gbs: float | None) -> str:
    """Fixed-width table; with the device's copy bandwidth, memory-bound rows also show ours as a % of it."""
    head = (f"{'kernel':18s} {'shape':24s} {'dtype':5s} {'ours ms':>9s} {'torch ms':>9s} {'ours':>9s} "
            f"{'torch':>9s} {'unit':8s} {'% copy':>6s} {'speedup':>7s} {'max|diff|':>9s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        share = f"{100 * r.ours_rate / copy_gbs:6.0f}" if copy_gbs and r.metric == "GB/s" else f"{'':6s}"
        lines.append(f"{r.kernel:18s} {r.shape:24s} {r.dtype:5s} {r.ours_ms:9.4f} {r.torch_ms:9.4f} "
                     f"{r.ours_rate:9.2f} {r.torch_rate:9.2f} {r.metric:8s} {share} {r.speedup:7.2f} "
                     f"{r.max_abs_diff:9.2e}")
    return "\n".join(lines)


def copy_bandwidth_gbs(timer: Callable[[Callable], float], n_bytes: int = 2**30) -> float:
    """Device-to-device copy of n_bytes by a kernel, counting bytes read plus written: the memory ceiling.

    A kernel (torch.mul), not copy_: captured in a CUDA graph, copy_ becomes a memcpy node run by the copy
    engines, which moved 2.8 TB/s on an H200 where an eager copy_ and this repo's LayerNorm inside a graph moved 4.2.
    """
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = timer(lambda: torch.mul(src, 1.0, out=dst))
    return 2 * n_bytes / (ms * 1e-3) / 1e9


def _cpu_timer(fn: Callable) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/kernels-<device>.json")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under the Triton interpreter")
    parser.add_argument("--fused", action="store_true", help="the fused decode step's kernels (module docstring)")
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported and the kernels are decorated
    if not args.smoke and not torch.cuda.is_available():
        print("bench_kernels: no CUDA GPU found; this benchmark needs one (use --smoke for a CPU check "
              "under the Triton interpreter).", file=sys.stderr)
        return 2

    from gpt2_kernels import ops as K  # imported here: TRITON_INTERPRET must be settled first
    import triton

    problem = K.interpreter_problem() if args.smoke else None
    if problem:
        print(f"bench_kernels --smoke: {problem}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    if args.smoke:
        device, device_name, timer = "cpu", "cpu-interpreter", _cpu_timer
    else:
        device, device_name = "cuda", torch.cuda.get_device_name()

        def timer(fn: Callable) -> float:
            return triton.testing.do_bench_cudagraph(fn, return_mode="median")

    print(f"kernels from {Path(K.__file__).resolve().parent}; device {device_name}; dtypes {' '.join(args.dtype)}")
    rows = []
    for name in args.dtype:
        dtype = DTYPES[name]
        if args.smoke:
            cases = (_norm_cases(K, device, dtype, [(64, 2)], [3])
                     + _attention_cases(K, device, dtype, [(64, 2)], [16], [2], 80)
                     + _fused_cases(K, device, dtype, [(64, 2)], [1, 3], 80, 300))
        elif args.fused:
            cases = _fused_cases(K, device, dtype, MODELS, FUSED_BATCH, FUSED_CONTEXT, VOCAB)
        else:
            cases = (_norm_cases(K, device, dtype, MODELS, ROWS)
                     + _attention_cases(K, device, dtype, MODELS, PREFILL_T, DECODE_BATCH, DECODE_CONTEXT))
        rows += _run(cases, name, timer)
        del cases  # this dtype's tensors, before the next dtype allocates its own
    copy_gbs = None if args.smoke else copy_bandwidth_gbs(timer)
    report = table(rows, copy_gbs)
    print(report)
    if copy_gbs:
        print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write); % copy: ours as a share of it")
    broken = [f"{r.kernel} {r.shape}" for r in rows if not math.isfinite(r.max_abs_diff)]
    if broken:
        print(f"non-finite differences from torch: {broken}", file=sys.stderr)
        return 1
    if args.save:
        slug = ("fused-" if args.fused else "") + re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"kernels-{slug}.json"
        payload = {"device": device_name, "dtypes": args.dtype, "torch": torch.__version__,
                   "triton": triton.__version__, "copy_gbs": copy_gbs, "rows": [asdict(r) for r in rows]}
        path.write_text(json.dumps(payload, indent=2) + "\n")
        path.with_suffix(".md").write_text(
            f"# Kernel benchmark: {device_name}\n\ntorch {torch.__version__}, triton {triton.__version__}; "
            f"`python -m benchmarks.bench_kernels{' --fused' * args.fused} --save`; times are medians of CUDA-graph "
            "replays "
            f"(triton.testing.do_bench_cudagraph).\n\n```\n{report}\n```\n"
            + (f"\nDevice-to-device copy by a kernel: {copy_gbs:.0f} GB/s (read + write); % copy is ours as a "
               "share of it.\n" if copy_gbs else ""))
        print(f"wrote {path} and {path.with_suffix('.md').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
