"""What a loaded model costs in memory: the process's resident memory by kind, the model's tensors by role, and
`gpt2.load` measured in a fresh process (`load_footprint`, which runs `python -m gpt2.memory MODEL ...`).

Resident memory (RSS) is read from Linux's /proc/self/status (VmRSS, its peak VmHWM, RssAnon, RssFile) and, for the
pages a checkpoint file keeps mapped, /proc/self/smaps; the memory glibc's allocator holds freed from mallinfo2.
Where these cannot be read (another OS, another C library) the figures read 0. A fresh process is what makes the
figures the model's: a process that loaded, freed or imported other things holds memory of its own.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .checkpoint import WEIGHTS_FILES
from .config import GPT2Config
from .convert import DTYPES
from .cpu.bf16_linear import PackedLinear
from .cpu.int8_linear import Int8Linear
from .loading import load
from .model import GPT2

MB = 2**20


@dataclass(frozen=True)
class ProcessMemory:
    """This process's resident memory now, in MB: all of it, its peak so far, anonymous (heap, tensors) and
    file-backed (code, mapped files) pages."""

    rss: float
    peak: float
    anon: float
    file: float


def process_memory() -> ProcessMemory:
    """Read from /proc/self/status (zeros where it cannot be read)."""
    fields = {"VmRSS": 0.0, "VmHWM": 0.0, "RssAnon": 0.0, "RssFile": 0.0}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in fields:
                    fields[key] = int(value.split()[0]) / 1024  # kB
    except OSError:
        pass
    return ProcessMemory(fields["VmRSS"], fields["VmHWM"], fields["RssAnon"], fields["RssFile"])


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):  # not glibc, or one older than 2.33 (no mallinfo2)
        return None
    return libc


def allocator_free_mb() -> float:
    """Memory glibc's allocator holds freed, ready for reuse but still resident (mallinfo2's fordblks), in MB."""
    libc = _libc()
    return libc.mallinfo2().fordblks / MB if libc is not None else 0.0


def trim_allocator() -> None:
    """Hand glibc's freed heap memory back to the system (malloc_trim), where glibc is the allocator."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def mapped_file_mb(path: str | Path) -> float:
    """Resident pages of this process's mappings of the file at path, in MB (/proc/self/smaps)."""
    target = os.path.realpath(path)
    total, current = 0, None
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                fields = line.split()
                if fields and "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header line
                    current = fields[5] if len(fields) > 5 else None
                elif fields and fields[0] == "Rss:" and current == target:
                    total += int(fields[1])
    except OSError:
        return 0.0
    return total / 1024


def weights_mb(config: GPT2Config, dtype: torch.dtype = torch.float32, quantize: str | None = None) -> float:
    """One copy of every weight in the format `gpt2.load` keeps it, in MB: every tensor in dtype, or with
    quantize="int8" the block matrices and the lm_head in int8 (their per-row scales aside) and the rest in fp32
    (the embeddings the lookup reads, LayerNorms, biases). The yardstick a load's footprint is measured against."""
    C, L = config.n_embd, config.n_layer
    matrices = L * 12 * C * C  # each block's c_attn, c_proj, c_fc and c_proj
    embeddings = (config.vocab_size + config.n_positions) * C
    small = L * (4 * C + 9 * C) + 2 * C  # ln_1, ln_2 (weight and bias) and the four biases per block; ln_f
    if quantize == "int8":
        return (matrices + config.vocab_size * C + 4 * (embeddings + small)) / MB
    return (matrices + embeddings + small) * dtype.itemsize / MB


def tensor_breakdown(model: GPT2) -> dict[str, float]:
    """The model's tensors by role, in MB, each tensor counted once (wte shared with a tied lm_head, say):
    parameters and buffers; the plain weights a layer keeps beside them for the C decode step and matmuls; and the
    packed copies a CPU library keeps (oneDNN's bf16 layout, fbgemm's int8 one, the latter counted as its int8
    values: fbgemm tells no size)."""
    seen: set[tuple[int, int]] = set()

    def once(t: torch.Tensor | None) -> float:
        if t is None or t.layout != torch.strided or t.is_meta:
            return 0.0
        key = (t.data_ptr(), t.numel())
        if key in seen:
            return 0.0
        seen.add(key)
        return t.numel() * t.element_size() / MB

    roles = {"parameters and buffers": 0.0, "plain weights beside them": 0.0, "oneDNN packed bf16": 0.0,
             "fbgemm packed int8": 0.0}
    for t in [*model.parameters(), *model.buffers()]:
        roles["parameters and buffers"] += once(t)
    for module in model.modules():
        if isinstance(module, PackedLinear):
            roles["plain weights beside them"] += once(module.plain_weight)
            if module.packed is not None:
                roles["oneDNN packed bf16"] += torch.ops.mkldnn._nbytes(module.packed) / MB
        elif isinstance(module, Int8Linear):
            roles["plain weights beside them"] += once(module.step_weight) + once(module.step_rows)
            if module.packed is not None:
                roles["fbgemm packed int8"] += module.out_features * module.in_features / MB
    return roles


@dataclass(frozen=True)
class LoadFootprint:
    """`gpt2.load` in a fresh process (`load_footprint`): MB and seconds."""

    runtime_mb: float  # RSS after `import torch, gpt2`, before the load
    weights_mb: float  # `weights_mb` of the model in the chosen format
    load_s: float
    after_load: ProcessMemory  # peak: the most the process held so far, the load included
    after_generate: ProcessMemory  # after a short generate following the load
    tensors_mb: dict[str, float]  # `tensor_breakdown` after the load
    checkpoint_pages_mb: float  # resident pages of the checkpoint's weights file still mapped after the load
    allocator_free_mb: float  # freed memory glibc holds after the load
    other_mb: float  # the rest of the RSS after the load: code and data of the libraries, workspaces, the tokenizer

    @property
    def rss_over_weights(self) -> float:
        """(RSS after the load - the runtime) / the weights: 1.0 is a model that costs its weights once."""
        return (self.after_load.rss - self.runtime_mb) / self.weights_mb

    @property
    def peak_over_rss(self) -> float:
        """The peak during the load over the RSS after it."""
        return self.after_load.peak / self.after_load.rss

    def breakdown(self) -> dict[str, float]:
        """Where the RSS after the load goes, in MB: the runtime, the tensors by role, checkpoint pages still mapped,
        the allocator's free memory and the rest; the parts add up to the RSS."""
        return {"runtime": self.runtime_mb, **self.tensors_mb, "checkpoint pages mapped": self.checkpoint_pages_mb,
                "allocator's free memory": self.allocator_free_mb, "other": self.other_mb}

    def line(self, name: str) -> str:
        """One line: RSS after the load against the runtime and the weights, the peak, and the breakdown."""
        parts = ", ".join(f"{key} {value:.0f}" for key, value in self.breakdown().items() if round(value) != 0)
        return (f"{name}: RSS after load {self.after_load.rss:.0f} MB = runtime {self.runtime_mb:.0f} + "
                f"{self.rss_over_weights:.2f} x the weights ({self.weights_mb:.0f} MB); peak during load "
                f"{self.after_load.peak:.0f} ({self.peak_over_rss:.2f} x); after a short generate "
                f"{self.after_generate.rss:.0f}, peak {self.after_generate.peak:.0f}; load {self.load_s:.1f} s. "
                f"Breakdown (MB): {parts}")


def load_footprint(path: str | Path, *, dtype: torch.dtype = torch.float32, quantize: str | None = None,
                   threads: int = 2, prompt_len: int = 32, new_tokens: int = 8) -> LoadFootprint:
    """`gpt2.load(path, dtype=dtype, quantize=quantize)` and a short generate (one prompt of prompt_len tokens,
    new_tokens greedy ones) in a fresh Python process, measured there; raises RuntimeError with its stderr if it
    fails."""
    names = {value: key for key, value in DTYPES.items()}
    if dtype not in names:
        raise ValueError(f"dtype {dtype} is not supported; choose one of {', '.join(map(str, DTYPES.values()))}")
    command = [sys.executable, "-m", "gpt2.memory", str(path), "--dtype", names[dtype], "--threads", str(threads),
               "--prompt-len", str(prompt_len), "--new-tokens", str(new_tokens)]
    if quantize is not None:
        command += ["--quantize", quantize]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"measuring the load of {path} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    fields = json.loads(done.stdout.strip().splitlines()[-1])
    fields["after_load"] = ProcessMemory(**fields["after_load"])
    fields["after_generate"] = ProcessMemory(**fields["after_generate"])
    return LoadFootprint(**fields)


def _weights_file(path: Path) -> Path:
    if path.is_dir():
        return next((path / name for name in WEIGHTS_FILES if (path / name).is_file()), path)
    return path


def _measure(args: argparse.Namespace) -> LoadFootprint:
    """This process's load, as `load_footprint` describes it."""
    torch.set_num_threads(args.threads)
    runtime = process_memory().rss
    dtype = DTYPES[args.dtype]
    start = time.perf_counter()
    model = load(args.model, dtype=dtype, quantize=args.quantize)
    load_s = time.perf_counter() - start
    after_load = process_memory()
    tensors = tensor_breakdown(model)
    pages = mapped_file_mb(_weights_file(Path(args.model)))
    free = allocator_free_mb()
    other = after_load.rss - runtime - sum(tensors.values()) - pages - free
    model.generate([list(range(1, args.prompt_len + 1))], max_new_tokens=args.new_tokens,
                   min_new_tokens=args.new_tokens)
    return LoadFootprint(runtime, weights_mb(model.config, dtype, args.quantize), load_s, after_load,
                         process_memory(), tensors, pages, free, other)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpt2.memory", description="Load a model in this fresh process and "
                                "print what it costs in memory, as one line of JSON (see `load_footprint`).")
    p.add_argument("model")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--quantize", choices=["int8"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=8)
    print(json.dumps(asdict(_measure(p.parse_args(argv)))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
