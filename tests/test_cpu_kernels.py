"""How the C kernels (gpt2/cpu_kernels.py, gpt2/csrc/) are built, cached, and reported when they cannot be used:
each way they can be unavailable leaves the model on torch's ops, with the reason."""

from __future__ import annotations

import platform
import shutil
import subprocess

import pytest
import torch

from gpt2 import cpu_kernels, small_batch_matmul

needs_kernels = pytest.mark.skipif(cpu_kernels.unavailable_reason() is not None,
                                   reason=f"C kernels unavailable: {cpu_kernels.unavailable_reason()}")


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """An empty engine cache and no loaded library; the process's library is restored afterwards."""
    monkeypatch.setenv("GPT2_ENGINE_CACHE", str(tmp_path))
    cpu_kernels._load.cache_clear()
    yield tmp_path
    monkeypatch.undo()
    cpu_kernels._load.cache_clear()


def test_turned_off_by_environment(fresh_build, monkeypatch):
    monkeypatch.setenv("GPT2_CPU_KERNEL", "0")
    assert cpu_kernels.unavailable_reason() == "turned off by GPT2_CPU_KERNEL=0"
    assert not small_batch_matmul.applies(torch.randn(1, 32), torch.randn(64, 32), None)
    assert "torch's ops and oneDNN (the C kernels are unavailable: turned off" in cpu_kernels.status()


@needs_kernels
def test_no_compiler_is_reported(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler-xyz")
    assert "no C compiler found ('no-such-compiler-xyz'" in cpu_kernels.unavailable_reason()


@needs_kernels
def test_failed_compile_is_reported_and_leaves_nothing(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    assert "compiling csrc/*.c with" in cpu_kernels.unavailable_reason()
    assert not list((fresh_build / "kernels").glob("*.so"))


@needs_kernels
def test_unwritable_cache_is_reported(fresh_build, monkeypatch):
    blocker = fresh_build / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("GPT2_ENGINE_CACHE", str(blocker))
    assert "cannot build or load" in cpu_kernels.unavailable_reason()
    assert not small_batch_matmul.applies(torch.randn(1, 32), torch.randn(64, 32), None)  # oneDNN then, no error


@needs_kernels
def test_built_once_then_loaded_from_the_cache(fresh_build):
    assert cpu_kernels.unavailable_reason() is None
    assert cpu_kernels.compile_seconds() > 0
    assert "built in" in cpu_kernels.status()
    assert len(list((fresh_build / "kernels").glob("cpu_kernels-*.so"))) == 1
    cpu_kernels._load.cache_clear()
    assert cpu_kernels.unavailable_reason() is None
    assert cpu_kernels.compile_seconds() == 0.0
    assert "loaded from the cache" in cpu_kernels.status()


@needs_kernels
def test_a_changed_source_builds_a_new_library(fresh_build, monkeypatch, tmp_path_factory):
    """The library's name hashes every file of csrc/, headers included: an edited header is never served stale."""
    cpu_kernels.library()
    sources = tmp_path_factory.mktemp("csrc")
    for path in cpu_kernels.SOURCE_DIR.iterdir():
        (sources / path.name).write_bytes(path.read_bytes())
    (sources / "simd_math.h").write_text((sources / "simd_math.h").read_text() + "\n/* edited */\n")
    monkeypatch.setattr(cpu_kernels, "SOURCE_DIR", sources)
    cpu_kernels._load.cache_clear()
    assert cpu_kernels.unavailable_reason() is None
    assert len(list((fresh_build / "kernels").glob("cpu_kernels-*.so"))) == 2


def test_instruction_set_follows_the_cpu_flags(fresh_build, monkeypatch):
    """AVX-512 where the CPU has it, else AVX2 with FMA; a CPU with neither keeps torch's ops and says why."""
    for flags, expected in [({"avx512f", "avx2", "fma"}, "AVX-512"), ({"avx2", "fma"}, "AVX2"), ({"avx2"}, None),
                            ({"sse4_2", "fma"}, None)]:
        monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert cpu_kernels.instruction_set() == expected
    cpu_kernels._load.cache_clear()
    assert "this CPU has neither AVX-512 nor AVX2 with FMA" in cpu_kernels.unavailable_reason()


def test_block_shapes_follow_the_cpu(monkeypatch):
    """Zen 5 (AMD family 26) gets its own one-row block shape; another CPU (Zen 4 and Intel too: their one W row a
    block is the default) and an unreadable /proc/cpuinfo none."""
    for info, expected in [({"vendor_id": "AuthenticAMD", "cpu family": "26"}, ["-DSHAPE_1=8,1"]),
                           ({"vendor_id": "AuthenticAMD", "cpu family": "25"}, []),
                           ({"vendor_id": "AuthenticAMD", "cpu family": "23"}, []),
                           ({"vendor_id": "GenuineIntel", "cpu family": "6"}, []), ({}, [])]:
        monkeypatch.setattr(cpu_kernels, "cpu_info", lambda info=info: info)
        assert cpu_kernels.tuned_flags() == expected


@pytest.mark.skipif(shutil.which("cc") is None or platform.machine() not in ("x86_64", "AMD64"),
                    reason="needs a C compiler for x86-64")
@pytest.mark.parametrize("tuned", [[], *cpu_kernels.TUNED_FLAGS.values()], ids=" ".join)
@pytest.mark.parametrize("isa", sorted(cpu_kernels.ISA_FLAGS))
def test_every_instruction_set_compiles(isa, tuned, tmp_path):
    """Both builds, with each CPU's block shapes, compile on any machine, whichever one it runs: a CPU of the other
    kind would otherwise be the first to see an error in that build's half of csrc/simd.h (compiling only; a CPU
    without AVX-512 cannot run it)."""
    command = ["cc", *cpu_kernels.FLAGS, *cpu_kernels.ISA_FLAGS[isa], *tuned, "-Wall", "-Wextra", "-Werror",
               *map(str, cpu_kernels._sources()), "-o", str(tmp_path / "kernels.so")]
    run = subprocess.run(command, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
