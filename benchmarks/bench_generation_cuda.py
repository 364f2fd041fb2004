"""End-to-end greedy generation on a CUDA GPU: this engine (Triton kernels, decode step replayed from a CUDA
graph) against transformers (eager, sdpa, optionally static cache + torch.compile), in fp16, bf16 and fp32, on
the DialoGPT-small and -medium shapes with seeded random weights.

Every engine gets the same prompts and generates exactly --new-tokens tokens per row (end of text suppressed).
Reported per engine: prefill ms, decode ms per step, tokens/s, peak GPU memory growth during one generate
from an empty decode-graph pool (so it includes the KV cache and graph a pool keeps between calls; not so for
transformers + torch.compile, whose static cache and graphs, made while compiling, stay allocated outside it),
agreement of the greedy ids with transformers sdpa in the same dtype, and the relative RMS error of its logits
against transformers fp32. The batch-1 decode step is also given as a multiple of the weight-streaming bound:
one fp16 GEMV over the weights a decode step reads, timed with CUDA events in the same run. The one-time cost
of capturing this engine's decode graph is measured separately.

    python -m benchmarks.bench_generation_cuda                           # a CUDA GPU, about 2 minutes
    python -m benchmarks.bench_generation_cuda --smoke --out /tmp/smoke  # CPU, tiny config, seconds: what CI runs

Writes generation-cuda-<device>.json and .md to --out.

--fused compares this engine's decode step with the fused decode step (`gpt2.cuda.fused_decode`, GPT2_FUSED_DECODE=1)
instead, without transformers: per size, dtype (--fused-dtypes) and batch, each step's device time over CUDA-graph
replays and its decode ms per step in generate, both as multiples of the weight-streaming bound measured in the same
run, the kernels each step launches (an eager step under the CUDA profiler), the fused step's logits against the
unfused step's and the fp32 model's, and the greedy agreement of the two over a generate. Writes
generation-cuda-fused-<device>.json and .md. With --smoke it runs on the CPU under the Triton interpreter (tiny config,
fp32, wall-clock times: meaningless, but the code path runs).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.bench_generation import compile_cost_lines, compile_cost_s, compiled_transformers_engine, logit_error
from benchmarks.host import peak_rss_growth_mb
from benchmarks.reference import reference_pair, transformers_engine
from gpt2 import GPT2
from gpt2.bench import (SIZES, CudaBoundProbe, Engine, agreement, cuda_ms, format_table, measure, random_model,
                        random_prompts, this_engine)
from gpt2.config import GPT2Config
from gpt2.cuda.decode_graph import StaticDecodeStep
from gpt2.cuda.fused_decode import FUSED_DECODE_ENV, unsupported
from gpt2.dispatch import graph_pool
from gpt2.decoding import prefill

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
EXACT = "transformers sdpa fp32"  # whose logits every engine's error is measured against


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", choices=sorted(SIZES) + ["large"], default=["small", "medium"],
                   help="large: with --fused only")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per engine, interleaved; medians reported")
    p.add_argument("--compile", nargs="*", type=int, metavar="BATCH",
                   help="add transformers static cache + torch.compile (fp16, mode reduce-overhead: CUDA graphs) for "
                        "these batch sizes, all when none given; it compiles once per batch size")
    p.add_argument("--fused", action="store_true",
                   help="compare the decode step with the fused one instead (see the module docstring)")
    p.add_argument("--fused-dtypes", nargs="+", choices=list(DTYPES), default=["fp16"], help="with --fused")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny config, fp32 only, 3 tokens, one repeat (CI)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    if args.smoke:
        args.sizes, args.batch, args.prompt_len, args.new_tokens, args.repeats = ["tiny"], [1, 2], 8, 3, 1
        args.compile, args.fused_dtypes = None, ["fp32"]
    return args


# --- engines ---------------------------------------------------------------------------------------------------

@contextmanager
def environment(name: str, value: str) -> Iterator[None]:
    """os.environ[name] = value inside the block, as it was after."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def with_environment(engine: Engine, name: str, value: str, suffix: str) -> Engine:
    """engine generating with os.environ[name] = value, named engine's name + suffix."""

    def generate(prompts: list[list[int]], n: int) -> list[list[int]]:
        with environment(name, value):
            return engine.generate(prompts, n)

    return Engine(engine.name + suffix, generate, engine.logits)


def without_graphs(engine: Engine) -> Engine:
    """engine with the CUDA-graph decode turned off (GPT2_CUDA_GRAPHS=0 while it generates)."""
    return with_environment(engine, "GPT2_CUDA_GRAPHS", "0", ", no graph")


def with_hf_logits(engine: Engine, hf_model: torch.nn.Module) -> Engine:
    def logits(prompts: list[list[int]]) -> torch.Tensor:
        with torch.inference_mode():
            return hf_model(torch.tensor(prompts, device=hf_model.device)).logits.float()  # (B, T, V)

    return Engine(engine.name, engine.generate, logits)


@dataclass
class Engines:
    engines: list[Engine]
    ours: list[GPT2]  # this engine's models, whose decode-graph pools keep caches between calls
    ours_fp16: GPT2 | None  # the models behind "this engine fp16" and "transformers sdpa fp16" (None in --smoke)
    transformers_fp16: torch.nn.Module | None


def build_engines(hf_model: torch.nn.Module, model: GPT2, device: str, smoke: bool) -> Engines:
    """This engine and transformers in each dtype (fp32 only for the CPU smoke run)."""
    engines, models, ours_fp16, hf_fp16 = [], [], None, None
    for name in ["fp32"] if smoke else ["fp16", "bf16", "fp32"]:
        dtype = DTYPES[name]
        ours = copy.deepcopy(model).to(device, dtype)
        models.append(ours)
        engines.append(this_engine(ours, f"this engine {name}"))
        hf = copy.deepcopy(hf_model).to(device, dtype)
        if name == "fp16":
            engines.append(without_graphs(engines[-1]))
            torch_path = copy.deepcopy(ours)
            torch_path.set_backend("torch")
            models.append(torch_path)
            engines.append(this_engine(torch_path, "this engine fp16, torch backend"))
            ours_fp16, hf_fp16 = ours, hf
        attns = ["eager", "sdpa"] if name == "fp16" else ["sdpa"]
        engines += [with_hf_logits(transformers_engine(hf, attn, f"transformers {attn} {name}"), hf)
                    for attn in attns]
    return Engines(engines, models, ours_fp16, hf_fp16)


# --- measurements ------------------------------------------------------------------------------------------------

def graph_capture_ms(model: GPT2, prompt: list[int]) -> dict:
    """The first call of a CUDA-graph decode step (warm-up runs + capture + replay) against a later replay."""
    cache = model.new_cache(1, len(prompt) + 64)
    with torch.inference_mode():
        prefill(model, cache, [prompt])
        step = StaticDecodeStep(model, cache, use_graph=True)
        token = torch.tensor([1], device=model.device)
        start = time.perf_counter()
        step(token)
        torch.cuda.synchronize()
        first = (time.perf_counter() - start) * 1e3
        replays = []
        for _ in range(20):
            start = time.perf_counter()
            step(token)
            torch.cuda.synchronize()
            replays.append((time.perf_counter() - start) * 1e3)
    return {"first_call_ms": first, "replay_ms": statistics.median(replays)}


def peak_memory_mb(fn: Callable[[], object], device: str) -> float:
    """Peak memory above the level before fn: the CUDA allocator's on a GPU, resident memory on the CPU."""
    if device != "cuda":
        return peak_rss_growth_mb(fn)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def reference_name(engine: str) -> str:
    """The engine whose greedy ids engine's are compared with: transformers sdpa in the same dtype."""
    dtype = next((d for d in DTYPES if engine.split(",")[0].endswith(d)), "fp32")
    return f"transformers sdpa {dtype}"


def run_size(size: str, args: argparse.Namespace, device: str) -> dict:
    config = SIZES[size]
    hf_model, model = reference_pair(config)
    built = build_engines(hf_model, model, device, args.smoke)
    engines = built.engines
    del hf_model, model
    by_name = {e.name: e for e in engines}
    result: dict = {"config": {"n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head}}
    error_prompts = random_prompts(4, args.prompt_len, config.vocab_size, seed=1)
    exact = by_name[EXACT].logits(error_prompts)
    result["logit_error"] = {e.name: logit_error(exact, e.logits(error_prompts)) for e in engines
                             if e.logits is not None and e.name != EXACT and "no graph" not in e.name}
    if device == "cuda":
        bound = CudaBoundProbe(config).result()
        result["bound"] = {"gemv_ms": bound.gemv_ms, "n_bytes": bound.n_bytes,
                           "gb_per_s": bound.n_bytes / (bound.gemv_ms * 1e-3) / 1e9}
        result["graph_capture"] = graph_capture_ms(built.ours_fp16, error_prompts[0])
    result["runs"] = []
    for batch in args.batch:
        prompts = random_prompts(batch, args.prompt_len, config.vocab_size)
        batch_engines = list(engines)
        compile_s = None
        if args.compile is not None and (not args.compile or batch in args.compile):
            compiled = compiled_transformers_engine(built.transformers_fp16, batch, args.prompt_len + args.new_tokens,
                                                    mode="reduce-overhead")
            compiled.name = "transformers static+compile fp16"
            try:
                compile_s = compile_cost_s(compiled, prompts, args.new_tokens)
                batch_engines.append(compiled)
            except Exception as e:  # noqa: BLE001 - an optional engine that cannot run is reported, not fatal
                result.setdefault("notes", []).append(f"transformers static+compile skipped ({size}, batch {batch}): "
                                                      f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        outputs = {e.name: e.generate(prompts, args.new_tokens) for e in batch_engines}  # warm-up; compared ids
        timings = measure(batch_engines, prompts, args.new_tokens, args.repeats)
        run: dict = {"batch": batch, "engines": {}}
        for e in batch_engines:
            t = timings[e.name]
            ref = reference_name(e.name)
            for model in built.ours:  # so a call's peak includes the KV cache and graph a pool would keep
                graph_pool(model).clear()
            run["engines"][e.name] = {
                "prefill_ms": t.prefill_ms, "decode_ms": t.decode_ms, "tokens_per_s": t.tokens_per_s,
                "peak_memory_mb": peak_memory_mb(lambda e=e: e.generate(prompts, args.new_tokens), device),
                "agreement": agreement(outputs[e.name], outputs[ref]), "agreement_with": ref,
                "samples_s": {"one_token": t.one, "all_tokens": t.full}}
        if compile_s is not None:
            run["engines"]["transformers static+compile fp16"]["compile_s"] = compile_s
        result["runs"].append(run)
        print(f"{size} batch {batch}: done", file=sys.stderr, flush=True)
    return result


# --- the fused decode step (--fused) -----------------------------------------------------------------------------

# With "tiny" (--smoke) at a 512-token vocabulary: the interpreter runs the lm_head's programs one by one.
FUSED_SIZES = {**SIZES, "tiny": dataclasses.replace(SIZES["tiny"], vocab_size=512),
               "large": GPT2Config.from_preset("dialogpt-large")}
STEPS = {"unfused": "0", "fused": "1"}  # GPT2_FUSED_DECODE for each


def kernels_per_step(step: StaticDecodeStep, tokens: torch.Tensor) -> int:
    """Kernels one eager run of step launches on the GPU (its input copies included), counted by the CUDA profiler."""
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        step(tokens)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and not e.name.startswith(("Memcpy", "Memset")))


def measure_step(model: GPT2, prompts: list[list[int]], device: str, fused: bool) -> dict:
    """One decode step after prefilling prompts, unfused or fused: its logits, its time per step (on CUDA the median
    of CUDA-graph replays by CUDA events, else the wall clock of an eager step) and, on CUDA, its kernel count."""
    batch = len(prompts)
    tokens = torch.arange(batch, device=device) + 1
    with environment(FUSED_DECODE_ENV, STEPS["fused" if fused else "unfused"]), torch.inference_mode():
        cache = model.new_cache(batch, len(prompts[0]) + 16)
        prefill(model, cache, prompts)
        step = StaticDecodeStep(model, cache, use_graph=device == "cuda")
        if (step.fused is not None) != fused:
            raise RuntimeError(f"the fused step does not run here: {unsupported(model, cache)}")
        result: dict = {"logits": step(tokens).float()}  # on CUDA: warm-up, capture, replay
        if device == "cuda":
            result["step_ms"] = cuda_ms(step.graph.replay, repeats=200)  # rewrites the same slots: harmless
            eager = StaticDecodeStep(model, cache, use_graph=False)
            result["kernels"] = kernels_per_step(eager, tokens)
        else:  # the interpreter (--smoke): one more step
            start = time.perf_counter()
            step(tokens)
            result["step_ms"] = (time.perf_counter() - start) * 1e3
    return result


def step_engine(model: GPT2, name: str, fused: str) -> Engine:
    """model generating with GPT2_FUSED_DECODE=fused, exactly n tokens per row (no end of text: any vocabulary)."""

    def generate(prompts: list[list[int]], n: int) -> list[list[int]]:
        with environment(FUSED_DECODE_ENV, fused):
            return model.generate(prompts, max_new_tokens=n, eos_token_id=None)

    return Engine(name, generate)


def run_fused_size(size: str, args: argparse.Namespace, device: str) -> dict:
    config = FUSED_SIZES[size]
    base = random_model(config)

    def copy_in(dtype: torch.dtype) -> GPT2:
        model = copy.deepcopy(base).to(device, dtype)  # copied before its backend is chosen: that holds a module
        if args.smoke:
            model.set_backend("triton")  # the CPU's default is torch; TRITON_INTERPRET=1 is set (main)
        return model

    fp32 = copy_in(torch.float32)
    result: dict = {"config": {"n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head},
                    "runs": []}
    if device == "cuda":
        bound = CudaBoundProbe(config).result()
        result["bound"] = {"gemv_ms": bound.gemv_ms, "n_bytes": bound.n_bytes,
                           "gb_per_s": bound.n_bytes / (bound.gemv_ms * 1e-3) / 1e9}
    for dtype_name in args.fused_dtypes:
        # A model for each step: a model's graph pool is emptied whenever GPT2_FUSED_DECODE changes between calls.
        models = {name: copy_in(DTYPES[dtype_name]) for name in STEPS}
        engines = [step_engine(models[name], f"{dtype_name} {name}", value) for name, value in STEPS.items()]
        for batch in args.batch:
            prompts = random_prompts(batch, args.prompt_len, config.vocab_size)
            steps = {name: measure_step(models[name], prompts, device, fused=name == "fused") for name in STEPS}
            exact = (steps["unfused"] if dtype_name == "fp32" else measure_step(fp32, prompts, device, False))["logits"]
            outputs = {e.name: e.generate(prompts, args.new_tokens) for e in engines}  # warm-up; compared ids
            timings = measure(engines, prompts, args.new_tokens, args.repeats)
            run: dict = {"dtype": dtype_name, "batch": batch, "steps": {}}
            for (name, step), engine in zip(steps.items(), engines):
                run["steps"][name] = {
                    "step_ms": step["step_ms"], "kernels": step.get("kernels"),
                    "decode_ms": timings[engine.name].decode_ms,
                    "logit_error": logit_error(exact, step["logits"]),
                    "max_abs_vs_unfused": (step["logits"] - steps["unfused"]["logits"]).abs().max().item(),
                    "agreement_with_unfused": agreement(outputs[engine.name], outputs[engines[0].name])}
            result["runs"].append(run)
            print(f"{size} {dtype_name} batch {batch}: done", file=sys.stderr, flush=True)
        del models, engines  # with their pooled caches and graphs
    return result


def fused_table(results: dict) -> str:
    header = ["size", "dtype", "batch", "step", "kernels", "replay ms", "x bound", "decode ms/step", "x bound",
              "logit rel RMS vs fp32", "max |diff| vs unfused", "agreement with unfused"]
    rows = []
    for size, res in results["sizes"].items():
        bound = res.get("bound", {}).get("gemv_ms")
        for run in res["runs"]:
            for name, st in run["steps"].items():
                rows.append([size, run["dtype"], run["batch"], name, st["kernels"] or "", f"{st['step_ms']:.3f}",
                             f"{st['step_ms'] / bound:.2f}" if bound else "", f"{st['decode_ms']:.3f}",
                             f"{st['decode_ms'] / bound:.2f}" if bound else "",
                             f"{st['logit_error']['rel_rms']:.1e}", f"{st['max_abs_vs_unfused']:.1e}",
                             f"{st['agreement_with_unfused']:.2f}"])
    return format_table(header, rows)


def fused_summary_lines(results: dict, args: argparse.Namespace) -> list[str]:
    lines = [f"prompt {args.prompt_len} tokens; replay ms: median device time of one decode step replayed from its "
             "CUDA graph (CUDA events, 200 replays); decode ms/step: generate's, host work included, median of "
             f"{args.repeats} repeats of {args.new_tokens} new greedy tokens; kernels: launched by one eager step "
             "(CUDA profiler, input copies included)",
             "logit rel RMS vs fp32: the step's logits against the fp32 model's unfused step on the same inputs; "
             "agreement with unfused: share of generated tokens matching the unfused step's before a row's first "
             "divergence; seeded random weights (GPT-2's initialisation) of the DialoGPT shapes"]
    for size, res in results["sizes"].items():
        if "bound" in res:
            lines.append(bound_line(size, res["bound"], "the time over it"))
    return lines


def bound_line(size: str, bound: dict, ratio: str) -> str:
    """The weight-streaming bound of size, and what its "x bound" column divides by it."""
    return (f"{size}: weight-streaming bound {bound['gemv_ms'] * 1e3:.0f} us = one fp16 GEMV over "
            f"{bound['n_bytes'] / 1e6:.0f} MB ({bound['gb_per_s']:.0f} GB/s); x bound: {ratio}")


# --- report ------------------------------------------------------------------------------------------------------

def table(results: dict) -> str:
    header = ["size", "batch", "engine", "prefill ms", "decode ms/step", "tokens/s", "x bound", "peak MB",
              "agreement", "logit error"]
    rows = []
    for size, res in results["sizes"].items():
        bound = res.get("bound", {}).get("gemv_ms")
        for run in res["runs"]:
            for name, e in run["engines"].items():
                ratio = f"{e['decode_ms'] / bound:.1f}" if bound and run["batch"] == 1 else ""
                err = res["logit_error"].get(name.removesuffix(", no graph"), {}).get("rel_rms")
                rows.append([size, run["batch"], name, f"{e['prefill_ms']:.2f}", f"{e['decode_ms']:.3f}",
                             f"{e['tokens_per_s']:.0f}", ratio, f"{e['peak_memory_mb']:.0f}", f"{e['agreement']:.2f}",
                             "reference" if name == EXACT else f"{err:.1e}" if err is not None else ""])
    return format_table(header, rows)


def summary_lines(results: dict, args: argparse.Namespace) -> list[str]:
    lines = [f"prompt {args.prompt_len} tokens, {args.new_tokens} new greedy tokens, median of {args.repeats} "
             "interleaved repeats; seeded random weights of the DialoGPT shapes",
             "agreement: share of generated tokens matching transformers sdpa in the same dtype before a row's first "
             f"divergence; logit error: relative RMS of the logits against {EXACT} over 4 prompts",
             "peak MB: memory growth during one generate (GPU; resident memory in --smoke), from an empty "
             "decode-graph pool for this engine; "
             "transformers static+compile keeps its static cache and CUDA graphs from compiling, not counted"]
    for size, res in results["sizes"].items():
        if "bound" in res:
            lines.append(bound_line(size, res["bound"], "batch-1 decode step / it"))
        if "graph_capture" in res:
            g = res["graph_capture"]
            lines.append(f"{size}: this engine fp16 decode graph: first call (warm-up + capture + replay) "
                         f"{g['first_call_ms']:.1f} ms, later calls {g['replay_ms']:.3f} ms (batch 1)")
        lines += compile_cost_lines(size, res["runs"], "transformers static+compile fp16")
        lines += res.get("notes", [])
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("bench_generation_cuda: no CUDA GPU found (use --smoke for the CPU check, or "
              "benchmarks/bench_generation.py for the CPU benchmark)", file=sys.stderr)
        return 2
    if args.smoke and args.fused:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the Triton backend first imports the kernels
    device = "cpu" if args.smoke else "cuda"
    device_name = "cpu-smoke" if args.smoke else torch.cuda.get_device_name()
    results: dict = {"device": device_name, "torch": torch.__version__, "sizes": {}}
    try:
        import transformers
        import triton

        results["transformers"], results["triton"] = transformers.__version__, triton.__version__
    except ImportError as e:
        print(f"bench_generation_cuda needs transformers and triton: {e}", file=sys.stderr)
        return 2
    for size in args.sizes:
        results["sizes"][size] = (run_fused_size if args.fused else run_size)(size, args, device)
    lines = (fused_summary_lines if args.fused else summary_lines)(results, args)
    report = (fused_table if args.fused else table)(results)
    slug = ("fused-" if args.fused else "") + re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"generation-cuda-{slug}.json").write_text(json.dumps(results, indent=1))
    command = " ".join(["python -m benchmarks.bench_generation_cuda", *(argv if argv is not None else sys.argv[1:])])
    title = "Fused decode step benchmark" if args.fused else "Generation benchmark"
    (args.out / f"generation-cuda-{slug}.md").write_text("\n".join([
        f"# {title} on {device_name}", "",
        f"torch {results['torch']}, triton {results['triton']}, transformers {results['transformers']}. "
        f"Command: `{command}`.", "",
        report, "", *[f"- {line}" for line in lines], ""]))
    print(report)
    print()
    print("\n".join(lines))
    print(f"wrote generation-cuda-{slug}.json and .md to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
