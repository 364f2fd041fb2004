"""This engine's C kernels for the CPU (`gpt2/cpu/csrc/`), built once with the system C compiler.

The sources are compiled together (`cc -O3 -fopenmp` and the CPU's vector instructions, a few seconds) into one shared
library in the engine cache's `kernels` directory ($GPT2_ENGINE_CACHE, else ~/.cache/dialogpt-engine; kept private to
this user, 0700), named by a hash of the sources and the command, its sha256 recorded beside it, and loaded with
ctypes only where its bytes still have that sha256 (else rebuilt). Its OpenMP runtime is the libgomp torch has loaded,
so the kernels run on torch's threads. They are written in `csrc/simd.h`'s vectors: AVX-512 (`-mavx512f -mfma`) where
the CPU has it, else AVX2 with FMA (`-mavx2 -mfma`). Without either, or with GPT2_CPU_KERNEL=0, the model keeps
torch's ops; so it does, with a one-line warning, where the kernels cannot be built or loaded. `unavailable_reason()`
says why. The kernels: `small_batch_matmul` (fp32 matmuls of 1-16 rows), `prefill_matmul` (of more rows),
`attention` (causal attention over the KV cache), `decode_blocks` (a decode step's blocks in one call) and
`decode_step` (a whole decode step, fp32, bf16 or int8, in one call; fp32 and int8 also over a bf16 or fp16 cache).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import torch

from ..paths import engine_cache_dir

SOURCE_DIR = Path(__file__).with_name("csrc")
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC"]
# By `instruction_set()`. The AVX2 build's fp16 KV cache converts with F16C (csrc/kv_f16.h), which only those functions
# use and which runs only where the CPU has it (`f16_cache_available`); AVX-512F has conversions of its own.
ISA_FLAGS = {"AVX-512": ["-mavx512f", "-mfma"], "AVX2": ["-mavx2", "-mfma", "-mf16c"]}
# Block shapes measured faster on a CPU than csrc/small_batch_loop.h's and small_batch_matmul_int8.c's defaults, by
# `cpu_kind()`: AMD's family 26 is Zen 5 (8 W rows a block for one input row, where Zen 4 and an Intel Xeon measured
# one fastest: docs/performance.md#csrcsmall_batch_looph-the-block-shapes-shape_1--shape_many-defaults-on-four-cpus).
TUNED_FLAGS = {("AuthenticAMD", "26"): ["-DSHAPE_1=8,1"]}
LIBRARY_STEM = "cpu_kernels"


def _sources() -> list[Path]:
    return sorted(SOURCE_DIR.glob("*.c"))


class AttentionStrides(ctypes.Structure):
    """`attention_strides` in csrc/attention_f32.h: element strides of a (B, H, T, D) tensor's first three dims."""

    _fields_ = [("b", ctypes.c_long), ("h", ctypes.c_long), ("t", ctypes.c_long)]


def _declare(lib: ctypes.CDLL) -> None:
    """The exported functions' C signatures (see each source)."""
    lib.small_batch_matmul_f32.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_int]
    lib.small_batch_matmul_f32.restype = ctypes.c_int
    lib.small_batch_matmul_bf16.argtypes = lib.small_batch_matmul_f32.argtypes
    lib.small_batch_matmul_bf16.restype = ctypes.c_int
    lib.prefill_matmul_f32.argtypes = lib.small_batch_matmul_f32.argtypes
    lib.prefill_matmul_f32.restype = ctypes.c_int
    lib.decode_blocks_f32.argtypes = ([ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
                                      + [ctypes.c_long] * 3 + [ctypes.c_void_p] * 2 + [ctypes.c_long]
                                      + [ctypes.c_void_p] * 2 + [ctypes.c_float])
    lib.decode_blocks_f32.restype = ctypes.c_int
    lib.decode_step_f32.argtypes = ([ctypes.c_void_p] * 2 + [ctypes.c_long] + [ctypes.c_void_p] * 2 + [ctypes.c_long]
                                    + [ctypes.c_void_p] * 2)
    lib.decode_step_f32.restype = ctypes.c_int
    lib.decode_step_bf16.argtypes = lib.decode_step_f32.argtypes
    lib.decode_step_bf16.restype = ctypes.c_int
    lib.decode_step_int8.argtypes = lib.decode_step_f32.argtypes
    lib.decode_step_int8.restype = ctypes.c_int
    for cache in ("kv_bf16", "kv_f16"):  # the fp32 and int8 steps over a bf16 or fp16 KV cache
        for step in (getattr(lib, f"decode_step_f32_{cache}"), getattr(lib, f"decode_step_int8_{cache}")):
            step.argtypes = lib.decode_step_f32.argtypes
            step.restype = ctypes.c_int
    lib.small_batch_matmul_int8.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_int]
    lib.small_batch_matmul_int8.restype = ctypes.c_int
    lib.attention_f32.argtypes = [ctypes.c_void_p, AttentionStrides, ctypes.c_void_p, ctypes.c_void_p,
                                  AttentionStrides, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                  AttentionStrides] + [ctypes.c_long] * 5
    lib.attention_f32.restype = ctypes.c_int


class UntrustedCacheError(Exception):
    """The kernel cache directory is not this user's own private directory, so a library in it may not be ours."""


def claim_private_dir(directory: Path) -> None:
    """Makes directory (the engine cache's `kernels`) this user's private one, 0700, before anything is loaded from it.

    Created 0700 where missing; an existing one of this user's with other permissions is set to 0700. One that is a
    symlink, not a directory, or owned by another user raises UntrustedCacheError: whoever can write there could put
    code into this process."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    try:
        directory.mkdir(mode=0o700)
    except FileExistsError:
        pass
    info = directory.lstat()
    if stat.S_ISLNK(info.st_mode):
        raise UntrustedCacheError(f"the kernel cache {directory} is a symlink (to {os.readlink(directory)}); "
                                  "refusing to load libraries from it")
    if not stat.S_ISDIR(info.st_mode):
        raise UntrustedCacheError(f"the kernel cache {directory} is not a directory")
    if info.st_uid != os.geteuid():
        raise UntrustedCacheError(f"the kernel cache {directory} is owned by uid {info.st_uid}, not this user "
                                  f"(uid {os.geteuid()}); refusing to load libraries from it")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(directory, 0o700)


def sha256_sidecar(library: Path) -> Path:
    """The sidecar holding library's sha256 (hex), recorded when it was built."""
    return library.with_name(library.name + ".sha256")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def is_verified(library: Path) -> bool:
    """library exists and its bytes hash to the sha256 its sidecar recorded at build time: not truncated by a killed
    build or a full disk, nor replaced by another file."""
    try:
        return sha256_sidecar(library).read_text().strip() == _sha256(library)
    except FileNotFoundError:
        return False


def _build(command: list[str], library: Path) -> str | None:
    """Compiles the sources into library and records its sha256 beside it; None, or why the compile failed.

    Both files are written in a scratch directory beside them and moved into place (atomically, library first): a
    process loading meanwhile sees whole files, and a library whose sidecar is not yet (or no longer) its own fails
    `is_verified`, so that process builds its own."""
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        built = Path(scratch) / library.name
        run = subprocess.run([*command, *map(str, _sources()), "-o", str(built)], capture_output=True, text=True)
        if run.returncode != 0:
            errors = " ".join(run.stderr.split())[-500:] or "no message"  # one line, for the warning
            return f"compiling {SOURCE_DIR.name}/*.c with {command[0]} failed (exit status {run.returncode}): {errors}"
        sha256_sidecar(built).write_text(_sha256(built) + "\n")
        os.replace(built, library)
        os.replace(sha256_sidecar(built), sha256_sidecar(library))
    return None


def _unavailable(reason: str) -> tuple[None, str, float]:
    """_load's answer where the kernels should have loaded but could not: warned once (as _load runs once)."""
    warnings.warn(f"C kernels unavailable ({reason}); using torch's ops", RuntimeWarning, stacklevel=4)
    return None, reason, 0.0


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str | None, float]:
    """(library, None, compile seconds) or (None, why not, 0.0); built and loaded once per process.

    Only a library that `is_verified` is loaded; any other (truncated, unrecorded, replaced) is rebuilt first."""
    if os.environ.get("GPT2_CPU_KERNEL", "1") == "0":
        return None, "turned off by GPT2_CPU_KERNEL=0", 0.0
    isa = instruction_set()
    if isa is None:
        return None, f"this CPU has neither AVX-512 nor AVX2 with FMA (torch reports " \
                     f"{torch.backends.cpu.get_cpu_capability()})", 0.0
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return _unavailable(f"no C compiler found ({os.environ.get('CC', 'cc')!r} is not on PATH)")
    content = b"".join(p.name.encode() + p.read_bytes() for p in sorted(SOURCE_DIR.iterdir()) if p.is_file())
    command = [compiler, *FLAGS, *ISA_FLAGS[isa], *tuned_flags()]
    key = hashlib.sha256(content + " ".join(command).encode()).hexdigest()[:16]
    library = engine_cache_dir() / "kernels" / f"{LIBRARY_STEM}-{key}.so"
    seconds = 0.0
    try:
        claim_private_dir(library.parent)
        if not is_verified(library):
            start = time.perf_counter()
            failure = _build(command, library)
            if failure is not None:
                return _unavailable(failure)
            seconds = time.perf_counter() - start
        # Loaded by name once verified: in this user's private directory only another whole build can replace it.
        lib = ctypes.CDLL(str(library))
        _declare(lib)
    except UntrustedCacheError as e:
        return _unavailable(str(e))
    except OSError as e:  # an unwritable cache, a library that will not load
        return _unavailable(f"cannot build or load {library}: {e}")
    except AttributeError as e:  # ctypes' error for a symbol the library lacks
        return _unavailable(f"{library} lacks a kernel this engine calls ({e})")
    return lib, None, seconds


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None where they cannot be used (see `unavailable_reason`)."""
    return _load()[0]


def unavailable_reason() -> str | None:
    """Why the kernels cannot be used here, or None when they can."""
    return _load()[1]


def instruction_set() -> str | None:
    """The vector instructions the kernels are built for here: "AVX-512", "AVX2" (with FMA), or None for neither.
    From /proc/cpuinfo, else from what torch dispatches to where that cannot be read."""
    flags = cpu_flags()
    if not flags:
        capability = torch.backends.cpu.get_cpu_capability()
        return "AVX-512" if capability.startswith("AVX512") else "AVX2" if capability == "AVX2" else None
    return "AVX-512" if "avx512f" in flags else "AVX2" if {"avx2", "fma"} <= flags else None


@functools.cache
def cpu_info() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo ("vendor_id", "cpu family", "flags", ...); empty where it cannot
    be read."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the end of the first processor's fields
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        return {}
    return info


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags, read from /proc/cpuinfo (empty where it cannot be read)."""
    return frozenset(cpu_info().get("flags", "").split())


def cpu_kind() -> tuple[str | None, str | None]:
    """(vendor_id, cpu family) in /proc/cpuinfo, the key of this CPU's tuned settings (None for a field it lacks)."""
    info = cpu_info()
    return info.get("vendor_id"), info.get("cpu family")


def tuned_flags() -> list[str]:
    """The compiler flags of this CPU's block shapes (`TUNED_FLAGS`), none for a CPU without its own."""
    return TUNED_FLAGS.get(cpu_kind(), [])


def bf16_available() -> bool:
    """The bf16 kernel (`small_batch_matmul.matmul_bf16`) can run: the kernels are built and the CPU has
    avx512_bf16, which only that kernel's functions are compiled for."""
    return library() is not None and "avx512_bf16" in cpu_flags()


def int8_available() -> bool:
    """The int8 kernels (`csrc/small_batch_matmul_int8.c`, `csrc/decode_step_int8.c`) can run: the AVX-512 build is
    loaded and the CPU has avx512_vnni, which only their functions are compiled for."""
    return library() is not None and instruction_set() == "AVX-512" and "avx512_vnni" in cpu_flags()


def f16_cache_available() -> bool:
    """The decode steps over an fp16 KV cache (`csrc/decode_step_*_kv_f16.c`) can run: the kernels are built and
    their fp16 conversions are the CPU's, AVX-512F's or, in the AVX2 build, F16C's (every AVX2 CPU has it; a CPU whose
    flags cannot be read is not assumed to). The bf16 cache's conversions are plain integer instructions of both."""
    return library() is not None and (instruction_set() == "AVX-512" or "f16c" in cpu_flags())


def compile_seconds() -> float:
    """What building the kernels cost this process (0 when they came from the cache or are unavailable)."""
    return _load()[2]


def status() -> str:
    """One line for benchmark reports: whether fp32 steps run on these kernels, and what building them cost."""
    reason = unavailable_reason()
    if reason is not None:
        return f"fp32 steps: torch's ops and oneDNN (the C kernels are unavailable: {reason})"
    built = f"built in {compile_seconds():.2f} s by this process" if compile_seconds() else "loaded from the cache"
    bf16 = "bf16 decode steps of 1-16 rows too" if bf16_available() else "not bf16's (no avx512_bf16 on this CPU)"
    int8 = "int8 ones too" if int8_available() else "not int8's (no avx512_vnni on this CPU)"
    tuned = f"; {' '.join(tuned_flags())} for this CPU" if tuned_flags() else ""
    return (f"fp32 decode steps of 1-16 rows, prefill matmuls and attention: this engine's C kernels "
            f"({instruction_set()}{tuned}), {bf16}, {int8} (gpt2/cpu/build.py; {built}, not in the timings)")
