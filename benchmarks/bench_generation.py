"""End-to-end greedy generation: this engine (fp32, int8, packed bf16) against transformers (eager,
sdpa, static cache + torch.compile) and CTranslate2 (fp32, int8, each in a worker process), on the
DialoGPT-small and -medium shapes with seeded random weights.

Every engine gets the same prompts and generates exactly --new-tokens tokens per row (end of text
suppressed). Reported per engine: prefill ms, decode ms per step, tokens/s, peak memory growth, agreement
of the generated ids with transformers eager, and the batch-1 decode step as a multiple of the machine's
weight-streaming bound measured in the same run; per engine and size, what its load costs in memory, each in a
fresh process (this engine's modes: `gpt2.memory`, with a breakdown; transformers: `benchmarks.footprints`;
CTranslate2: its worker). Writes tables to stdout and JSON + PNG to --out.
Engines that are not installed, or fail to set up, are skipped with the reason in the output.

    python -m benchmarks.bench_generation                 # full run (about 17 minutes on 2 cores)
    python -m benchmarks.bench_generation --smoke --out /tmp/smoke   # seconds: what CI runs
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks.ctranslate2_engine import ctranslate2_engines
from benchmarks.footprints import transformers_footprint
from benchmarks.host import cpu_times, other_cores, peak_rss_growth_mb, steal_seconds, wait_for_quiet
from benchmarks.reference import reference_pair, transformers_engine
from gpt2 import GPT2, GPT2Config
from gpt2.bench import (BF16_SKIPPED, SIZES, BoundProbe, Engine, agreement, format_table, low_precision_engines,
                        measure, paired_prefill_ratios, random_prompts, this_engine)
from gpt2.cpu import build
from gpt2.cpu.bf16_linear import bf16_packing_available
from gpt2.memory import ENGINE_LOADS, FOOTPRINT_NOTE, engine_footprints, weights_mb

REFERENCE = "transformers eager"
BASELINE = "transformers sdpa"  # what the speed ratios are taken against


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["small", "medium"])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per engine, interleaved; medians reported")
    p.add_argument("--prefill-samples", type=int, default=3,
                   help="one-token generates per engine in each repeat: prefill medians over repeats x this")
    p.add_argument("--threads", type=int, default=2, help="torch and CTranslate2 intra-op threads")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip transformers + torch.compile")
    p.add_argument("--no-ctranslate2", dest="ctranslate2", action="store_false")
    p.add_argument("--packed-prefill", action="store_true",
                   help="also time int8 and bf16 loaded with packed_prefill=True (a second, packed copy of each weight)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny config, 3 tokens, one repeat, this engine + transformers sdpa only (CI)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results",
                   help="directory for generation.json and generation.png")
    args = p.parse_args(argv)
    if args.smoke:
        args.sizes, args.batch, args.prompt_len, args.new_tokens, args.repeats = ["tiny"], [1, 2], 8, 3, 1
        args.prefill_samples = 1
        args.compile = args.ctranslate2 = False
    return args


def machine() -> dict[str, object]:
    model_name, family = platform.processor(), {}
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            key, _, value = line.partition(":")
            if key == "Model name":
                model_name = value.strip()
            elif key in ("CPU family", "Model"):  # what a virtual machine's bare "AMD EPYC" leaves to tell
                family[key.lower()] = value.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    if family:
        model_name += " (" + ", ".join(f"{key} {value}" for key, value in family.items()) + ")"
    versions = {name: _version(name) for name in ("transformers", "ctranslate2")}
    return {"cpu": model_name, "cores": os.cpu_count(), "torch": torch.__version__, **versions,
            "python": platform.python_version(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_kernels": build.status()}


def _version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    return __import__(module).__version__


# --- engines -----------------------------------------------------------------------------------------

def compiled_transformers_engine(hf_model: torch.nn.Module, batch: int, max_len: int, mode: str = "default") -> Engine:
    """transformers generate with a reused StaticCache and its torch.compile'd decode step (CPU enabled);
    mode is torch.compile's ("reduce-overhead" adds CUDA graphs on a GPU)."""
    from transformers import CompileConfig, StaticCache

    compile_config = CompileConfig(mode=mode, fullgraph=False, dynamic=False)
    compile_config._compile_all_devices = True  # transformers compiles on CUDA only unless told
    hf_model.set_attn_implementation("sdpa")
    cache = StaticCache(config=hf_model.config, max_cache_len=max_len)  # one object: stable compile guards
    # transformers 5.17 takes the cache as `past_key_values`; later 5.x name it `cache` and deprecate the old name.
    cache_kwarg = "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"

    def generate(prompts: list[list[int]], n: int) -> list[list[int]]:
        hf_model.set_attn_implementation("sdpa")
        ids = torch.tensor(prompts, device=hf_model.device)
        with torch.inference_mode():
            cache.reset()
            out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                    do_sample=False, pad_token_id=hf_model.config.eos_token_id,
                                    compile_config=compile_config, **{cache_kwarg: cache})
        return out[:, ids.shape[1]:].tolist()

    return Engine("transformers static+compile", generate)


def compile_cost_s(engine: Engine, prompts: list[list[int]], n: int) -> float:
    """Seconds the first generate of a compiling engine takes beyond its second: the one-time compile cost."""
    start = time.perf_counter()
    engine.generate(prompts, n)  # compiles
    first = time.perf_counter() - start
    start = time.perf_counter()
    engine.generate(prompts, n)
    return first - (time.perf_counter() - start)


def compile_cost_lines(size: str, runs: list[dict], name: str) -> list[str]:
    """A line per batch size whose engine `name` reports a compile cost."""
    return [f"{size} batch {run['batch']}: torch.compile one-time cost {run['engines'][name]['compile_s']:.1f} s "
            "(not in the timings)" for run in runs if "compile_s" in run["engines"].get(name, {})]


# --- one model size ------------------------------------------------------------------------------------

def logit_error(exact: torch.Tensor, approx: torch.Tensor) -> dict:
    """A lower-precision engine's logits against the fp32 ones, both (B, T, V) over the same prompts."""
    diff = approx - exact
    return {"max_abs": diff.abs().max().item(), "rel_rms": (diff.norm() / exact.norm()).item(),
            "top1_agreement": (approx.argmax(-1) == exact.argmax(-1)).float().mean().item(),
            "logit_std": exact.std().item()}


def run_size(size: str, args: argparse.Namespace, bar: tqdm, notes: list[str]) -> dict:
    config: GPT2Config = SIZES[size]
    hf_model, model = reference_pair(config)
    result: dict = {"config": {"n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head}}
    low_precision = low_precision_engines(model, packed_prefill_too=args.packed_prefill)
    engines = [this_engine(model), transformers_engine(hf_model, "sdpa")]
    if not args.smoke:
        engines[1:1] = [*low_precision, transformers_engine(hf_model, "eager")]
    if args.ctranslate2:
        if importlib.util.find_spec("ctranslate2") is None:
            notes.append("ctranslate2 skipped: not installed (pip install ctranslate2)")
        else:
            workdir = Path(tempfile.mkdtemp(prefix="bench-ct2-"))
            try:
                engines += ctranslate2_engines(hf_model, workdir, args.threads)
            except Exception as e:  # noqa: BLE001 - an optional engine that cannot run is reported, not fatal
                notes.append(f"ctranslate2 skipped ({size}): {type(e).__name__}: {e}")
    prompts_for_error = random_prompts(max(args.batch), args.prompt_len, config.vocab_size, seed=1)
    exact = engines[0].logits(prompts_for_error)
    with_logits = {e.name: e for e in [*low_precision, *engines[1:]] if e.logits is not None}  # all but fp32's
    result["logit_error"] = {name: logit_error(exact, e.logits(prompts_for_error)) for name, e in with_logits.items()}
    bar.set_postfix_str(f"{size}: weight-streaming bound")
    if not args.smoke:
        wait_for_quiet()
    # sampled again before every engine's timed decode in every batch below, sustained over as many calls as steps
    probe = BoundProbe(config, sustained_calls=args.new_tokens - 1)
    result["runs"] = []
    for batch in args.batch:
        batch_engines = list(engines)
        compile_cost = None
        if args.compile:
            engine = compiled_transformers_engine(hf_model, batch, args.prompt_len + args.new_tokens)
            prompts = random_prompts(batch, args.prompt_len, config.vocab_size)
            try:
                bar.set_postfix_str(f"{size} batch {batch}: torch.compile")
                compile_cost = compile_cost_s(engine, prompts, args.new_tokens)
                batch_engines.append(engine)
            except Exception as e:  # noqa: BLE001
                notes.append(f"transformers static+compile skipped ({size}, batch {batch}): "
                             f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        result["runs"].append(run_batch(batch_engines, config, batch, args, bar, compile_cost, probe))
    result["bound"] = vars(probe.result())
    bar.set_postfix_str(f"{size}: memory of each load")
    result["footprints"] = footprints(engines, model, hf_model, args)
    for engine in engines:
        if engine.close is not None:
            engine.close()
    return result


def footprints(engines: list[Engine], model: GPT2, hf_model: torch.nn.Module, args: argparse.Namespace) -> dict:
    """Per engine, what its load costs in memory, each in a process of its own: this engine's modes loading model's
    weights (`gpt2.memory`, with the breakdown), transformers loading hf_model's (one load serves eager and sdpa),
    CTranslate2's workers as they loaded. MB and seconds; weights_mb where the format's size is known."""
    measure = {"threads": args.threads, "batch": max(args.batch), "prompt_len": args.prompt_len,
               "new_tokens": args.new_tokens}
    ours = engine_footprints(model, [e.name for e in engines if e.name in ENGINE_LOADS], **measure)
    out: dict = {name: {"weights_mb": f.weights_mb, "runtime_mb": f.runtime_mb, "rss_after_load_mb": f.after_load.rss,
                        "load_peak_mb": f.after_load.peak, "load_s": f.load_s,
                        "generate_growth_mb": f.generate_growth_mb, "breakdown": f.breakdown(), "line": f.line(name)}
                 for name, f in ours.items()}
    if any(e.name.startswith("transformers") for e in engines):
        with tempfile.TemporaryDirectory(prefix="bench-hf-") as workdir:
            out["transformers"] = {"weights_mb": weights_mb(model.config),
                                   **transformers_footprint(hf_model, Path(workdir), **measure)}
    for engine in engines:
        if engine.footprint is not None:
            out[engine.name] = engine.footprint()
    return out


def run_batch(engines: list[Engine], config: GPT2Config, batch: int, args: argparse.Namespace, bar: tqdm,
              compile_cost: float | None, probe: BoundProbe) -> dict:
    prompts = random_prompts(batch, args.prompt_len, config.vocab_size)
    outputs = {}
    for engine in engines:  # warm-up run; its tokens are the ones compared
        bar.set_postfix_str(f"batch {batch}: warm-up {engine.name}")
        outputs[engine.name] = engine.generate(prompts, args.new_tokens)
        bar.update()
    bar.set_postfix_str(f"batch {batch}: timing")
    timings = measure(engines, prompts, args.new_tokens, args.repeats, progress=bar.update,
                      before_turn=None if args.smoke else wait_for_quiet, bound=probe,
                      prefill_samples=args.prefill_samples, steal_clock=steal_seconds)
    memory = {}
    for engine in engines:
        bar.set_postfix_str(f"batch {batch}: memory {engine.name}")
        if engine.memory_mb is not None:  # it runs in a process of its own
            memory[engine.name] = engine.memory_mb(prompts, args.new_tokens)
        else:
            memory[engine.name] = peak_rss_growth_mb(lambda: engine.generate(prompts, args.new_tokens))
        bar.update()
    reference = outputs.get(REFERENCE, outputs["transformers sdpa"])  # sdpa: the smoke run has no eager
    engines_out = {}
    for engine in engines:
        t = timings[engine.name]
        engines_out[engine.name] = {
            "prefill_ms": t.prefill_ms, "decode_ms": t.decode_ms, "best_decode_ms": t.best_decode_ms,
            "tokens_per_s": t.tokens_per_s, "peak_rss_growth_mb": memory[engine.name],
            "agreement": agreement(outputs[engine.name], reference),
            "tokens_generated": [len(row) for row in outputs[engine.name]],
            "samples_s": {"one_token": t.one, "all_tokens": t.full},
            "steal_s": {"one_token": t.one_steal, "all_tokens": t.full_steal},
            "bound_before_ms": t.bound_ms, "decode_to_bound_by_repeat": t.decode_to_bound_by_repeat(),
            "decode_to_bound": t.decode_to_bound, "sustained_bound_before_ms": t.sustained_bound_ms,
            "decode_to_sustained_bound_by_repeat": t.decode_to_sustained_bound_by_repeat(),
            "decode_to_sustained_bound": t.decode_to_sustained_bound,
        }
        if engine.name != BASELINE and BASELINE in timings:
            engines_out[engine.name]["prefill_speedup_by_repeat"] = paired_prefill_ratios(timings[BASELINE], t)
    if compile_cost is not None:
        engines_out["transformers static+compile"]["compile_s"] = compile_cost
    return {"batch": batch, "engines": engines_out}


# --- report ------------------------------------------------------------------------------------------------

def table(results: dict) -> str:
    header = ["size", "batch", "engine", "prefill ms", "decode ms/step", "tokens/s", "x bound", "x sustained",
              "peak mem MB", "agreement"]
    rows = []
    for size, res in results["sizes"].items():
        for run in res["runs"]:
            for name, e in run["engines"].items():
                ratio = f"{e['decode_to_bound']:.2f}" if run["batch"] == 1 else ""
                sustained = f"{e['decode_to_sustained_bound']:.2f}" if run["batch"] == 1 else ""
                rows.append([size, run["batch"], name, f"{e['prefill_ms']:.1f}", f"{e['decode_ms']:.2f}",
                             f"{e['tokens_per_s']:.1f}", ratio, sustained, f"{e['peak_rss_growth_mb']:.0f}",
                             f"{e['agreement']:.2f}"])
    return format_table(header, rows)


def memory_table(results: dict) -> str:
    header = ["size", "engine", "weights MB", "runtime MB", "RSS after load MB", "x weights", "load peak MB",
              "load s"]
    rows = []
    for size, res in results["sizes"].items():
        for name, f in res.get("footprints", {}).items():
            weights = f.get("weights_mb")
            rows.append([size, name, f"{weights:.0f}" if weights else "", f"{f['runtime_mb']:.0f}",
                         f"{f['rss_after_load_mb']:.0f}", f"{_over_weights(f):.2f}" if weights else "",
                         f"{f['load_peak_mb']:.0f}", f"{f['load_s']:.1f}"])
    return format_table(header, rows)


def _over_weights(footprint: dict) -> float:
    """What the load added to its process's RSS, over the weights in the engine's format."""
    return (footprint["rss_after_load_mb"] - footprint["runtime_mb"]) / footprint["weights_mb"]


def summary_lines(results: dict) -> list[str]:
    lines = []
    for size, res in results["sizes"].items():
        lines += [f"{size} {f['line']}" for f in res.get("footprints", {}).values() if "line" in f]
        b = res["bound"]
        kernels = ", ".join(f"{k} {b['sample_kernels'].count(k)}" for k in dict.fromkeys(b["sample_kernels"]))
        lines.append(f"{size}: weight-streaming bound {b['gemv_ms']:.1f} ms = {b['n_bytes'] / 1e6:.0f} MB of fp32 "
                     f"weights through the fastest GEMV kernel, median of {len(b['samples_ms'])} samples (one at "
                     f"set-up, one just before each timed decode; range {min(b['samples_ms']):.1f}-"
                     f"{max(b['samples_ms']):.1f} ms; fastest: {kernels}; a plain max-reduction over them: "
                     f"{b['read_ms']:.1f} ms); sustained: {b['sustained_ms']:.1f} ms, the median of each sample's "
                     f"fastest kernel's mean over {results['new_tokens'] - 1} calls in a row (range "
                     f"{min(b['sustained_samples_ms']):.1f}-{max(b['sustained_samples_ms']):.1f} ms)")
        for name, q in res.get("logit_error", {}).items():
            lines.append(f"{size}: {name} logits vs this engine fp32: max |diff| {q['max_abs']:.4f} (logit std "
                         f"{q['logit_std']:.3f}), relative RMS {q['rel_rms']:.4f}, top-1 agreement "
                         f"{q['top1_agreement']:.3f}")
        lines += compile_cost_lines(size, res["runs"], "transformers static+compile")
        for run in res["runs"]:
            ours = run["engines"].get("this engine")
            if ours and run["batch"] == 1 and ours["decode_to_bound_by_repeat"]:
                paired = ours["decode_to_bound_by_repeat"]
                sustained = ours["decode_to_sustained_bound_by_repeat"]
                lines.append(f"{size} batch 1, this engine's decode step over the bound sampled just before its "
                             f"generate: {ours['decode_to_bound']:.2f}x (median; each repeat "
                             f"{', '.join(f'{r:.2f}' for r in paired)}); over the sustained bound "
                             f"{ours['decode_to_sustained_bound']:.2f}x ({', '.join(f'{r:.2f}' for r in sustained)})")
            base = run["engines"].get(BASELINE)
            if ours and base and "prefill_speedup_by_repeat" in ours:
                paired = ours["prefill_speedup_by_repeat"]
                lines.append(f"{size} batch {run['batch']}, this engine against {BASELINE}: prefill "
                             f"{_ratio(base['prefill_ms'], ours['prefill_ms'])} faster (medians; within each repeat "
                             f"{min(paired):.2f}-{max(paired):.2f}x), decode step "
                             f"{_ratio(ours['decode_ms'], base['decode_ms'])} its time")
    return lines


def _ratio(a: float, b: float) -> str:
    """a / b as "1.23x"; "n/a" where b is 0 (a decode step below the timer's noise: the smoke run's few tokens)."""
    return f"{a / b:.2f}x" if b > 0 else "n/a"


def headline(results: dict) -> str:
    """Per engine: decode ms/step at batch 1 (x the bound, x the sustained bound) and at the largest batch, batch-1
    prefill, per size."""
    sizes = list(results["sizes"])
    batches = sorted({run["batch"] for res in results["sizes"].values() for run in res["runs"]})
    big = batches[-1]
    header = ["engine"]
    for size in sizes:
        header += [f"{size} decode b1 ms (x bound / sustained)", f"{size} decode b{big} ms", f"{size} prefill b1 ms"]
    header.append(f"{sizes[-1]} RSS after load MB (x weights)")
    names = list(dict.fromkeys(name for res in results["sizes"].values() for run in res["runs"]
                               for name in run["engines"]))
    rows = []
    for name in names:
        row = [name]
        for size in sizes:
            res = results["sizes"][size]
            runs = {run["batch"]: run["engines"].get(name) for run in res["runs"]}
            one, many = runs.get(1), runs.get(big)
            row += [f"{one['decode_ms']:.1f} ({one['decode_to_bound']:.2f} / {one['decode_to_sustained_bound']:.2f})"
                    if one else "",
                    f"{many['decode_ms']:.1f}" if many else "", f"{one['prefill_ms']:.0f}" if one else ""]
        loads = results["sizes"][sizes[-1]].get("footprints", {})
        f = loads.get(name, loads.get("transformers") if name.startswith("transformers") else None)
        ratio = f" ({_over_weights(f):.2f})" if f and f.get("weights_mb") else ""
        row.append(f"{f['rss_after_load_mb']:.0f}{ratio}" if f else "")
        rows.append(row)
    bounds = ", ".join(f"{size} {res['bound']['gemv_ms']:.1f} ms (sustained {res['bound']['sustained_ms']:.1f})"
                       for size, res in results["sizes"].items())
    m = results["machine"]
    return (format_table(header, rows) + f"\n\n{m['cpu']}, {results['threads']} threads, torch {m['torch']}; "
            f"prompt {results['prompt_len']} tokens, {results['new_tokens']} greedy tokens, median of "
            f"{results['repeats']} interleaved repeats; seeded random weights of the DialoGPT shapes; RSS after load: "
            f"the whole process's, each engine loading in a fresh one, x weights: what the load added to it over the "
            f"weights in the engine's format (transformers: fp32); "
            f"x bound: the decode step over the weight-streaming bound (the fastest fp32 GEMV over the weights a "
            f"decode step reads, fastest of 3) sampled just before it, median over the repeats; sustained: the same "
            f"over that GEMV's mean over as many calls in a row as the decode has steps; the bounds' medians: "
            f"{bounds}.")


def markdown(results: dict, lines: list[str]) -> str:
    m = results["machine"]
    versions = ", ".join(f"{k} {m[k]}" for k in ("torch", "transformers", "ctranslate2") if m.get(k))
    return "\n".join([
        "# Generation benchmark", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, CPU capability {m['cpu_capability']}; {versions}; "
        f"Python {m['python']}; {results['threads']} threads for every engine.",
        f"Other processes used {results['other_processes_cores']:.2f} cores on average during the run, other guests "
        f"of the host (steal time) {results.get('steal_cores', 0.0):.2f}.",
        f"This engine's {m['cpu_kernels']}.", "",
        f"Command: `{results.get('command', 'python -m benchmarks.bench_generation')}`. Plot: `generation.png`; "
        "every sample: `generation.json`.", "", table(results), "", "Memory of each engine's load:", "",
        memory_table(results), "", *[f"- {line}" for line in lines], ""])


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({run["batch"] for res in results["sizes"].values() for run in res["runs"]})
    fig, axes = plt.subplots(1, len(batches), figsize=(6.5 * len(batches), 4.5), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        sizes = list(results["sizes"])
        names = list(dict.fromkeys(name for res in results["sizes"].values() for run in res["runs"]
                                   if run["batch"] == batch for name in run["engines"]))
        width = 0.8 / max(len(names), 1)
        for i, name in enumerate(names):
            values = []
            for size in sizes:
                run = next(r for r in results["sizes"][size]["runs"] if r["batch"] == batch)
                values.append(run["engines"].get(name, {}).get("decode_ms", 0.0))
            ax.bar([s + (i - (len(names) - 1) / 2) * width for s in range(len(sizes))], values, width, label=name)
        if batch == 1:
            for s, size in enumerate(sizes):
                bound = results["sizes"][size]["bound"]
                ax.hlines(bound["gemv_ms"], s - 0.45, s + 0.45, colors="black", linestyles="dashed",
                          label="weight-streaming bound" if s == 0 else None)
                ax.hlines(bound["sustained_ms"], s - 0.45, s + 0.45, colors="black", linestyles="dotted",
                          label="weight-streaming bound, sustained" if s == 0 else None)
        ax.set_xticks(range(len(sizes)), sizes)
        ax.set_ylabel("decode ms / step (lower is better)")
        ax.set_title(f"batch {batch}")
        ax.legend(fontsize=7)
    fig.suptitle(f"Greedy decode, fp32 unless named - {results['machine']['cpu']}, {results['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # A fresh inductor cache, so the compile cost reported is the cold one-time cost.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-inductor-")
    args.out.mkdir(parents=True, exist_ok=True)
    start, steal_start = cpu_times(), steal_seconds()
    notes: list[str] = [] if bf16_packing_available() else [BF16_SKIPPED]
    if importlib.util.find_spec("transformers") is None:
        print("transformers is required: pip install 'dialogpt-engine[bench]'", file=sys.stderr)
        return 2
    n_engines = 2 if args.smoke else 4 + bf16_packing_available() + 2 * args.ctranslate2 + args.compile
    total = len(args.sizes) * len(args.batch) * n_engines * ((args.prefill_samples + 1) * args.repeats + 2)
    command = shlex.join(["python", "-m", "benchmarks.bench_generation", *(sys.argv[1:] if argv is None else argv)])
    results: dict = {"machine": machine(), "command": command, "threads": args.threads,
                     "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
                     "prefill_samples": args.prefill_samples, "sizes": {}}
    with tqdm(total=total, desc="bench", unit="run") as bar:
        for size in args.sizes:
            results["sizes"][size] = run_size(size, args, bar, notes)
    results["other_processes_cores"] = other_cores(start)
    results["steal_cores"] = (steal_seconds() - steal_start) / max(cpu_times()[2] - start[2], 1e-9)
    results["notes"] = notes
    lines = [*summary_lines(results), *notes,
             f"{args.threads} threads; prompt {args.prompt_len} tokens, {args.new_tokens} new greedy tokens, median "
             f"of {args.repeats} interleaved repeats ({args.prefill_samples} prefills per engine in each); agreement: "
             f"share of tokens matching {REFERENCE} (sdpa in "
             "--smoke) before a row's first divergence; x bound: batch-1 decode step / the weight-streaming bound "
             "sampled just before its generate, median over the repeats; x sustained: the same over the bound "
             "sustained over as many GEMVs in a row as the decode has steps; "
             "peak mem: RSS growth during one generate (KV cache, activations, workspaces; weights excluded); "
             f"memory of each load: {FOOTPRINT_NOTE}; transformers' runtime includes importing transformers, "
             "CTranslate2's (a worker process) importing torch and ctranslate2; "
             "CTranslate2 runs in a worker process per compute type, timed through a pipe"]
    (args.out / "generation.json").write_text(json.dumps(results, indent=1))
    (args.out / "generation.md").write_text(markdown(results, lines))
    (args.out / "README-table.md").write_text(headline(results) + "\n")
    plot(results, args.out / "generation.png")
    print(table(results))
    print()
    print(memory_table(results))
    print()
    print("\n".join(lines))
    print(f"other processes used {results['other_processes_cores']:.2f} cores on average during the run, "
          f"other guests of the host (steal time) {results['steal_cores']:.2f}")
    print(f"wrote generation.json, generation.md, README-table.md and generation.png to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
