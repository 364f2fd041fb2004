"""What a loaded model costs in memory: the process's resident memory by kind, the model's tensors by role, and
`gpt2.load` measured in a fresh process (`load_footprint`, which runs `python -m gpt2.memory MODEL ...`).

The process's figures come from `gpt2.process_memory` (Linux and glibc; zeros elsewhere). A fresh process is what
makes them the model's: a process that loaded, freed or imported other things holds memory of its own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .checkpoint import WEIGHTS_FILES
from .config import GPT2Config
from .convert import DTYPES, write_engine_dir
from .cpu.bf16_linear import PackedLinear
from .cpu.int8_linear import Int8Linear
from .loading import load
from .model import GPT2
from .process_memory import MB, ProcessMemory, mapped_file_mb, process_memory, reset_peak, trim_allocator
from .tokenizer import Tokenizer


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
    parameters and buffers; the plain weights the bf16 and int8 CPU layers hold (not parameters: see
    `gpt2.cpu.bf16_linear`, `gpt2.cpu.int8_linear`); and the packed copies a CPU library keeps beside them
    (oneDNN's bf16 layout, fbgemm's int8 one, the latter counted as its int8 values: fbgemm tells no size)."""
    seen: set[tuple[int, int]] = set()

    def once(t: torch.Tensor | None) -> float:
        if t is None or t.layout != torch.strided or t.is_meta:
            return 0.0
        key = (t.data_ptr(), t.numel())
        if key in seen:
            return 0.0
        seen.add(key)
        return t.numel() * t.element_size() / MB

    roles = {"parameters and buffers": 0.0, "CPU layers' plain weights": 0.0, "oneDNN packed copies": 0.0,
             "fbgemm packed copies": 0.0}
    for t in [*model.parameters(), *model.buffers()]:
        roles["parameters and buffers"] += once(t)
    for module in model.modules():
        if isinstance(module, PackedLinear):
            roles["CPU layers' plain weights"] += once(module.plain_weight)
            if module.packed is not None:
                roles["oneDNN packed copies"] += torch.ops.mkldnn._nbytes(module.packed) / MB
        elif isinstance(module, Int8Linear):
            roles["CPU layers' plain weights"] += once(module.step_weight) + once(module.step_rows)
            if module.packed is not None:
                roles["fbgemm packed copies"] += module.out_features * module.in_features / MB
    return roles


@dataclass(frozen=True)
class LoadFootprint:
    """`gpt2.load` in a fresh process (`load_footprint`): MB and seconds."""

    runtime_mb: float  # RSS after `import torch, gpt2`, before the load
    weights_mb: float  # `weights_mb` of the model in the chosen format
    load_s: float
    after_load: ProcessMemory  # peak: the most the process held so far, the load included
    tensors_mb: dict[str, float]  # `tensor_breakdown` after the load
    checkpoint_pages_mb: float  # resident pages of the checkpoint's weights file still mapped after the load
    allocator_free_mb: float  # freed memory glibc held resident after the load (what malloc_trim hands back)
    other_mb: float  # the rest of the RSS after the load: code and data of the libraries, workspaces, the tokenizer
    after_generate: ProcessMemory  # after a generate following the load
    generate_growth_mb: float  # the peak during that generate above the RSS before it (KV cache, activations)

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
                f"{self.after_load.peak:.0f} ({self.peak_over_rss:.2f} x); load {self.load_s:.1f} s; a generate "
                f"then grew {self.generate_growth_mb:.0f} at its peak. Breakdown (MB): {parts}")


def load_footprint(path: str | Path, *, dtype: torch.dtype = torch.float32, quantize: str | None = None,
                   packed_prefill: bool = False, kv_dtype: torch.dtype | None = None, threads: int = 2,
                   batch: int = 1, prompt_len: int = 32, new_tokens: int = 32) -> LoadFootprint:
    """`gpt2.load(path, dtype=..., quantize=..., packed_prefill=..., kv_dtype=...)` and then a generate (batch
    prompts of prompt_len tokens, new_tokens greedy ones each) in a fresh Python process, measured there; raises
    RuntimeError with its stderr if it fails."""
    names = {value: key for key, value in DTYPES.items()}
    for name, value in (("dtype", dtype), ("kv_dtype", kv_dtype)):
        if value is not None and value not in names:
            raise ValueError(f"{name} {value} is not supported; choose one of {', '.join(map(str, names))}")
    command = [sys.executable, "-m", "gpt2.memory", str(path), "--dtype", names[dtype], "--threads", str(threads),
               "--batch", str(batch), "--prompt-len", str(prompt_len), "--new-tokens", str(new_tokens)]
    command += ["--quantize", quantize] if quantize is not None else []
    command += ["--kv-dtype", names[kv_dtype]] if kv_dtype is not None else []
    command += ["--packed-prefill"] if packed_prefill else []
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"measuring the load of {path} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    fields = json.loads(done.stdout.strip().splitlines()[-1])
    return LoadFootprint(**{**fields, "after_load": ProcessMemory(**fields["after_load"]),
                            "after_generate": ProcessMemory(**fields["after_generate"])})


# How `gpt2 bench` and benchmarks/bench_generation.py load each of this engine's CPU engines, by name
ENGINE_LOADS: dict[str, dict[str, object]] = {
    "this engine": {}, "this engine int8": {"quantize": "int8"}, "this engine bf16": {"dtype": torch.bfloat16},
    "this engine int8 packed": {"quantize": "int8", "packed_prefill": True},
    "this engine bf16 packed": {"dtype": torch.bfloat16, "packed_prefill": True}}


def engine_footprints(model: GPT2, names: Iterable[str], **measure: int) -> dict[str, LoadFootprint]:
    """`load_footprint` of each named engine (`ENGINE_LOADS`) loading model's weights, written once to a temporary
    engine directory; measure: load_footprint's threads, batch, prompt_len, new_tokens."""
    with tempfile.TemporaryDirectory(prefix="gpt2-memory-") as tmp:
        state_dict = {name: value.detach().contiguous() for name, value in model.state_dict().items()}
        write_engine_dir(Path(tmp), model.config, state_dict, Tokenizer.default())
        del state_dict
        return {name: load_footprint(tmp, **ENGINE_LOADS[name], **measure) for name in names}


def footprint_rows(size: str, footprints: dict[str, LoadFootprint]) -> list[list[str]]:
    """Table rows (`FOOTPRINT_HEADER`) for one model size."""
    return [[size, name, f"{f.weights_mb:.0f}", f"{f.runtime_mb:.0f}", f"{f.after_load.rss:.0f}",
             f"{f.rss_over_weights:.2f}", f"{f.after_load.peak:.0f}", f"{f.generate_growth_mb:.0f}", f"{f.load_s:.1f}"]
            for name, f in footprints.items()]


FOOTPRINT_HEADER = ["size", "engine", "weights MB", "runtime MB", "RSS after load MB", "x weights", "load peak MB",
                    "generate growth MB", "load s"]
FOOTPRINT_NOTE = ("whole-process RSS after gpt2.load in a fresh process; runtime: its RSS after `import torch, gpt2`, "
                  "before the load; x weights: (RSS - runtime) / the weights in the chosen format; load peak: the "
                  "process's peak RSS by the end of the load; generate growth: the peak during a generate after it, "
                  "above the RSS before it (KV cache, activations)")


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
    model = load(args.model, dtype=dtype, quantize=args.quantize, packed_prefill=args.packed_prefill,
                 kv_dtype=DTYPES[args.kv_dtype] if args.kv_dtype else None)
    load_s = time.perf_counter() - start
    after_load = process_memory()
    tensors = tensor_breakdown(model)
    pages = mapped_file_mb(_weights_file(Path(args.model)))
    trim_allocator()
    before_generate = process_memory()
    kept = after_load.rss - before_generate.rss  # freed memory glibc held resident: what trimming hands back
    other = after_load.rss - runtime - sum(tensors.values()) - pages - kept
    reset_peak()
    prompts = [[(17 * row + 31 * i) % model.config.vocab_size for i in range(args.prompt_len)]
               for row in range(args.batch)]
    model.generate(prompts, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    after_generate = process_memory()
    return LoadFootprint(runtime, weights_mb(model.config, dtype, args.quantize), load_s, after_load, tensors, pages,
                         kept, other, after_generate, after_generate.peak - before_generate.rss)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpt2.memory", description="Load a model in this fresh process and "
                                "print what it costs in memory, as one line of JSON (see `load_footprint`).")
    p.add_argument("model")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--quantize", choices=["int8"])
    p.add_argument("--packed-prefill", action="store_true")
    p.add_argument("--kv-dtype", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    print(json.dumps(asdict(_measure(p.parse_args(argv)))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
