"""The benchmark scripts in their smoke mode, so they cannot rot; speed itself is checked by the benchmarks, not here."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gpt2_kernels.interpreter import interpreter_problem
from gpt2.cpu import build
from gpt2.bench import SIZES, BoundProbe, Engine, Timing, agreement, format_table, measure, paired_prefill_ratios
from gpt2.cli import main
from gpt2.cpu.bf16_linear import bf16_packing_available

REPO = Path(__file__).resolve().parent.parent
INTERPRETER_PROBLEM = interpreter_problem()  # Triton's interpreter cannot run the kernels here


def test_bench_generation_smoke(tmp_path):
    run = subprocess.run([sys.executable, "-m", "benchmarks.bench_generation", "--smoke", "--out", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "generation.json").read_text())
    tiny = results["sizes"]["tiny"]
    assert [r["batch"] for r in tiny["runs"]] == [1, 2]
    for r in tiny["runs"]:
        engines = r["engines"]
        assert set(engines) == {"this engine", "transformers sdpa"}
        assert engines["this engine"]["agreement"] == 1.0  # greedy ids identical to transformers'
        assert engines["this engine"]["tokens_generated"] == [3] * r["batch"]
        assert engines["this engine"]["decode_ms"] >= 0 and engines["this engine"]["prefill_ms"] > 0
    assert len(tiny["bound"]["samples_ms"]) == 1 + 2 * 2  # at set-up, then before each engine's decode per batch
    assert len(tiny["bound"]["sample_kernels"]) == len(tiny["bound"]["samples_ms"])
    ours = tiny["runs"][0]["engines"]["this engine"]
    assert ours["bound_before_ms"] == tiny["bound"]["samples_ms"][1:2]  # batch 1: the sample before its decode
    assert ours["decode_to_bound"] == ours["decode_to_bound_by_repeat"][0]
    assert ours["decode_to_bound"] == pytest.approx(ours["decode_ms"] / ours["bound_before_ms"][0])
    assert len(tiny["bound"]["sustained_samples_ms"]) == len(tiny["bound"]["samples_ms"])  # each sample sustained too
    assert ours["sustained_bound_before_ms"] == tiny["bound"]["sustained_samples_ms"][1:2]
    assert ours["decode_to_sustained_bound"] == pytest.approx(ours["decode_ms"] / ours["sustained_bound_before_ms"][0])
    assert tiny["bound"]["gemv_ms"] > 0 and tiny["logit_error"]["this engine int8"]["rel_rms"] < 0.03
    if bf16_packing_available():
        assert tiny["logit_error"]["this engine bf16"]["rel_rms"] < 0.03
    assert (tmp_path / "generation.png").stat().st_size > 1000
    assert "| this engine " in (tmp_path / "README-table.md").read_text()
    assert "Machine: " in (tmp_path / "generation.md").read_text()
    assert "| this engine " in run.stdout and "weight-streaming bound" in run.stdout
    loads = tiny["footprints"]  # each engine's load, in a process of its own
    assert set(loads) == {"this engine", "transformers"}
    for f in loads.values():
        assert f["load_peak_mb"] >= f["rss_after_load_mb"] > f["runtime_mb"] > 0
    assert sum(loads["this engine"]["breakdown"].values()) == pytest.approx(loads["this engine"]["rss_after_load_mb"])
    assert "Memory of each engine's load" in (tmp_path / "generation.md").read_text()


@pytest.mark.skipif(importlib.util.find_spec("uvicorn") is None, reason="the serve extra is not installed")
def test_bench_serve_smoke(tmp_path):
    """A real `gpt2 serve` on 127.0.0.1 under 1 and 2 streaming clients, each for a second."""
    run = subprocess.run([sys.executable, "-m", "benchmarks.bench_serve", "--smoke", "--out", str(tmp_path),
                          "--workdir", str(tmp_path / "models")], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    levels = json.loads((tmp_path / "serve.json").read_text())["sizes"]["tiny"]["this engine fp32"]
    assert [level["clients"] for level in levels] == [1, 2]
    assert all(level["tokens"] > 0 and level["token_p50_ms"] > 0 and level["ttft_p99_ms"] > 0 for level in levels)
    assert (tmp_path / "serve.png").stat().st_size > 1000
    assert "| this engine fp32 | 2 |" in (tmp_path / "serve.md").read_text()


def test_gpt2_bench_command(capsys):
    assert main(["bench", "--sizes", "tiny", "--batch", "1", "--new-tokens", "2", "--repeats", "1",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    engines = ["| this engine ", "| this engine int8 "]
    for engine in engines + (["| this engine bf16 "] if bf16_packing_available() else []):
        assert engine in out
    assert "transformers" not in out.split("\n\n")[0]  # the library's bench times this engine only
    assert "weight-streaming bound" in out


def test_gpt2_bench_rejects_one_token(capsys):
    assert main(["bench", "--sizes", "tiny", "--new-tokens", "1"]) == 2
    assert "--new-tokens must be >= 2" in capsys.readouterr().err


def test_timing_separates_prefill_from_decode():
    t = Timing(batch=2, n_new=5, one=[0.010, 0.012, 0.011], full=[0.050, 0.051, 0.052])
    assert abs(t.prefill_ms - 11.0) < 1e-9
    assert abs(t.decode_ms - (51.0 - 11.0) / 4) < 1e-9
    assert abs(t.best_decode_ms - (50.0 - 10.0) / 4) < 1e-9
    assert abs(t.tokens_per_s - 2 * 5 / 0.051) < 1e-9


def test_prefill_ratios_pair_samples_of_the_same_repeat():
    """Each repeat's prefill median against the baseline's from that repeat: a slow repeat moves both engines."""
    ours = Timing(batch=8, n_new=4, one=[0.20, 0.21, 0.22, 0.30, 0.31, 0.29], one_per_repeat=3)
    baseline = Timing(batch=8, n_new=4, one=[0.40, 0.42, 0.41, 0.60, 0.62, 0.61], one_per_repeat=3)
    assert ours.prefill_by_repeat() == [0.21, 0.30]
    assert paired_prefill_ratios(baseline, ours) == [0.41 / 0.21, 0.61 / 0.30]
    assert abs(ours.prefill_ms - 255.0) < 1e-9  # the plain median over every sample


def test_decode_to_bound_pairs_each_repeat_with_the_bound_sampled_before_it():
    """A slow repeat of both the engine and the bound gives the same ratio as a fast one."""
    t = Timing(batch=1, n_new=5, one=[0.010, 0.012, 0.020, 0.022], full=[0.050, 0.100], one_per_repeat=2,
               bound_ms=[9.0, 18.0])
    decode = [(0.050 - 0.011) / 4 * 1e3, (0.100 - 0.021) / 4 * 1e3]
    assert t.decode_by_repeat() == pytest.approx(decode)
    assert t.decode_to_bound_by_repeat() == pytest.approx([decode[0] / 9.0, decode[1] / 18.0])
    assert t.decode_to_bound == pytest.approx((decode[0] / 9.0 + decode[1] / 18.0) / 2)
    assert Timing(batch=1, n_new=5, one=[0.01], full=[0.05]).decode_to_bound is None
    t.sustained_bound_ms = [10.0, 20.0]
    assert t.decode_to_sustained_bound_by_repeat() == pytest.approx([decode[0] / 10.0, decode[1] / 20.0])
    assert t.decode_to_bound_by_repeat() == pytest.approx([decode[0] / 9.0, decode[1] / 18.0])  # each its own
    assert Timing(batch=1, n_new=5, one=[0.01], full=[0.05]).decode_to_sustained_bound is None


def test_measure_samples_the_bound_just_before_each_decode():
    events = []

    class FakeProbe:
        def __init__(self) -> None:
            self.samples_ms: list[float] = []
            self.sustained_samples_ms: list[float] = []

        def sample(self) -> None:
            events.append("bound")
            self.samples_ms.append(float(len(events)))
            self.sustained_samples_ms.append(float(len(events)) + 0.5)

    engines = [Engine(name, lambda prompts, n, name=name: events.append(f"{name}:{n}") or [[0] * n for _ in prompts])
               for name in ("a", "b")]
    timings = measure(engines, [[1, 2]], n_new=3, repeats=2, bound=FakeProbe())
    assert events == ["a:1", "bound", "a:3", "b:1", "bound", "b:3"] * 2
    assert timings["a"].bound_ms == [2.0, 8.0] and timings["b"].bound_ms == [5.0, 11.0]
    assert timings["a"].sustained_bound_ms == [2.5, 8.5] and timings["b"].sustained_bound_ms == [5.5, 11.5]


def test_bound_probe_keeps_the_fastest_kernel_of_each_sample():
    probe = BoundProbe(SIZES["tiny"], repeats=1)
    assert len(probe.samples_ms) == 1 and probe.sample_kernels[0] in probe.kernels
    if build.library() is not None:  # this engine's own GEMV is among those the bound takes the fastest of
        assert "small-batch matmul (C, this engine's)" in probe.kernels
    probe.kernels = {"slow": lambda: time.sleep(0.005), "fast": lambda: None}
    probe.sample(repeats=1)
    assert probe.sample_kernels[-1] == "fast" and probe.samples_ms[-1] < 5.0
    probe.sample(repeats=1)
    result = probe.result()
    assert result.gemv_kernel == "fast" and len(result.samples_ms) == 3
    assert result.sample_kernels == [probe.sample_kernels[0], "fast", "fast"]


def test_measure_takes_prefill_samples_per_repeat():
    calls = []
    engine = Engine("fake", lambda prompts, n: calls.append(n) or [[0] * n for _ in prompts])
    turns = []
    timings = measure([engine], [[1, 2]], n_new=3, repeats=2, prefill_samples=3, before_turn=lambda: turns.append(1),
                      steal_clock=lambda: 0.0)
    assert calls == [1, 1, 1, 3, 1, 1, 1, 3]
    assert turns == [1, 1]  # once before each engine's turn in each repeat
    t = timings["fake"]
    assert len(t.one) == len(t.one_steal) == 6 and len(t.full) == len(t.full_steal) == 2
    assert measure([engine], [[1, 2]], n_new=3, repeats=1)["fake"].one_steal == []  # no clock, no steal samples
    assert len(t.prefill_by_repeat()) == 2
    with pytest.raises(ValueError, match="prefill_samples"):
        measure([engine], [[1, 2]], n_new=3, repeats=1, prefill_samples=0)


def test_agreement_counts_tokens_before_the_first_divergence():
    assert agreement([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 5, 6]]) == 1.0
    assert agreement([[1, 9, 3], [4, 5, 6]], [[1, 2, 3], [4, 5, 6]]) == 4 / 6  # 3 after the divergence not counted


def test_format_table():
    assert format_table(["a", "bb"], [[1, "x"]]).splitlines() == ["| a | bb |", "| - | -- |", "| 1 | x  |"]


def test_ctranslate2_runs_in_worker_processes(tmp_path):
    pytest.importorskip("ctranslate2")
    from benchmarks.ctranslate2_engine import ctranslate2_engines
    from benchmarks.reference import reference_pair
    from gpt2.bench import SIZES

    hf_model, model = reference_pair(SIZES["tiny"])
    engines = ctranslate2_engines(hf_model, tmp_path, threads=1)
    try:
        assert [e.name for e in engines] == ["ctranslate2 fp32", "ctranslate2 int8"]
        prompts = [[5, 6, 7, 8], [9, 10, 11, 12]]
        fp32 = engines[0]
        expected = model.generate(prompts, max_new_tokens=3, min_new_tokens=3)
        assert fp32.generate(prompts, 3) == expected  # greedy, same weights: same tokens
        with torch.inference_mode():
            torch.testing.assert_close(fp32.logits(prompts), model(torch.tensor(prompts)), atol=1e-4, rtol=1e-4)
        assert fp32.memory_mb(prompts, 3) >= 0
    finally:
        for engine in engines:
            engine.close()
    assert all(not p.is_alive() for p in multiprocessing.active_children() if p.name.startswith("ctranslate2"))


def test_bench_generation_cuda_smoke(tmp_path):
    """The GPU benchmark's CPU smoke mode: this engine and transformers, fp32, tiny config."""
    run = subprocess.run([sys.executable, "-m", "benchmarks.bench_generation_cuda", "--smoke", "--out",
                          str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "generation-cuda-cpu-smoke.json").read_text())
    runs = results["sizes"]["tiny"]["runs"]
    assert [r["batch"] for r in runs] == [1, 2]
    for r in runs:
        ours = r["engines"]["this engine fp32"]
        assert ours["agreement"] == 1.0 and ours["decode_ms"] >= 0 and ours["prefill_ms"] > 0
    assert results["sizes"]["tiny"]["logit_error"]["this engine fp32"]["rel_rms"] < 1e-5
    assert "| this engine fp32 " in run.stdout


@pytest.mark.skipif(INTERPRETER_PROBLEM is not None, reason=str(INTERPRETER_PROBLEM))
def test_bench_generation_cuda_fused_smoke(tmp_path):
    """--fused's CPU smoke mode: the unfused and the fused decode step under the Triton interpreter, fp32, tiny."""
    run = subprocess.run([sys.executable, "-m", "benchmarks.bench_generation_cuda", "--smoke", "--fused", "--out",
                          str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "generation-cuda-fused-cpu-smoke.json").read_text())
    runs = results["sizes"]["tiny"]["runs"]
    assert [(r["dtype"], r["batch"]) for r in runs] == [("fp32", 1), ("fp32", 2)]
    for r in runs:
        fused = r["steps"]["fused"]
        assert fused["logit_error"]["rel_rms"] < 1e-5 and fused["agreement_with_unfused"] == 1.0
    assert "| fused " in run.stdout


@pytest.mark.skipif(INTERPRETER_PROBLEM is not None, reason=str(INTERPRETER_PROBLEM))
def test_bench_kernels_smoke():
    """Every kernel case once, tiny shapes, under the Triton interpreter (what the GPU run times).

    Skipped only on a GPU machine whose Triton interpreter cannot run the kernels (without a GPU conftest
    stops the whole run for that); the GPU run benchmarks them compiled.
    """
    run = subprocess.run([sys.executable, "-m", "benchmarks.bench_kernels", "--smoke"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for kernel in ("layer_norm", "add_layer_norm", "bias_gelu", "prefill", "decode", "ln_qkv_append",
                   "attention_residual", "ln_linear_gelu", "linear_residual", "ln_lm_head"):
        for dtype in ("fp16", "bf16", "fp32"):
            assert any(line.startswith(kernel + " ") and f" {dtype} " in line for line in run.stdout.splitlines())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpt2_bench_on_cuda_without_a_gpu_says_so(capsys):
    assert main(["bench", "--device", "cuda", "--sizes", "tiny"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_bound_probe_sustains_each_samples_fastest_kernel():
    """The sustained sample times the sample's fastest kernel sustained_calls times in a row, and only that one."""
    probe = BoundProbe(SIZES["tiny"], repeats=1, sustained_calls=4)
    assert len(probe.sustained_samples_ms) == 1
    calls = {"slow": 0, "fast": 0}

    def kernel(name: str, seconds: float):
        def run() -> None:
            calls[name] += 1
            time.sleep(seconds)
        return run

    probe.kernels = {"slow": kernel("slow", 0.02), "fast": kernel("fast", 0.002)}
    probe.sample(repeats=1)
    assert calls == {"slow": 2, "fast": 2 + 4}  # a warm-up and one timed call each, then the fast one 4 times
    assert 2.0 <= probe.sustained_samples_ms[-1] < 20.0
    result = probe.result()
    assert result.sustained_samples_ms == probe.sustained_samples_ms
    assert result.sustained_ms == statistics.median(probe.sustained_samples_ms)
    assert BoundProbe(SIZES["tiny"], repeats=1).result().sustained_ms is None  # not asked for


def test_bench_decoding_smoke(tmp_path):
    """Beam search against greedy and transformers, speculative decoding against the target alone, and the pair
    trained here, in seconds; the figures themselves are the benchmark's, not the test's."""
    run = subprocess.run([sys.executable, "-m", "benchmarks.bench_decoding", "--smoke", "--out", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "decoding.json").read_text())
    assert results["beams"]["identical_to_transformers"]
    assert set(results["beams"]["decode_ms"]) == {"greedy batch 4", "beam search 4", "transformers beam search 4"}
    pairs = results["speculative"]
    assert len(pairs) == 3 and "trained here" in pairs[-1]["pair"] and "stdlib-gpt2" in pairs[-1]["pair"]
    for pair in pairs:
        assert [run["batch"] for run in pair["runs"]] == [1, 2]
        assert all(run["identical_to_target"] and 0.0 <= run["acceptance"] <= 1.0 for run in pair["runs"])
    assert "acceptance is the number to watch" in (tmp_path / "decoding.md").read_text()


def test_bench_kv_cache_smoke(tmp_path):
    """Each cache dtype's decode steps, memory and logit error on the tiny shape, in seconds; where the C kernels are
    built every cache dtype they take runs on the C step, not the forward."""
    run = subprocess.run([sys.executable, "-m", "benchmarks.bench_kv_cache", "--smoke", "--out", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    [path] = tmp_path.glob("kv-cache-*.json")
    tiny = json.loads(path.read_text())["sizes"]["tiny"]
    assert tiny["cache_mb"] == {"fp32": 16.0, "bf16": 8.0, "fp16": 8.0}  # k and v, 2 layers, 16 x 1024 x 64
    runs = tiny["models"]["fp32"]["runs"]
    assert [(r["batch"], r["prompt_len"]) for r in runs] == [(1, 8), (1, 24), (2, 8), (2, 24)]
    c_step = {"fp32": build.library() is not None, "bf16": build.library() is not None,
              "fp16": build.f16_cache_available()}
    for r in runs:
        for name, cache in r["caches"].items():
            assert cache["step_ms"] > 0 and [len(repeat) for repeat in cache["step_ms_samples"]] == [3]
            assert cache["step"] == ("C step" if c_step[name] else "forward")
        assert r["caches"]["fp32"]["error_vs_fp32_cache"] is None
        assert 0 < r["caches"]["bf16"]["error_vs_fp32_cache"]["rel_rms"] < 1e-2
        assert 0 < r["caches"]["fp16"]["error_vs_fp32_cache"]["rel_rms"] < 1e-3
    if build.int8_available():
        for r in tiny["models"]["int8"]["runs"]:
            assert all(cache["error_vs_fp32_model"]["rel_rms"] < 0.05 for cache in r["caches"].values())
    markdown = path.with_suffix(".md").read_text()
    assert "Machine: " in markdown and "Random weights" in markdown and "| fp32 cache MB |" in markdown
