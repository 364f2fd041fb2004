"""The CPU's C decode steps over a KV cache of another dtype than the model's (`gpt2.load(..., kv_dtype=...)`): the
fp32 and int8 steps over a bf16 or fp16 cache (csrc/decode_step_*_kv_*.c) against the model's forward over the same
cache, which rounds each key and value to the cache's dtype as it writes it and attends over them widened to fp32.

Tolerance: the two paths compute each key and value in fp32 up to summation order (as tests/test_cpu_decode_step.py's
fp32 step and forward, whose logits are 1e-5 of their largest magnitude apart at most). The few keys and values that
lie that close to a rounding boundary of the cache's dtype land on neighbouring values in the two caches, one ulp of
bf16 (at most 2^-7 relative) or fp16 (2^-10) apart: measured, up to 0.07% (bf16) and 0.5% (fp16) of the cached elements of
these tests. Those move the later layers' keys and values and the logits a little: measured, the caches' elements by
up to 0.3% (bf16) and 0.05% (fp16) of the largest one, the logits by up to 4.6e-5 of their largest magnitude (bf16,
n_embd 128, 16 rows). So the logits are held to 2e-4 of it, the caches to one ulp of their dtype at their largest
magnitude (2^-7 of it in bf16, 2^-10 in fp16) and to 1% of the cached elements differing at all.
"""

from __future__ import annotations

import pytest
import torch

import gpt2
from gpt2 import dispatch
from gpt2.cpu import build
from gpt2.cpu.decode_step import CpuDecodeStep
from gpt2.cpu.int8_linear import quantize_int8
from gpt2.decoding import prefill
from gpt2.dispatch import decode_one_token
from tests.decode_paths import use_path
from tests.test_decode_blocks import CONFIGS, model_for

pytestmark = pytest.mark.skipif(build.unavailable_reason() is not None,
                                reason=f"C kernels unavailable: {build.unavailable_reason()}")
needs_int8_step = pytest.mark.skipif(not build.int8_available(), reason="no avx512_vnni on this CPU")

KV_DTYPES = [torch.bfloat16, pytest.param(torch.float16, marks=pytest.mark.skipif(
    not build.f16_cache_available(), reason="the CPU cannot convert fp16 (no F16C)"))]
LOGITS_TOLERANCE = 2e-4  # of the logits' largest magnitude (see the module docstring)
DIFFERING_ELEMENTS = 1e-2  # of the cached keys or values at most (likewise)


def with_cache(model: gpt2.GPT2, kv_dtype: torch.dtype | None) -> gpt2.GPT2:
    model.kv_dtype = kv_dtype  # what gpt2.load(..., kv_dtype=...) sets
    return model


def int8_model(name: str, kv_dtype: torch.dtype | None) -> gpt2.GPT2:
    return with_cache(quantize_int8(model_for(name)), kv_dtype)


def prompts_of(lengths: list[int]) -> list[list[int]]:
    return [[(7 * i + j) % 500 for j in range(n)] for i, n in enumerate(lengths)]


def decode(model: gpt2.GPT2, lengths: list[int], steps: int, c_step: bool, max_len: int = 96) -> tuple:
    """Prefill ragged prompts through the forward, then `steps` decode steps of seeded random tokens through the C
    step or the forward. Returns (logits (steps, B, V), the cache)."""
    generator = torch.Generator().manual_seed(5)
    with torch.inference_mode():
        cache = model.new_cache(len(lengths), max_len)
        step = CpuDecodeStep.build(model, cache) if c_step else None
        assert (step is not None) == c_step
        prefill(model, cache, prompts_of(lengths))
        logits = []
        for _ in range(steps):
            tokens = torch.randint(0, model.config.vocab_size, (len(lengths),), generator=generator)
            logits.append(step(tokens) if c_step else decode_one_token(model, cache, tokens))
        return torch.stack(logits), cache


def assert_logits_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert (got - expected).abs().max().item() <= LOGITS_TOLERANCE * expected.abs().max().item()


def assert_cache_close(got: torch.Tensor, expected: torch.Tensor, lengths: list[int]) -> None:
    """got and expected (L, B, H, S, D) equal but for a few of the elements their rows hold (lengths), each at most one
    ulp of the cache's dtype at its largest magnitude apart: the flips themselves, and the later layers' keys and
    values they move."""
    assert got.dtype == expected.dtype and got.dtype in (torch.bfloat16, torch.float16)
    eps = torch.finfo(got.dtype).eps
    held = torch.arange(got.shape[3])[None, :] < torch.tensor(lengths)[:, None]  # (B, S)
    got, expected = got.float().transpose(2, 3)[:, held], expected.float().transpose(2, 3)[:, held]  # (L, N, H, D)
    apart = (got - expected).abs()
    assert apart.max() <= eps * expected.abs().max()
    assert apart.count_nonzero().item() <= DIFFERING_ELEMENTS * got.numel()


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("lengths", [[5], [3, 17, 1], list(range(1, 17))])  # batch 1, 3 and 16 (the most it takes)
def test_fp32_step_over_the_cache_is_the_forwards(kv_dtype, config, lengths):
    """20 decode steps past ragged prompts: logits, each row's cached keys and values, and the rows' lengths."""
    model = with_cache(model_for(config), kv_dtype)
    fast, fast_cache = decode(model, lengths, 20, c_step=True)
    forward, forward_cache = decode(model, lengths, 20, c_step=False)
    assert fast.dtype == torch.float32 and fast_cache.k.dtype == kv_dtype
    assert_logits_close(fast, forward)
    assert fast_cache.lengths == forward_cache.lengths == [n + 20 for n in lengths]
    assert_cache_close(fast_cache.k, forward_cache.k, fast_cache.lengths)
    assert_cache_close(fast_cache.v, forward_cache.v, fast_cache.lengths)


@needs_int8_step
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("config", ["64x4", "128x2"])
def test_int8_step_over_the_cache_is_the_forwards_at_one_row(kv_dtype, config):
    """At one row the int8 step's logits are the int8 forward's up to summation order (tests/test_cpu_decode_step.py),
    so over a bf16 or fp16 cache they are held as the fp32 step's."""
    model = int8_model(config, kv_dtype)
    fast, fast_cache = decode(model, [7], 12, c_step=True)
    forward, forward_cache = decode(model, [7], 12, c_step=False)
    assert_logits_close(fast, forward)
    assert_cache_close(fast_cache.k, forward_cache.k, fast_cache.lengths)
    assert_cache_close(fast_cache.v, forward_cache.v, fast_cache.lengths)


@needs_int8_step
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_int8_step_over_the_cache_of_ragged_rows_is_each_rows_alone(kv_dtype):
    """The int8 step quantizes each row's matmul inputs on its own, so a row of a ragged batch gets the logits and the
    cache it gets alone, which at one row are the forward's (above): each row against the forward of it alone."""
    model = int8_model("128x2", kv_dtype)
    lengths = [3, 17, 1, 9]
    fast, fast_cache = decode(model, lengths, 10, c_step=True)
    generator = torch.Generator().manual_seed(5)
    tokens = [torch.randint(0, model.config.vocab_size, (len(lengths),), generator=generator) for _ in range(10)]
    for row, length in enumerate(lengths):
        with torch.inference_mode():
            alone = model.new_cache(1, 96)
            prefill(model, alone, [prompts_of(lengths)[row]])
            forward = torch.stack([decode_one_token(model, alone, t[row:row + 1])[0] for t in tokens])
        assert_logits_close(fast[:, row], forward)
        assert fast_cache.lengths[row] == alone.lengths[0] == length + 10
        assert_cache_close(fast_cache.k[:, row:row + 1], alone.k, alone.lengths)
        assert_cache_close(fast_cache.v[:, row:row + 1], alone.v, alone.lengths)


def generations(model: gpt2.GPT2, path: str, monkeypatch: pytest.MonkeyPatch) -> tuple[list, list, dict]:
    """Greedy and sampled tokens of a ragged batch, decoded on path; and how many steps each path ran."""
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13]]
    with monkeypatch.context() as patch:
        steps = use_path(path, patch)
        greedy = model.generate(prompts, max_new_tokens=12, eos_token_id=None)
        sampled = model.generate(prompts, max_new_tokens=12, eos_token_id=None, do_sample=True, top_k=20, seed=3)
    return greedy, sampled, dict(steps)


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("kind", ["fp32", pytest.param("int8", marks=needs_int8_step)])
def test_generation_runs_on_the_c_step_and_is_the_forwards(kind, kv_dtype, monkeypatch):
    """Greedy and sampled generation over a bf16 or fp16 cache: every decode step on the C step, token for token the
    forward's decode loop over the same cache dtype."""
    model = int8_model("64x4", kv_dtype) if kind == "int8" else with_cache(model_for("64x4"), kv_dtype)
    *fast, fast_steps = generations(model, "c-step", monkeypatch)
    *forward, forward_steps = generations(model, "forward", monkeypatch)
    assert fast_steps == {"c-step": 2 * 11} and forward_steps == {"forward": 2 * 11}
    assert fast == forward


@pytest.mark.parametrize("quantize", [None, pytest.param("int8", marks=needs_int8_step)])
def test_a_loaded_model_with_a_bf16_cache_decodes_on_the_c_step(checkpoints, token_ids, quantize, monkeypatch):
    """gpt2.load(..., kv_dtype=torch.bfloat16) of an fp32 model or an int8 one: the decode loop's step is the C step,
    not the forward the cache's dtype once sent it to."""
    model = gpt2.load(checkpoints["hf-safetensors"], quantize=quantize, kv_dtype=torch.bfloat16)
    with torch.inference_mode():
        cache = model.new_cache(2, 16)
        step = dispatch.decode_step_for(model, cache)
    assert cache.k.dtype == torch.bfloat16 and isinstance(step, CpuDecodeStep)
    steps = use_path("c-step", monkeypatch)
    out = model.generate(token_ids[:, :5].tolist(), max_new_tokens=4, min_new_tokens=4)
    assert [len(row) for row in out] == [4, 4] and dict(steps) == {"c-step": 3}


@pytest.mark.parametrize("kind", ["fp32", pytest.param("int8", marks=needs_int8_step)])
def test_each_cache_dtype_gets_its_own_kernel_and_fp32_keeps_its_own(kind):
    """The model's own cache dtype (kv_dtype None or fp32) keeps the fp32 or int8 step as it was; bf16 and fp16
    caches get theirs. The kernels of the cache dtypes are distinct functions of the library."""
    model = int8_model("64x4", None) if kind == "int8" else model_for("64x4")
    own = "decode_step_int8" if kind == "int8" else "decode_step_f32"
    names = {None: own, torch.float32: own, torch.bfloat16: own + "_kv_bf16", torch.float16: own + "_kv_f16"}
    with torch.inference_mode():
        for kv_dtype, name in names.items():
            if kv_dtype == torch.float16 and not build.f16_cache_available():
                continue
            step = CpuDecodeStep.build(with_cache(model, kv_dtype), model.new_cache(2, 8))
            assert step is not None and step.kernel is getattr(build.library(), name)


def test_fp32_logits_are_unchanged_by_an_explicit_fp32_cache():
    """kv_dtype=torch.float32 on an fp32 model is no kv_dtype at all: the same step, bit for bit."""
    plain, _ = decode(with_cache(model_for("96x2"), None), [3, 17, 1], 8, c_step=True)
    explicit, _ = decode(with_cache(model_for("96x2"), torch.float32), [3, 17, 1], 8, c_step=True)
    assert torch.equal(plain, explicit)


def test_where_no_c_step_takes_the_cache_the_forward_runs(monkeypatch):
    """A bf16 model's step takes a bf16 cache only; an fp16 cache needs the CPU's fp16 conversions."""
    with torch.inference_mode():
        model = with_cache(model_for("64x4"), torch.float16)
        monkeypatch.setattr(build, "f16_cache_available", lambda: False)
        assert CpuDecodeStep.build(model, model.new_cache(1, 8)) is None
        assert not isinstance(dispatch.decode_step_for(model, model.new_cache(1, 8)), CpuDecodeStep)
        monkeypatch.undo()
        if build.bf16_available():
            bf16 = model_for("64x4").to(torch.bfloat16)
            assert CpuDecodeStep.build(with_cache(bf16, torch.bfloat16), bf16.new_cache(1, 8)) is not None
            assert CpuDecodeStep.build(with_cache(bf16, torch.float16), bf16.new_cache(1, 8)) is None
