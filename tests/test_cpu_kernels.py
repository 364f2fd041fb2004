"""How the C kernels (gpt2/build.py, gpt2/cpu/csrc/) are built, cached, and reported when they cannot be used:
each way they can be unavailable leaves the model on torch's ops, with the reason."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import gpt2
from gpt2.cpu import build, small_batch_matmul

needs_kernels = pytest.mark.skipif(build.unavailable_reason() is not None,
                                   reason=f"C kernels unavailable: {build.unavailable_reason()}")


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """An empty engine cache and no loaded library; the process's library is restored afterwards."""
    monkeypatch.setenv("GPT2_ENGINE_CACHE", str(tmp_path))
    build._load.cache_clear()
    yield tmp_path
    monkeypatch.undo()
    build._load.cache_clear()


@pytest.fixture(scope="module")
def verified_library(tmp_path_factory) -> Path:
    """The real library and its sha256 sidecar, built once for this module: tests copy them rather than build."""
    cache = tmp_path_factory.mktemp("verified-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GPT2_ENGINE_CACHE", str(cache))
        build._load.cache_clear()
        reason = build.unavailable_reason()
    build._load.cache_clear()
    assert reason is None, reason
    (library,) = (cache / "kernels").glob("cpu_kernels-*.so")
    return library


def copy_into_cache(library: Path, cache: Path) -> Path:
    """library and its sidecar copied into cache's kernels directory (made 0700); the copy of library."""
    kernels = cache / "kernels"
    kernels.mkdir(mode=0o700, exist_ok=True)
    for path in (library, build.sha256_sidecar(library)):
        shutil.copy2(path, kernels / path.name)
    return kernels / library.name


def compile_planted_library(source: str, destination: Path) -> None:
    """A stand-in shared library built from source, put where the cache expects the kernels."""
    c_file = destination.with_name("planted.c")
    c_file.write_text(source)
    subprocess.run(["cc", "-shared", "-fPIC", str(c_file), "-o", str(destination)], check=True)
    c_file.unlink()


def reason_and_warnings() -> tuple[str | None, list[warnings.WarningMessage]]:
    """unavailable_reason() (the first load of the kernels) and the warnings that load gave."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        reason = build.unavailable_reason()
    return reason, record


def one_fallback_warning(record: list[warnings.WarningMessage]) -> str:
    """The message of the single fallback warning in record, checked to be one line."""
    messages = [str(w.message) for w in record if "C kernels unavailable" in str(w.message)]
    assert len(messages) == 1, messages
    assert "\n" not in messages[0] and messages[0].endswith("; using torch's ops"), messages[0]
    return messages[0]


def test_turned_off_by_environment(fresh_build, monkeypatch):
    monkeypatch.setenv("GPT2_CPU_KERNEL", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a deliberate choice: no warning
        assert build.unavailable_reason() == "turned off by GPT2_CPU_KERNEL=0"
    assert not small_batch_matmul.applies(torch.randn(1, 32), torch.randn(64, 32), None)
    assert "torch's ops and oneDNN (the C kernels are unavailable: turned off" in build.status()


@needs_kernels
def test_no_compiler_is_reported(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler-xyz")
    reason, record = reason_and_warnings()
    assert "no C compiler found ('no-such-compiler-xyz'" in reason
    assert "no C compiler found" in one_fallback_warning(record)


@needs_kernels
def test_failed_compile_is_reported_and_leaves_nothing(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    reason, record = reason_and_warnings()
    assert "compiling csrc/*.c with" in reason
    assert "compiling csrc/*.c with" in one_fallback_warning(record)
    assert not list((fresh_build / "kernels").iterdir())


@needs_kernels
def test_unwritable_cache_is_reported(fresh_build, monkeypatch):
    blocker = fresh_build / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("GPT2_ENGINE_CACHE", str(blocker))
    reason, record = reason_and_warnings()
    assert "cannot build or load" in reason
    assert "cannot build or load" in one_fallback_warning(record)
    assert not small_batch_matmul.applies(torch.randn(1, 32), torch.randn(64, 32), None)  # oneDNN then, no error


@needs_kernels
def test_built_once_then_loaded_from_the_cache(fresh_build):
    assert build.unavailable_reason() is None
    assert build.compile_seconds() > 0
    assert "built in" in build.status()
    (library,) = (fresh_build / "kernels").glob("cpu_kernels-*.so")
    assert build.is_verified(library)
    build._load.cache_clear()
    assert build.unavailable_reason() is None
    assert build.compile_seconds() == 0.0
    assert "loaded from the cache" in build.status()


@needs_kernels
def test_a_changed_source_builds_a_new_library(fresh_build, monkeypatch, tmp_path_factory):
    """The library's name hashes every file of csrc/, headers included: an edited header is never served stale."""
    build.library()
    sources = tmp_path_factory.mktemp("csrc")
    for path in build.SOURCE_DIR.iterdir():
        (sources / path.name).write_bytes(path.read_bytes())
    (sources / "simd_math.h").write_text((sources / "simd_math.h").read_text() + "\n/* edited */\n")
    monkeypatch.setattr(build, "SOURCE_DIR", sources)
    build._load.cache_clear()
    assert build.unavailable_reason() is None
    assert len(list((fresh_build / "kernels").glob("cpu_kernels-*.so"))) == 2


@needs_kernels
def test_only_a_library_with_its_recorded_sha256_is_verified(verified_library, tmp_path):
    library = copy_into_cache(verified_library, tmp_path)
    assert build.is_verified(library)
    library.write_bytes(library.read_bytes()[:4096])  # truncated
    assert not build.is_verified(library)
    library = copy_into_cache(verified_library, tmp_path)
    build.sha256_sidecar(library).unlink()  # built before sha256s were recorded, or killed between the moves
    assert not build.is_verified(library)
    library.unlink()
    assert not build.is_verified(library)


@needs_kernels
def test_a_truncated_library_is_rebuilt(verified_library, tmp_path):
    """A library cut short (a killed build, a full disk) once crashed every later run with a bus error in dlopen;
    now it fails its sha256 and is rebuilt. In a new process: a crash there cannot take pytest with it."""
    library = copy_into_cache(verified_library, tmp_path)
    library.write_bytes(library.read_bytes()[:20000])
    check = ("from gpt2.cpu import build; "
             "print(build.unavailable_reason(), build.compile_seconds() > 0)")
    run = subprocess.run([sys.executable, "-W", "error", "-c", check], capture_output=True, text=True,
                         env={**os.environ, "GPT2_ENGINE_CACHE": str(tmp_path)}, cwd=Path(__file__).parent.parent)
    assert run.returncode == 0, f"exit status {run.returncode}: {run.stderr[-2000:]}"
    assert run.stdout.split() == ["None", "True"]
    assert build.is_verified(library)


@needs_kernels
def test_a_planted_library_is_not_loaded(fresh_build, verified_library):
    """A library put under the kernels' name, beside their recorded sha256, is rebuilt before anything loads it: its
    constructor never runs."""
    library = copy_into_cache(verified_library, fresh_build)
    marker = fresh_build / "constructor-ran"
    compile_planted_library('#include <stdio.h>\n__attribute__((constructor)) static void planted(void) '
                            f'{{ FILE *f = fopen("{marker}", "w"); if (f) fclose(f); }}\n', library)
    assert build.unavailable_reason() is None
    assert build.compile_seconds() > 0
    assert not marker.exists()
    assert build.is_verified(library)


@needs_kernels
def test_a_library_lacking_a_kernel_falls_back_to_torch(fresh_build, verified_library, checkpoints):
    """A library whose recorded sha256 matches but which lacks a function the engine calls leaves the model on torch's
    ops with one warning, not an AttributeError out of generation."""
    library = copy_into_cache(verified_library, fresh_build)
    compile_planted_library("int small_batch_matmul_f32(void) { return 0; }\n", library)
    build.sha256_sidecar(library).write_text(build._sha256(library))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = gpt2.load(checkpoints["hf-safetensors"])
        tokens = model.generate([[15496, 995]], max_new_tokens=3, eos_token_id=None)
    assert len(tokens[0]) == 3
    assert "lacks a kernel this engine calls" in build.unavailable_reason()
    assert "lacks a kernel this engine calls" in one_fallback_warning(record)
    assert build.library() is None


@needs_kernels
def test_the_kernel_cache_is_created_private(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "false")  # a failing compile: the directory is made, and no time spent building
    reason_and_warnings()
    assert (fresh_build / "kernels").stat().st_mode & 0o777 == 0o700


@needs_kernels
def test_a_kernel_cache_open_to_others_is_made_private(fresh_build, verified_library):
    copy_into_cache(verified_library, fresh_build)
    (fresh_build / "kernels").chmod(0o777)
    assert build.unavailable_reason() is None
    assert build.compile_seconds() == 0.0  # the verified library, loaded from the cache
    assert (fresh_build / "kernels").stat().st_mode & 0o777 == 0o700


@needs_kernels
def test_a_kernel_cache_of_another_user_is_refused(fresh_build, verified_library, monkeypatch):
    """Whoever owns the directory can put code in it: a verified library there is refused all the same."""
    copy_into_cache(verified_library, fresh_build)
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(fresh_build).st_uid + 1)  # so the directory is another's
    reason, record = reason_and_warnings()
    assert reason is not None and "is owned by uid" in reason and "refusing to load" in reason
    assert "is owned by uid" in one_fallback_warning(record)
    assert build.library() is None


@needs_kernels
def test_a_kernel_cache_that_is_a_symlink_is_refused(fresh_build, verified_library, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    copy_into_cache(verified_library, elsewhere)
    (fresh_build / "kernels").symlink_to(elsewhere / "kernels")
    reason, record = reason_and_warnings()
    assert reason is not None and "is a symlink" in reason
    assert "is a symlink" in one_fallback_warning(record)


def test_instruction_set_follows_the_cpu_flags(fresh_build, monkeypatch):
    """AVX-512 where the CPU has it, else AVX2 with FMA; a CPU with neither keeps torch's ops and says why."""
    for flags, expected in [({"avx512f", "avx2", "fma"}, "AVX-512"), ({"avx2", "fma"}, "AVX2"), ({"avx2"}, None),
                            ({"sse4_2", "fma"}, None)]:
        monkeypatch.setattr(build, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert build.instruction_set() == expected
    build._load.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the CPU's limit, not a fault: no warning
        assert "this CPU has neither AVX-512 nor AVX2 with FMA" in build.unavailable_reason()


def test_block_shapes_follow_the_cpu(monkeypatch):
    """Zen 5 (AMD family 26) gets its own one-row block shape; another CPU (Zen 4 and Intel too: their one W row a
    block is the default) and an unreadable /proc/cpuinfo none."""
    for info, expected in [({"vendor_id": "AuthenticAMD", "cpu family": "26"}, ["-DSHAPE_1=8,1"]),
                           ({"vendor_id": "AuthenticAMD", "cpu family": "25"}, []),
                           ({"vendor_id": "AuthenticAMD", "cpu family": "23"}, []),
                           ({"vendor_id": "GenuineIntel", "cpu family": "6"}, []), ({}, [])]:
        monkeypatch.setattr(build, "cpu_info", lambda info=info: info)
        assert build.tuned_flags() == expected


@pytest.mark.skipif(shutil.which("cc") is None or platform.machine() not in ("x86_64", "AMD64"),
                    reason="needs a C compiler for x86-64")
@pytest.mark.parametrize("tuned", [[], *build.TUNED_FLAGS.values()], ids=" ".join)
@pytest.mark.parametrize("isa", sorted(build.ISA_FLAGS))
def test_every_instruction_set_compiles(isa, tuned, tmp_path):
    """Both builds, with each CPU's block shapes, compile on any machine, whichever one it runs: a CPU of the other
    kind would otherwise be the first to see an error in that build's half of csrc/simd.h (compiling only; a CPU
    without AVX-512 cannot run it)."""
    command = ["cc", *build.FLAGS, *build.ISA_FLAGS[isa], *tuned, "-Wall", "-Wextra", "-Werror",
               *map(str, build._sources()), "-o", str(tmp_path / "kernels.so")]
    run = subprocess.run(command, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
