"""Generation benchmarks: timing, the weight-streaming bound and agreement, shared by `gpt2 bench`
and benchmarks/bench_generation.py.

An engine is anything that turns equal-length prompts into exactly n greedy tokens per row (end of text
suppressed, as `min_new_tokens=n` does). Every engine is timed the same way, from outside: prefill is a
one-token generate, decode per step is (n-token generate - one-token generate) / (n - 1). Engines are
interleaved within each repeat and medians reported, since other work on the machine skews single runs.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from tqdm import tqdm

from .config import GPT2Config
from .cpu import build
from .cpu.bf16_linear import bf16_packing_available, pack_bf16
from .cpu.huge_pages import huge_page_copy, huge_page_weights
from .cpu.int8_linear import quantize_int8
from .cpu import small_batch_matmul
from .memory import FOOTPRINT_HEADER, FOOTPRINT_NOTE, engine_footprints, footprint_rows
from .model import GPT2
GenerateFn = Callable[[list[list[int]], int], list[list[int]]]  # (prompts, n) -> n new tokens per row

SIZES = {"tiny": GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128),
         "small": GPT2Config.from_preset("dialogpt-small"), "medium": GPT2Config.from_preset("dialogpt-medium")}


@dataclass
class Engine:
    name: str
    generate: GenerateFn
    # Its fp32 logits (B, T, V) at every position of equal-length prompts, to measure its error against fp32.
    logits: Callable[[list[list[int]]], torch.Tensor] | None = None
    # For an engine running in another process: the peak RSS growth of one generate there (MB), and shutdown.
    memory_mb: Callable[[list[list[int]], int], float] | None = None
    close: Callable[[], None] | None = None
    # For an engine running in another process: that process's RSS before and after its load (runtime_mb,
    # rss_after_load_mb, load_peak_mb, load_s), as `gpt2.memory` measures this engine's in a process of its own
    footprint: Callable[[], dict[str, float]] | None = None


@dataclass
class Timing:
    """Seconds per call of one engine over the repeats: one-token generates (one_per_repeat of them in each repeat,
    in order) and n-token generates; beside each sample, the host's steal time during it where `measure` read it."""

    batch: int
    n_new: int
    one: list[float] = field(default_factory=list)
    full: list[float] = field(default_factory=list)
    one_per_repeat: int = 1
    one_steal: list[float] = field(default_factory=list)
    full_steal: list[float] = field(default_factory=list)
    bound_ms: list[float] = field(default_factory=list)  # the bound sampled just before each n-token generate
    sustained_bound_ms: list[float] = field(default_factory=list)  # its sustained form (`BoundProbe`), likewise

    @property
    def prefill_ms(self) -> float:
        return statistics.median(self.one) * 1e3

    @property
    def decode_ms(self) -> float:
        """Per decode step: the n-token generate less the one-token one, over the n - 1 extra steps."""
        return max(statistics.median(self.full) - statistics.median(self.one), 0.0) / (self.n_new - 1) * 1e3

    @property
    def best_decode_ms(self) -> float:
        """The same from the fastest run of each: what an undisturbed machine gets."""
        return max(min(self.full) - min(self.one), 0.0) / (self.n_new - 1) * 1e3

    @property
    def tokens_per_s(self) -> float:
        return self.batch * self.n_new / statistics.median(self.full)

    def prefill_by_repeat(self) -> list[float]:
        """Median one-token generate (prefill) seconds within each repeat."""
        k = self.one_per_repeat
        return [statistics.median(self.one[i:i + k]) for i in range(0, len(self.one), k)]

    def decode_by_repeat(self) -> list[float]:
        """Per repeat, ms per decode step: its n-token generate less its median one-token one, over n - 1 steps."""
        return [max(full - one, 0.0) / (self.n_new - 1) * 1e3 for full, one in zip(self.full, self.prefill_by_repeat())]

    def decode_to_bound_by_repeat(self) -> list[float]:
        """Per repeat, the decode step over the weight-streaming bound sampled just before that generate (see
        `measure`): both from the same seconds, so a slow stretch of the machine moves both."""
        return [d / b for d, b in zip(self.decode_by_repeat(), self.bound_ms)]

    @property
    def decode_to_bound(self) -> float | None:
        """The median of `decode_to_bound_by_repeat`; None where no bound was sampled."""
        return _median_or_none(self.decode_to_bound_by_repeat())

    def decode_to_sustained_bound_by_repeat(self) -> list[float]:
        """As `decode_to_bound_by_repeat`, over the sustained bound sampled just before each generate."""
        return [d / b for d, b in zip(self.decode_by_repeat(), self.sustained_bound_ms)]

    @property
    def decode_to_sustained_bound(self) -> float | None:
        """The median of `decode_to_sustained_bound_by_repeat`; None where no sustained bound was sampled."""
        return _median_or_none(self.decode_to_sustained_bound_by_repeat())


def _median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def paired_prefill_ratios(baseline: Timing, timing: Timing) -> list[float]:
    """Per repeat, the baseline's prefill time over this one's: ratios of samples taken seconds apart, which a slow
    stretch of the machine moves less than the ratio of whole-run medians."""
    return [b / t for b, t in zip(baseline.prefill_by_repeat(), timing.prefill_by_repeat())]


def random_prompts(batch: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """batch rows of length token ids, reproducible (end of text excluded)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size - 1, (batch, length), generator=g).tolist()


def random_model(config: GPT2Config, seed: int = 0) -> GPT2:
    """This engine's model with GPT-2's initialisation (normal(0, 0.02) weights), seeded, fp32, eval."""
    torch.manual_seed(seed)
    model = GPT2(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".ln_" in name or name.startswith("ln_f"):
                param.copy_(1.0 if name.endswith("weight") else 0.0)
            else:
                param.normal_(0.0, 0.02)
    huge_page_weights(model)  # as gpt2.load places them
    return model.eval()


def this_engine(model: GPT2, name: str = "this engine") -> Engine:
    def generate(prompts: list[list[int]], n: int) -> list[list[int]]:
        return model.generate(prompts, max_new_tokens=n, min_new_tokens=n)

    def logits(prompts: list[list[int]]) -> torch.Tensor:
        with torch.inference_mode():
            return model(torch.tensor(prompts, device=model.device)).float()  # (B, T, V)

    return Engine(name, generate, logits)


BF16_SKIPPED = "this engine bf16 skipped: oneDNN has no native bf16 on this CPU (avx512_bf16 or AMX)"


def low_precision_engines(model: GPT2, packed_prefill_too: bool = False) -> list[Engine]:
    """This engine's int8 model, and its packed bf16 one where the CPU runs bf16 natively (else BF16_SKIPPED); with
    packed_prefill_too, each also loaded with `packed_prefill=True` ("... packed"), to measure what that copy buys."""
    variants = [False, True] if packed_prefill_too else [False]
    engines = [this_engine(quantize_int8(copy.deepcopy(model), packed), "this engine int8" + " packed" * packed)
               for packed in variants]
    if bf16_packing_available():
        engines += [this_engine(pack_bf16(copy.deepcopy(model).to(torch.bfloat16), packed),
                                "this engine bf16" + " packed" * packed) for packed in variants]
    return engines


def measure(engines: Iterable[Engine], prompts: list[list[int]], n_new: int, repeats: int,
            progress: Callable[[], None] | None = None, before_turn: Callable[[], object] | None = None,
            bound: BoundProbe | None = None, prefill_samples: int = 1,
            steal_clock: Callable[[], float] | None = None) -> dict[str, Timing]:
    """Interleaved timing: each repeat runs every engine for one token (prefill_samples times), then for n_new
    tokens; before_turn runs before each engine's turn (benchmarks/host.py waits there for a quiet machine), and
    steal_clock, where given, reads the host's steal time around each sample (`Timing.one_steal`). A bound probe is sampled just before each n-token generate, each sample kept beside the
    timing it precedes (`Timing.bound_ms`): this machine's bandwidth drifts within minutes, and a ratio of samples
    seconds apart drifts less than one of medians over the run."""
    if n_new < 2:
        raise ValueError("n_new must be at least 2 to separate decode from prefill")
    if prefill_samples < 1:
        raise ValueError(f"prefill_samples must be at least 1, got {prefill_samples}")
    engines = list(engines)
    timings = {e.name: Timing(len(prompts), n_new, one_per_repeat=prefill_samples) for e in engines}
    for _ in range(repeats):
        for engine in engines:
            if before_turn is not None:
                before_turn()
            t = timings[engine.name]
            for n, samples, steal in [(1, t.one, t.one_steal)] * prefill_samples + [(n_new, t.full, t.full_steal)]:
                if n == n_new and bound is not None:
                    bound.sample()
                    t.bound_ms.append(bound.samples_ms[-1])
                    if bound.sustained_samples_ms:
                        t.sustained_bound_ms.append(bound.sustained_samples_ms[-1])
                stolen, start = steal_clock() if steal_clock else 0.0, time.perf_counter()
                engine.generate(prompts, n)
                samples.append(time.perf_counter() - start)
                if steal_clock is not None:
                    steal.append(steal_clock() - stolen)
                if progress is not None:
                    progress()
    return timings


def agreement(outputs: list[list[int]], reference: list[list[int]]) -> float:
    """Share of reference tokens matched before each row's first divergence (1.0: identical)."""
    matched = total = 0
    for row, ref in zip(outputs, reference):
        for a, b in zip(row, ref):
            if a != b:
                break
            matched += 1
        total += len(ref)
    return matched / total


@dataclass
class StreamingBound:
    """Time to read the weights one decode step reads (fp32), measured on this machine and thread count."""

    n_bytes: int
    gemv_ms: float  # median over the run of the fastest matrix-vector product over one weight-sized matrix
    gemv_kernel: str
    read_ms: float  # a max-reduction over the same bytes: the plain read, no arithmetic
    samples_ms: list[float]  # each the fastest of a few GEMVs: one at set-up, then one before each timed decode
    sample_kernels: list[str]  # the GEMV kernel that was fastest in each sample
    sustained_ms: float | None = None  # median of sustained_samples_ms; None where none were taken
    sustained_samples_ms: list[float] = field(default_factory=list)  # each a mean over calls in a row (`BoundProbe`)


def decode_weight_floats(config: GPT2Config) -> int:
    """fp32 weights one decode step streams: the blocks' four matrices and the tied lm_head."""
    C = config.n_embd
    return config.n_layer * 12 * C * C + config.vocab_size * C


class BoundProbe:
    """The weight-streaming bound of a config, sampled again between the repeats of a benchmark.

    A shared machine's memory bandwidth drifts with what its neighbours do, so a bound taken once, minutes away
    from an engine's timings, makes ratios that drift with it. Each `sample()` times every GEMV kernel on one
    weight-sized matrix and keeps the fastest; the bound is the median of the samples. (A kernel chosen once at
    set-up would stay the one timed for the whole run even where another is faster later.) The kernels are MKL's
    two layouts, oneDNN's and, where built, this engine's own small-batch matmul, which is often the fastest of
    them, so a bound without it would credit an engine for a slower GEMV than the machine runs.

    With sustained_calls > 0, each sample also runs that sample's fastest kernel sustained_calls times back to back
    and keeps the mean time of a call (`sustained_samples_ms`): the bound as a decode of sustained_calls steps would
    get it were each step that one GEMV, the same statistic as the decode step it is compared with (a mean over the
    steps of one generate). The fastest of 3 is a burst: a GEMV's mean over many calls in a row is slower.

    Measured: docs/performance.md#gpt2benchpy-the-weight-streaming-bound
    """

    def __init__(self, config: GPT2Config, repeats: int = 7, sustained_calls: int = 0) -> None:
        C = config.n_embd
        rows = decode_weight_floats(config) // C
        x = torch.randn(C)
        w = huge_page_copy(torch.randn(rows, C))  # the memory the model's weights live in (see gpt2.loading)
        w_t = w.view(C, rows)  # the same bytes as an (n_embd, rows) matrix
        self.kernels: dict[str, Callable[[], object]] = {  # each reads all of w once
            "torch.mv (MKL)": lambda: torch.mv(w, x),
            "x @ W, W (n_embd, rows) (MKL)": lambda: x @ w_t,
        }
        if hasattr(torch.ops.mkldnn, "_linear_pointwise"):
            self.kernels["oneDNN linear"] = lambda: torch.ops.mkldnn._linear_pointwise(x[None], w, None, "none", [], "")
        if small_batch_matmul.applies(x[None], w, None):
            self.kernels["small-batch matmul (C, this engine's)"] = lambda: small_batch_matmul.matmul(x[None], w, None)
        with torch.inference_mode():
            self.read_ms = _best_seconds(w.view(-1).amax, repeats) * 1e3
        self.n_bytes = rows * C * 4
        self.sustained_calls = sustained_calls
        self.samples_ms: list[float] = []
        self.sample_kernels: list[str] = []  # the fastest kernel of each sample
        self.sustained_samples_ms: list[float] = []
        self.sample(repeats)

    def sample(self, repeats: int = 3) -> None:
        """Time every GEMV kernel again (fastest of repeats each) and keep the fastest; then, with sustained_calls,
        that kernel's mean over sustained_calls calls in a row."""
        with torch.inference_mode():
            ms = {name: _best_seconds(kernel, repeats) * 1e3 for name, kernel in self.kernels.items()}
            name = min(ms, key=ms.get)
            if self.sustained_calls > 0:
                self.sustained_samples_ms.append(_mean_seconds(self.kernels[name], self.sustained_calls) * 1e3)
        self.samples_ms.append(ms[name])
        self.sample_kernels.append(name)

    def result(self) -> StreamingBound:
        kernel = statistics.mode(self.sample_kernels)
        return StreamingBound(self.n_bytes, statistics.median(self.samples_ms), kernel, self.read_ms,
                              list(self.samples_ms), list(self.sample_kernels),
                              _median_or_none(self.sustained_samples_ms), list(self.sustained_samples_ms))


def _best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of repeats: a bound is what the machine can do, not what it did while busy."""
    fn()  # warm-up: page faults, kernel selection
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return min(samples)


def _mean_seconds(fn: Callable[[], object], calls: int) -> float:
    """Mean seconds of one call over calls in a row (the kernel is warm: `_best_seconds` ran it just before)."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def cuda_ms(fn: Callable[[], object], repeats: int = 50) -> float:
    """Median time of fn on the current CUDA stream, by CUDA events, after a warm-up."""
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


class CudaBoundProbe:
    """The weight-streaming bound on a CUDA GPU: one fp16 GEMV (cuBLAS) over a matrix the size of the weights a
    decode step reads, timed by CUDA events; the same interface as `BoundProbe`."""

    def __init__(self, config: GPT2Config) -> None:
        C = config.n_embd
        self._weight = torch.randn(decode_weight_floats(config) // C, C, device="cuda", dtype=torch.float16)
        self._x = torch.randn(C, device="cuda", dtype=torch.float16)
        self.n_bytes = self._weight.numel() * self._weight.element_size()
        self.read_ms = cuda_ms(self._weight.view(-1).amax)
        self.samples_ms: list[float] = []
        self.sustained_samples_ms: list[float] = []  # none: each sample is already a median over 50 calls in a row
        self.sample()

    def sample(self) -> None:
        self.samples_ms.append(cuda_ms(lambda: torch.mv(self._weight, self._x)))

    def result(self) -> StreamingBound:
        kernel = "torch.mv fp16 (cuBLAS)"
        return StreamingBound(self.n_bytes, statistics.median(self.samples_ms), kernel, self.read_ms,
                              list(self.samples_ms), [kernel] * len(self.samples_ms))


def format_table(header: list[str], rows: list[list[object]]) -> str:
    """A GitHub-markdown table, numbers as given (format them before)."""
    cells = [[str(c) for c in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def cuda_engines(model: GPT2) -> list[Engine]:
    """`gpt2 bench --device cuda`: this engine in fp16 (Triton kernels, CUDA-graph decode) and fp32, on the GPU."""
    return [this_engine(copy.deepcopy(model).to("cuda", torch.float16), "this engine fp16"),
            this_engine(model.to("cuda"), "this engine fp32")]


def quick_bench(sizes: Iterable[str] = ("small",), batches: Iterable[int] = (1, 8), prompt_len: int = 32,
                n_new: int = 16, repeats: int = 3, threads: int = 2, progress: bool = True,
                device: str = "cpu") -> str:
    """`gpt2 bench`: on the CPU this engine fp32, int8 and bf16 (where the CPU has native bf16); on CUDA fp16
    and fp32 (`cuda_engines`); on seeded random weights, against the weight-streaming bound. On the CPU also what
    each engine's load costs in memory, each in a fresh process (`gpt2.memory`). The comparisons with other engines
    are benchmarks/bench_generation.py's.

    Returns the report (markdown tables, the weight-streaming bound per size and the memory breakdowns).
    """
    on_gpu = device == "cuda"
    torch.set_num_threads(threads)
    sizes, batches = list(sizes), list(batches)
    n_engines = _engine_count(device)
    footprint_steps = 0 if on_gpu else len(sizes) * n_engines  # one fresh process per engine and size
    bar = tqdm(total=len(sizes) * len(batches) * n_engines * (2 * repeats + 1) + footprint_steps, desc="gpt2 bench",
               disable=not progress, leave=False)
    header = ["size", "batch", "engine", "prefill ms", "decode ms/step", "tokens/s", "x bound", "x sustained",
              "agreement"]
    rows: list[list[object]] = []
    memory_rows: list[list[str]] = []
    where = torch.cuda.get_device_name() if on_gpu else f"{threads} threads, fp32 unless named"
    notes = [f"torch {torch.__version__}, {where}; prompt {prompt_len} tokens, {n_new} new greedy tokens, median of "
             f"{repeats} interleaved repeats; seeded random weights"]
    if not on_gpu:
        notes.append(f"this engine's {build.status()}")  # built before the timings, if at all
    if not on_gpu and not bf16_packing_available():
        notes.append(BF16_SKIPPED)
    reference_name = "this engine fp32" if on_gpu else "this engine"  # the others' agreement is measured against it
    for size in sizes:
        config = SIZES[size]
        model = random_model(config)
        engines = cuda_engines(model) if on_gpu else [this_engine(model), *low_precision_engines(model)]
        probe = CudaBoundProbe(config) if on_gpu else BoundProbe(config, sustained_calls=n_new - 1)
        size_rows = []
        for batch in batches:
            prompts = random_prompts(batch, prompt_len, config.vocab_size)
            outputs = {}
            for engine in engines:  # warm-up, and the tokens compared below
                outputs[engine.name] = engine.generate(prompts, n_new)
                bar.update()
            reference = outputs[reference_name]
            timings = measure(engines, prompts, n_new, repeats, progress=bar.update, bound=probe)
            size_rows += [(batch, engine.name, timings[engine.name], agreement(outputs[engine.name], reference))
                          for engine in engines]
        bound = probe.result()  # known once every batch has sampled it
        for batch, name, t, agree in size_rows:
            ratio = f"{t.decode_to_bound:.2f}" if batch == 1 else ""
            sustained = f"{t.decode_to_sustained_bound:.2f}" if batch == 1 and t.sustained_bound_ms else ""
            decode = f"{t.decode_ms:.3f}" if on_gpu else f"{t.decode_ms:.2f}"  # sub-millisecond steps on a GPU
            rows.append([size, batch, name, f"{t.prefill_ms:.1f}", decode, f"{t.tokens_per_s:.1f}", ratio, sustained,
                         f"{agree:.2f}"])
        notes.append(f"{size}: weight-streaming bound {bound.gemv_ms:.3f} ms ({bound.n_bytes / 1e6:.0f} MB "
                     f"{'fp16' if on_gpu else 'fp32'} via {bound.gemv_kernel}, median of {len(bound.samples_ms)} "
                     f"samples: one at set-up, one just before each timed decode; a plain read takes "
                     f"{bound.read_ms:.3f} ms)"
                     + (f"; sustained: {bound.sustained_ms:.3f} ms, the median of the same samples' means over "
                        f"{n_new - 1} calls in a row" if bound.sustained_ms is not None else ""))
        del probe  # a weight-sized matrix, before the loads measured below
        if not on_gpu:
            footprints = engine_footprints(model, [engine.name for engine in engines], threads=threads,
                                           batch=max(batches), prompt_len=prompt_len, new_tokens=n_new)
            bar.update(len(footprints))
            memory_rows += footprint_rows(size, footprints)
            notes += [footprint.line(f"{size} {name}") for name, footprint in footprints.items()]
        del engines  # models, before the next size allocates its own
    bar.close()
    notes.append(f"agreement: share of generated tokens matching {reference_name} before the first divergence; "
                 "x bound: batch-1 decode step / the weight-streaming bound sampled just before it, median over "
                 "the repeats; x sustained: the same over the sustained bound, as a decode of as many steps would get "
                 "it were each step that GEMV; other engines: benchmarks/bench_generation.py")
    if memory_rows:
        notes.append(f"memory: {FOOTPRINT_NOTE}, of batch {max(batches)}")
    memory = "\n\n" + format_table(FOOTPRINT_HEADER, memory_rows) if memory_rows else ""
    return format_table(header, rows) + memory + "\n\n" + "\n".join(notes)


def _engine_count(device: str) -> int:
    """The engines quick_bench times: this engine's fp32, int8 and (where native) bf16 on the CPU, fp16 and fp32 on
    CUDA."""
    return 2 if device == "cuda" else 2 + bf16_packing_available()


@dataclass(frozen=True)
class BenchMachine:
    """What `quick_bench_seconds` assumes of the machine; slow on purpose, so that the estimate errs long."""

    weight_bytes_per_s: float  # reading the weights once, as a batch-1 decode step does
    flops_per_s: float  # matmul throughput of one CPU thread, or of the whole GPU
    step_overhead_s: float  # this engine's fixed cost per generated token
    setup_s_per_gb: float  # building and copying a size's models and probe matrix, per GB of fp32 weights
    startup_s: float  # imports, loading this engine's C kernels or compiling its Triton ones


# Rates of a busy 2-core CPU, which reproduce a default run's duration there (docs/performance.md#gpt2-bench);
# the GPU's are a guess, a fraction of a datacenter GPU's bandwidth and fp16 throughput.
CPU_MACHINE = BenchMachine(weight_bytes_per_s=5e9, flops_per_s=10e9, step_overhead_s=5e-3, setup_s_per_gb=40.0,
                           startup_s=15.0)
CUDA_MACHINE = BenchMachine(weight_bytes_per_s=500e9, flops_per_s=20e12, step_overhead_s=1e-3, setup_s_per_gb=40.0,
                            startup_s=60.0)


def quick_bench_seconds(sizes: Iterable[str] = ("small",), batches: Iterable[int] = (1, 8), prompt_len: int = 32,
                        n_new: int = 16, repeats: int = 3, threads: int = 2, device: str = "cpu") -> float:
    """Roughly how long `quick_bench` with these arguments runs, from the work it does and `CPU_MACHINE` /
    `CUDA_MACHINE`: per size the set-up, then per batch and engine a warm-up and `repeats` timed n_new-token
    generates, `repeats` one-token ones (prefill) and a bound sample before each timed generate."""
    machine = CUDA_MACHINE if device == "cuda" else CPU_MACHINE
    flops_per_s = machine.flops_per_s * (1 if device == "cuda" else threads)
    n_engines = _engine_count(device)
    total = machine.startup_s
    for size in sizes:
        floats = decode_weight_floats(SIZES[size])
        total += machine.setup_s_per_gb * floats * 4 / 1e9
        if device != "cuda":  # the memory of each engine's load, each in a fresh process (imports, load, generate)
            total += n_engines * (machine.startup_s + machine.setup_s_per_gb * floats * 4 / 1e9)
        read_s = floats * 4 / machine.weight_bytes_per_s
        sample_s = (16 + n_new - 1) * read_s  # BoundProbe.sample: ~4 kernels x (warm-up + 3), then n_new - 1 calls
        for batch in batches:
            prefill_s = 2 * floats * batch * prompt_len / flops_per_s
            step_s = max(read_s, 2 * floats * batch / flops_per_s)
            generate_s = prefill_s + (n_new - 1) * (step_s + machine.step_overhead_s)
            total += n_engines * ((repeats + 1) * generate_s
                                  + repeats * (prefill_s + machine.step_overhead_s + sample_s))
    return total


def quick_bench_estimate(sizes: Iterable[str] = ("small",), batches: Iterable[int] = (1, 8), prompt_len: int = 32,
                         n_new: int = 16, repeats: int = 3, threads: int = 2, device: str = "cpu") -> str:
    """One line saying roughly how long `quick_bench` with these arguments takes, and how much it runs."""
    sizes, batches = list(sizes), list(batches)
    seconds = quick_bench_seconds(sizes, batches, prompt_len, n_new, repeats, threads, device)
    duration = "less than a minute" if seconds < 60 else f"roughly {round(seconds / 60)} min"
    basis = "a guess for a GPU" if device == "cuda" else "as on a busy 2-core CPU; faster machines take less"
    counts = [(len(sizes), "size"), (len(batches), "batch size"), (_engine_count(device), "engine"),
              (repeats, "repeat")]
    work = " x ".join(f"{n} {what}{'s' * (n != 1)}" for n, what in counts)
    return f"gpt2 bench: {duration} ({basis}) for {work}"
