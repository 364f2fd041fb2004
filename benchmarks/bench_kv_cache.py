"""The KV cache's dtype on the CPU: decode step time, memory and logit error of an fp32, bf16 or fp16 cache
(`gpt2.load(..., kv_dtype=...)`) under fp32 and int8 models.

For the DialoGPT-small and -medium shapes (seeded random weights), fp32 and int8 models, batch 1 and 8, prompts of 32
and 768 tokens: each cache dtype's cache is prefilled with the same prompts, then the same --steps decode steps (seeded
random tokens) are timed one by one, the cache dtypes taking turns within each of --repeats repeats (each waiting for
a quiet machine), every repeat starting again from the prompt. Reported: the median ms per step over every step of
every repeat, and each lower-precision cache's step over the fp32 cache's within each repeat; the decode step that ran
(the C step, or the forward's torch ops where the C step does not take the cache); the cache's memory for 16 rows of
1024 positions, computed from the shape; and the error the cache dtype puts into the decode steps' logits against the
fp32 cache's (relative RMS, max |diff|, top-1 agreement). The weights are random, so the errors are random weights'.

    python -m benchmarks.bench_kv_cache                       # the full run (writes benchmarks/results/kv-cache-*)
    python -m benchmarks.bench_kv_cache --smoke --out /tmp/smoke   # seconds: what the tests run
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.bench_generation import machine
from benchmarks.host import cpu_times, other_cores, steal_seconds, wait_for_quiet
from gpt2 import GPT2, GPT2Config
from gpt2.bench import SIZES, format_table, random_model, random_prompts
from gpt2.cpu import build
from gpt2.cpu.decode_step import CpuDecodeStep
from gpt2.cpu.int8_linear import quantize_int8
from gpt2.decoding import prefill
from gpt2.dispatch import decode_step_for

CACHE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MEMORY_ROWS, MEMORY_POSITIONS = 16, 1024  # the cache whose memory is reported: the C step's most rows, GPT-2's length


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["small", "medium"])
    p.add_argument("--models", nargs="+", choices=["fp32", "int8"], default=["fp32", "int8"])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--prompt-len", nargs="+", type=int, default=[32, 768])
    p.add_argument("--cache-dtypes", nargs="+", choices=list(CACHE_DTYPES), default=list(CACHE_DTYPES))
    p.add_argument("--steps", type=int, default=16, help="decode steps timed in each repeat")
    p.add_argument("--repeats", type=int, default=5, help="repeats, the cache dtypes interleaved; medians reported")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="tiny model, short prompts, 3 steps, one repeat (the tests)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results",
                   help="directory for kv-cache-<machine>.json and .md")
    args = p.parse_args(argv)
    if args.smoke:
        args.sizes, args.batch, args.prompt_len, args.steps, args.repeats = ["tiny"], [1, 2], [8, 24], 3, 1
    if "fp32" not in args.cache_dtypes:
        p.error("--cache-dtypes must include fp32: the others' errors and speed-ups are taken against it")
    if args.steps < 1 or args.repeats < 1:
        p.error("--steps and --repeats must be at least 1")
    return args


def cache_mb(config: GPT2Config, dtype: torch.dtype) -> float:
    """Keys and values of every layer for MEMORY_ROWS rows of MEMORY_POSITIONS positions, in MB (2^20 bytes)."""
    return 2 * config.n_layer * MEMORY_ROWS * MEMORY_POSITIONS * config.n_embd * dtype.itemsize / 2**20


def machine_slug(m: dict) -> str:
    """The results' file name part for this machine: its CPU's model name and the kernels' instruction set."""
    name = re.sub(r"\((R|TM)\)|\bProcessor\b|\bCPU\b", "", m["cpu"].split(" (cpu")[0])  # "Intel Xeon"
    isa = (build.instruction_set() or "no-kernels").replace("-", "")  # "avx512", as the other results name it
    return re.sub(r"[^a-z0-9]+", "-", f"cpu {name} {isa}".lower()).strip("-")


def logit_error(logits: torch.Tensor, exact: torch.Tensor) -> dict[str, float]:
    """logits (steps, B, V) against the fp32 cache's: relative RMS, max |diff|, share of (step, row) argmaxes alike."""
    diff = logits.float() - exact
    return {"rel_rms": (diff.norm() / exact.norm()).item(), "max_abs_diff": diff.abs().max().item(),
            "top1_agreement": (logits.argmax(-1) == exact.argmax(-1)).float().mean().item()}


def run_case(model: GPT2, batch: int, prompt_len: int, args: argparse.Namespace,
             exact: torch.Tensor | None) -> tuple[dict, torch.Tensor]:
    """Every cache dtype's decode steps past the same prompts, interleaved over the repeats (see the docstring);
    exact: the fp32 model's logits over its fp32 cache for the same steps, where it ran, to take each cache's error
    against. Returns the results and the fp32 cache's logits (steps, B, V)."""
    config = model.config
    prompts = random_prompts(batch, prompt_len, config.vocab_size)
    generator = torch.Generator().manual_seed(1)
    tokens = [torch.randint(0, config.vocab_size - 1, (batch,), generator=generator) for _ in range(args.steps)]
    caches, steps, logits = {}, {}, {}
    with torch.inference_mode():
        for name in args.cache_dtypes:
            model.kv_dtype = CACHE_DTYPES[name]
            caches[name] = model.new_cache(batch, prompt_len + args.steps)
            prefill(model, caches[name], prompts)
            steps[name] = decode_step_for(model, caches[name])
            caches[name].lengths = [prompt_len] * batch
            logits[name] = torch.stack([steps[name](t) for t in tokens])  # the logits, and a warm-up
        samples: dict[str, list[list[float]]] = {name: [] for name in args.cache_dtypes}
        for _ in range(args.repeats):
            for name in args.cache_dtypes:
                if not args.smoke:
                    wait_for_quiet()
                caches[name].lengths = [prompt_len] * batch  # the same steps again, over the same prompt
                times = []
                for t in tokens:
                    start = time.perf_counter()
                    steps[name](t)
                    times.append((time.perf_counter() - start) * 1e3)
                samples[name].append(times)
    model.kv_dtype = None
    medians = {name: [statistics.median(repeat) for repeat in s] for name, s in samples.items()}
    reference = logits["fp32"].float()
    return {"batch": batch, "prompt_len": prompt_len, "caches": {name: {
        "step": "C step" if isinstance(steps[name], CpuDecodeStep) else "forward",
        "step_ms": statistics.median(ms for repeat in samples[name] for ms in repeat),
        "step_ms_by_repeat": medians[name],
        "over_fp32_by_repeat": [a / b for a, b in zip(medians[name], medians["fp32"])],
        "step_ms_samples": samples[name],
        "error_vs_fp32_cache": None if name == "fp32" else logit_error(logits[name], reference),
        "error_vs_fp32_model": None if exact is None else logit_error(logits[name], exact)}
        for name in args.cache_dtypes}}, reference


def run_size(size: str, args: argparse.Namespace) -> dict:
    config = SIZES[size]
    fp32 = random_model(config)
    result: dict = {"config": vars(config), "cache_mb": {name: cache_mb(config, CACHE_DTYPES[name])
                                                         for name in args.cache_dtypes}, "models": {}}
    exact: dict[tuple[int, int], torch.Tensor] = {}  # the fp32 model's logits over its fp32 cache, by case
    for kind in args.models:
        if kind == "int8" and not build.int8_available():
            result["models"][kind] = {"skipped": "no int8 C step here (needs AVX-512 VNNI and the C kernels)"}
            continue
        model = fp32 if kind == "fp32" else quantize_int8(copy.deepcopy(fp32))
        runs = []
        for batch in args.batch:
            for prompt_len in args.prompt_len:
                run, fp32_cache_logits = run_case(model, batch, prompt_len, args,
                                                  None if kind == "fp32" else exact.get((batch, prompt_len)))
                runs.append(run)
                if kind == "fp32":
                    exact[batch, prompt_len] = fp32_cache_logits
                gc.collect()  # this case's caches, before the next one's
                print(f"{size} {kind} batch {batch} prompt {prompt_len}: "
                      + ", ".join(f"{name} {c['step_ms']:.2f} ms ({c['step']})" for name, c in runs[-1]["caches"].items()),
                      flush=True)
        result["models"][kind] = {"runs": runs}
        del model
    return result


def time_table(results: dict) -> str:
    names = results["cache_dtypes"]
    rows = []
    for size, res in results["sizes"].items():
        for kind, models in res["models"].items():
            for run in models.get("runs", []):
                caches = run["caches"]
                rows.append([size, kind, run["batch"], run["prompt_len"],
                             *[f"{caches[n]['step_ms']:.2f}" + ("" if caches[n]["step"] == "C step" else " (forward)")
                               for n in names],
                             *[f"{statistics.median(caches[n]['over_fp32_by_repeat']):.2f}" for n in names[1:]]])
    return format_table(["size", "model", "batch", "prompt", *[f"{n} cache ms/step" for n in names],
                         *[f"{n} / fp32" for n in names[1:]]], rows)


def error_table(results: dict) -> str:
    def cells(error: dict | None) -> list[str]:
        if error is None:
            return ["-"] * 3
        return [f"{error['rel_rms']:.2e}", f"{error['max_abs_diff']:.2e}", f"{error['top1_agreement']:.3f}"]

    rows = []
    for size, res in results["sizes"].items():
        for kind, models in res["models"].items():
            for run in models.get("runs", []):
                for name, c in run["caches"].items():
                    if c["error_vs_fp32_cache"] is not None or c["error_vs_fp32_model"] is not None:
                        rows.append([size, kind, run["batch"], run["prompt_len"], name,
                                     *cells(c["error_vs_fp32_cache"]), *cells(c["error_vs_fp32_model"])])
    return format_table(["size", "model", "batch", "prompt", "cache", "rel. RMS vs fp32 cache", "max |diff|",
                         "top-1 agreement", "rel. RMS vs fp32 model", "max |diff|", "top-1 agreement"], rows)


def memory_table(results: dict) -> str:
    names = results["cache_dtypes"]
    return format_table(["size", *[f"{n} cache MB" for n in names]],
                        [[size, *[f"{res['cache_mb'][n]:.0f}" for n in names]]
                         for size, res in results["sizes"].items()])


def markdown(results: dict) -> str:
    m = results["machine"]
    skipped = [f"{size} {kind}: {models['skipped']}" for size, res in results["sizes"].items()
               for kind, models in res["models"].items() if "skipped" in models]
    return "\n".join([
        "# KV cache dtype benchmark: decode step, memory and logit error of fp32, bf16 and fp16 caches", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, CPU capability {m['cpu_capability']}; torch {m['torch']}; "
        f"Python {m['python']}; {results['threads']} threads. This engine's {m['cpu_kernels']}.",
        f"Other processes used {results['other_processes_cores']:.2f} cores on average during the run, other guests "
        f"of the host (steal time) {results['steal_cores']:.2f}.", "",
        f"Command: `{results['command']}`; every sample: the .json beside this file. Seeded random weights of the "
        f"DialoGPT shapes; {results['steps']} decode steps of seeded random tokens past each prompt, timed one by one, "
        f"the cache dtypes interleaved in each of {results['repeats']} repeats.", "",
        "## Decode step", "", time_table(results), "",
        "ms/step: the median over every step of every repeat; (forward): the model's forward ran the step, not the C "
        "step. x / fp32: that cache's step over the fp32 cache's, median of the repeats' ratios (each repeat's "
        "median step).", "",
        f"## Cache memory ({MEMORY_ROWS} rows x {MEMORY_POSITIONS} positions, computed)", "", memory_table(results),
        "", "## Logit error of the cache dtype", "", error_table(results), "",
        "The decode steps' logits against the same steps (same prompts and tokens) over the same model's fp32 cache "
        "(vs fp32 cache: what the cache's dtype alone does) and, for int8 models, over the fp32 model's fp32 cache "
        "(vs fp32 model: the whole error): relative RMS of the difference, its largest magnitude, and the share of "
        "(step, row) whose argmax is the reference's. An int8 model quantizes each matmul's input afresh, so the "
        "cache's small rounding re-draws some of those roundings: its error against its own fp32 cache is of the "
        "int8 error's order, and the whole error is what to compare. Random weights: their logits are nearly flat, "
        "so top-1 agreement is a harsher test than on a trained model, and the errors are random weights', not a "
        "real checkpoint's.",
        *([""] + [f"- skipped: {line}" for line in skipped] if skipped else []), ""])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    start, steal_start = cpu_times(), steal_seconds()
    command = shlex.join(["python", "-m", "benchmarks.bench_kv_cache", *(sys.argv[1:] if argv is None else argv)])
    results: dict = {"machine": machine(), "command": command, "threads": args.threads, "steps": args.steps,
                     "repeats": args.repeats, "cache_dtypes": args.cache_dtypes, "sizes": {}}
    for size in args.sizes:
        results["sizes"][size] = run_size(size, args)
    results["other_processes_cores"] = other_cores(start)
    results["steal_cores"] = (steal_seconds() - steal_start) / max(cpu_times()[2] - start[2], 1e-9)
    stem = "kv-cache-" + machine_slug(results["machine"])
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    (args.out / f"{stem}.md").write_text(markdown(results))
    print(time_table(results), error_table(results), memory_table(results), sep="\n\n")
    print(f"wrote {stem}.json and {stem}.md to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
