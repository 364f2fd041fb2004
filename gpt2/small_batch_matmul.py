"""fp32 matmuls of 1 to 8 input rows on the CPU (a decode step's), on a small AVX-512 kernel built once with `cc`.

A decode step at batch b reads every weight once for b rows, so up to a few rows its matmuls are bound by how
fast they stream the weights. Torch's fastest route on the AMD EPYC (Zen 4) this engine is tuned on is oneDNN,
which runs one row as `brg_matmul:avx2` (`ONEDNN_VERBOSE=1`); MKL streams at half its speed on AMD.
`small_batch_matmul_f32.c` walks a block of weight rows at once with one AVX-512 accumulator per (input row,
weight row), prefetching each row's stream ahead. All DialoGPT-small decode matmuls in sequence (494 MB,
cold; 2 threads, fastest of 5 interleaved, in a quiet minute of a machine whose bandwidth drifts 1.5x):

    input rows      1          2          4          8
    oneDNN          15.1 ms    22.6 ms    25.0 ms    29.4 ms
    this kernel     10.0 ms    11.2 ms    16.5 ms    21.5 ms

(a plain max-reduction over the same bytes: 8.5 ms). Above 8 rows oneDNN's GEMM is used.

The kernel is compiled on first use (`cc -O3 -mavx512f -mfma -fopenmp`, about 0.4 s) into the engine cache
($GPT2_ENGINE_CACHE, else ~/.cache/dialogpt-engine) and loaded with ctypes; its OpenMP runtime is the libgomp
torch has loaded, so it runs on torch's threads. Without AVX-512 or a compiler, or with GPT2_CPU_KERNEL=0, the
model keeps oneDNN; `unavailable_reason()` says why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("small_batch_matmul_f32.c")
FLAGS = ["-O3", "-mavx512f", "-mfma", "-fopenmp", "-shared", "-fPIC"]
MAX_ROWS = 8  # input rows the kernel takes; larger batches are compute-bound and stay on oneDNN's GEMM
COLS_MULTIPLE = 16  # the kernel reads each row of x and W in 16-float vectors


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str | None, float]:
    """(library, None, compile seconds) or (None, why not, 0.0); built and loaded once per process."""
    if os.environ.get("GPT2_CPU_KERNEL", "1") == "0":
        return None, "turned off by GPT2_CPU_KERNEL=0", 0.0
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX512_FP16"):  # the kernel is AVX-512 only
        return None, f"this CPU has no AVX-512 (torch reports {torch.backends.cpu.get_cpu_capability()})", 0.0
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None, f"no C compiler found ({os.environ.get('CC', 'cc')!r} is not on PATH)", 0.0
    from .loading import engine_cache_dir  # imported here: loading imports the model, which imports the backend

    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *FLAGS]).encode()).hexdigest()[:16]
    library = engine_cache_dir() / "kernels" / f"{SOURCE.stem}-{key}.so"
    seconds = 0.0
    try:
        if not library.exists():
            start = time.perf_counter()
            library.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
                built = Path(scratch) / library.name
                run = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], capture_output=True,
                                     text=True)
                if run.returncode != 0:
                    return None, f"compiling {SOURCE.name} with {compiler} failed: {run.stderr.strip()[-500:]}", 0.0
                os.replace(built, library)  # atomic: a process loading it meanwhile sees the whole file or none
            seconds = time.perf_counter() - start
        lib = ctypes.CDLL(str(library))
    except OSError as e:  # an unwritable cache, a library that will not load
        return None, f"cannot build or load {library}: {e}", 0.0
    lib.small_batch_matmul_f32.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3
    lib.small_batch_matmul_f32.restype = ctypes.c_int
    return lib, None, seconds


def unavailable_reason() -> str | None:
    """Why the kernel cannot be used here, or None when it can."""
    return _load()[1]


def compile_seconds() -> float:
    """What building the kernel cost this process (0 when it came from the cache or is unavailable)."""
    return _load()[2]


def status() -> str:
    """One line for benchmark reports: which fp32 decode matmul runs here, and what building it cost."""
    reason = unavailable_reason()
    if reason is not None:
        return f"fp32 matmuls of 1-{MAX_ROWS} rows: oneDNN (the small-batch kernel is unavailable: {reason})"
    built = f"built in {compile_seconds():.2f} s by this process" if compile_seconds() else "loaded from the cache"
    return (f"fp32 matmuls of 1-{MAX_ROWS} rows: the small-batch kernel (gpt2/small_batch_matmul.py; {built}, "
            "not in the timings)")


def applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """1-8 fp32 rows on the CPU against a contiguous fp32 weight whose width the kernel takes, outside autograd."""
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and weight.is_contiguous()
            and x.shape[-1] == weight.shape[1] and 1 <= x.numel() // weight.shape[1] <= MAX_ROWS
            and weight.shape[1] % COLS_MULTIPLE == 0 and (bias is None or bias.dtype == torch.float32)
            and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
            and _load()[0] is not None)


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., in) of 1-8 rows, weight (out, in), bias (out,) or None -> x W^T + b, (..., out); see `applies`."""
    lib = _load()[0]
    x = x.contiguous()
    bias = None if bias is None else bias.contiguous()
    rows = x.numel() // x.shape[-1]
    y = torch.empty(*x.shape[:-1], weight.shape[0], dtype=torch.float32)
    lib.small_batch_matmul_f32(weight.data_ptr(), x.data_ptr(), 0 if bias is None else bias.data_ptr(),
                               y.data_ptr(), rows, weight.shape[0], weight.shape[1])
    return y
