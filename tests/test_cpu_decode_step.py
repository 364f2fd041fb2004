"""A whole CPU fp32 decode step in one C call (gpt2/cpu_decode_step.py) against the model's forward over the same
cache: logits, the KV cache it writes, generation, bad input, where it must not apply, and changed weights.

Tolerance: as tests/test_decode_blocks.py (1e-5 of the logits' largest magnitude): the blocks run the same C code,
and the embeddings, the first LayerNorm and the lm_head differ from the forward's torch ops only in summation order.
"""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch

from gpt2 import dispatch
from gpt2.cpu import build
from gpt2.cpu.decode_step import CpuDecodeStep
from gpt2.dispatch import decode_one_token
from gpt2.decoding import prefill
from tests.checkpoints import engine_twin
from tests.test_decode_blocks import CONFIGS, assert_close, model_for

pytestmark = pytest.mark.skipif(build.unavailable_reason() is not None,
                                reason=f"C kernels unavailable: {build.unavailable_reason()}")


def prompts_of(lengths: list[int]) -> list[list[int]]:
    return [[(7 * i + j) % 500 for j in range(n)] for i, n in enumerate(lengths)]


def run_both(model, lengths: list[int], steps: int, max_len: int = 96) -> tuple:
    """Prefill ragged prompts into two caches, then `steps` decode steps on each with the same random tokens: one
    through the C step, one through the model's forward. Returns (C logits, forward logits, C cache, forward cache)."""
    generator = torch.Generator().manual_seed(5)
    with torch.inference_mode():
        fast_cache, forward_cache = model.new_cache(len(lengths), max_len), model.new_cache(len(lengths), max_len)
        step = CpuDecodeStep.build(model, fast_cache)
        assert step is not None
        prefill(model, fast_cache, prompts_of(lengths))
        prefill(model, forward_cache, prompts_of(lengths))
        fast, forward = [], []
        for _ in range(steps):
            tokens = torch.randint(0, model.config.vocab_size, (len(lengths),), generator=generator)
            fast.append(step(tokens))
            forward.append(decode_one_token(model, forward_cache, tokens))
        return torch.stack(fast), torch.stack(forward), fast_cache, forward_cache


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("lengths", [[5], [3, 17, 1], [4, 8, 15, 16, 23, 42, 1, 2, 3, 5, 8, 13, 21],
                                     list(range(1, 17))])  # batch 1, 3, 13 and 16 (the most rows it takes)
def test_matches_the_models_forward(config, lengths):
    """20 decode steps past ragged prompts: logits, each row's cached keys and values, and the rows' lengths."""
    fast, forward, fast_cache, forward_cache = run_both(model_for(config), lengths, 20)
    assert_close(fast, forward)
    assert fast_cache.lengths == forward_cache.lengths == [n + 20 for n in lengths]
    assert_close(fast_cache.k, forward_cache.k)
    assert_close(fast_cache.v, forward_cache.v)


def test_generation_runs_on_it_and_is_unchanged(monkeypatch):
    """Greedy and sampled generation through the C step give the tokens of the forward's decode loop."""
    model = model_for("96x2")
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13]]
    built = []
    build = CpuDecodeStep.build
    monkeypatch.setattr(CpuDecodeStep, "build", staticmethod(lambda *a: built.append(build(*a)) or built[-1]))
    greedy = model.generate(prompts, max_new_tokens=12, eos_token_id=None)
    sampled = model.generate(prompts, max_new_tokens=12, eos_token_id=None, do_sample=True, top_k=20, seed=3)
    assert len(built) == 2 and None not in built
    monkeypatch.setattr(CpuDecodeStep, "build", staticmethod(lambda *a: None))
    assert model.generate(prompts, max_new_tokens=12, eos_token_id=None) == greedy
    assert model.generate(prompts, max_new_tokens=12, eos_token_id=None, do_sample=True, top_k=20, seed=3) == sampled


def test_bad_tokens_and_a_full_cache_are_refused_and_change_nothing():
    model = model_for("64x4")
    with torch.inference_mode():
        cache = model.new_cache(2, 6)
        step = CpuDecodeStep.build(model, cache)
        prefill(model, cache, [[1, 2, 3], [4, 5]])
        k_before = cache.k.clone()
        for tokens, message in [(torch.tensor([7, 500]), "token id 500 is outside the vocabulary"),
                                (torch.tensor([-1, 7]), "token id -1 is outside the vocabulary"),
                                (torch.tensor([7, 8, 9]), "3 int64 ids|must be 2 int64 ids"),
                                (torch.tensor([7.0, 8.0]), "must be 2 int64 ids")]:
            with pytest.raises(ValueError, match=message):
                step(tokens)
            assert cache.lengths == [3, 2]
            assert torch.equal(cache.k, k_before)
        for _ in range(3):
            step(torch.tensor([7, 8]))
        with pytest.raises(ValueError, match="KV cache full: a row holds 6 of 6 tokens"):
            step(torch.tensor([7, 8]))
        assert cache.lengths == [6, 5]


def test_applies_only_where_it_can():
    model = model_for("64x4")
    with torch.inference_mode():
        assert CpuDecodeStep.build(model, model.new_cache(16, 8)) is not None
        assert CpuDecodeStep.build(model, model.new_cache(17, 8)) is None  # past the small-batch kernel's rows
        assert isinstance(dispatch.decode_step_for(model, model.new_cache(16, 8)), CpuDecodeStep)
        assert not isinstance(dispatch.decode_step_for(model, model.new_cache(17, 8)), CpuDecodeStep)
        model.lm_head = torch.nn.Linear(64, 500)  # an lm_head with a bias
        assert CpuDecodeStep.build(model, model.new_cache(1, 8)) is None
        model.lm_head = None
        # Swapped by hand, not with monkeypatch: undoing a monkeypatched nn.Parameter deletes it under pytest 9.2.
        contiguous = model.wpe.weight
        model.wpe.weight = torch.nn.Parameter(contiguous.detach().t().contiguous().t())
        try:
            assert CpuDecodeStep.build(model, model.new_cache(1, 8)) is None  # a strided embedding
        finally:
            model.wpe.weight = contiguous
        assert model.wpe.weight is contiguous
    model.train().requires_grad_()  # autograd needs torch's ops
    assert CpuDecodeStep.build(model, model.new_cache(1, 8)) is None


def test_an_lm_head_of_its_own_is_used():
    """An untied lm_head without a bias (a checkpoint's own lm_head.weight) is the step's, not wte."""
    model = model_for("128x2")
    model.lm_head = torch.nn.Linear(128, 500, bias=False)
    fast, forward, _, _ = run_both(model, [4, 9], 5)
    assert_close(fast, forward)


needs_int8_step = pytest.mark.skipif(not build.int8_available(), reason="no avx512_vnni on this CPU")


def int8_model(name: str) -> torch.nn.Module:
    from gpt2.cpu.int8_linear import quantize_int8

    return quantize_int8(model_for(name))


@pytest.mark.skipif(build.int8_available(), reason="this CPU runs the int8 step")
def test_an_int8_model_keeps_the_forward_without_vnni():
    from gpt2.cpu.int8_linear import int8_available

    if not int8_available():
        pytest.skip("no int8 kernels in this torch")
    with torch.inference_mode():
        assert CpuDecodeStep.build(int8_model("64x4"), model_for("64x4").new_cache(1, 8)) is None


@needs_int8_step
@pytest.mark.parametrize("config", ["64x4", "128x2"])
def test_int8_step_is_the_forwards_at_one_row(config):
    """At one row the step quantizes each matmul's input as fbgemm does the whole input, so its logits and cache are
    the int8 forward's up to summation order (the tolerance of the fp32 step)."""
    fast, forward, fast_cache, forward_cache = run_both(int8_model(config), [7], 12)
    assert_close(fast, forward)
    assert_close(fast_cache.k, forward_cache.k)
    assert_close(fast_cache.v, forward_cache.v)


@needs_int8_step
def test_int8_step_of_many_rows_is_as_near_fp32_as_the_forward():
    """With more rows each gets its own activation scale where fbgemm shares one: its logits' relative RMS error
    against the fp32 model's is held to 1.1x the int8 forward's (measured 0.99x at 4 rows on DialoGPT-small's shape);
    the rows' lengths and the argmax agree as the forward's do."""
    lengths = [3, 17, 1, 9]
    fp32 = model_for("128x2")
    fast, forward, fast_cache, _ = run_both(int8_model("128x2"), lengths, 10)
    _, exact, _, _ = run_both(fp32, lengths, 10)
    assert fast_cache.lengths == [n + 10 for n in lengths]
    assert rel_rms(fast, exact) <= 1.1 * rel_rms(forward, exact)
    assert rel_rms(fast, exact) < 0.1
    agreement = [(logits.argmax(-1) == exact.argmax(-1)).float().mean().item() for logits in (fast, forward)]
    assert agreement[0] >= agreement[1] - 0.1


@needs_int8_step
def test_int8_generation_runs_on_it(monkeypatch):
    model = int8_model("64x4")
    built = []
    build = CpuDecodeStep.build
    monkeypatch.setattr(CpuDecodeStep, "build", staticmethod(lambda *a: built.append(build(*a)) or built[-1]))
    out = model.generate([[1, 2, 3], [4, 5]], max_new_tokens=6, eos_token_id=None)
    assert [len(row) for row in out] == [6, 6] and len(built) == 1 and built[0] is not None
    with torch.inference_mode():
        assert CpuDecodeStep.build(int8_model("96x2"), model_for("96x2").new_cache(1, 8)) is None  # 96 % 64


def forward_logits(model, lengths: list[int], tokens: torch.Tensor) -> torch.Tensor:
    """One decode step past the prompts of lengths through the model's forward."""
    with torch.inference_mode():
        cache = model.new_cache(len(lengths), 32)
        prefill(model, cache, prompts_of(lengths))
        return decode_one_token(model, cache, tokens)


@pytest.mark.parametrize("how", ["new parameter", "new data"])
def test_weights_are_read_when_it_is_built(how):
    """A weight replaced after the step was built is not used by it, nor freed under it; the next one uses it."""
    model = model_for("64x4")
    lengths, tokens = [3, 5], torch.tensor([1, 2])
    original, replacement = model.wte.weight.detach().clone(), torch.randn(500, 64)
    with torch.inference_mode():
        cache = model.new_cache(2, 32)
        step = CpuDecodeStep.build(model, cache)
        prefill(model, cache, prompts_of(lengths))
    with torch.no_grad():
        if how == "new parameter":
            model.wte.weight = torch.nn.Parameter(replacement)
        else:
            model.wte.weight.data = replacement
    with torch.inference_mode():
        stale = step(tokens)
        fresh = CpuDecodeStep.build(model, model.new_cache(2, 32))
    changed = forward_logits(model, lengths, tokens)
    model.wte.weight = torch.nn.Parameter(original)
    assert_close(stale, forward_logits(model, lengths, tokens))  # the weights as they were when it was built
    assert fresh is not None and (changed - stale).abs().max() > 1e-3



needs_bf16 = pytest.mark.skipif(not build.bf16_available(), reason="no avx512_bf16 on this CPU")


def rel_rms(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approx.float() - exact).norm() / exact.norm()).item()


def bf16_decode(model, token_ids: torch.Tensor, prompt_len: int, c_step: bool) -> torch.Tensor:
    """Logits (B, T - prompt_len + 1, V) of a prefill of prompt_len tokens, then one decode step per further token,
    through the C step or the model's forward."""
    with torch.inference_mode():
        cache = model.new_cache(token_ids.shape[0], token_ids.shape[1])
        step = CpuDecodeStep.build(model, cache) if c_step else partial(decode_one_token, model, cache)
        assert step is not None
        logits = [prefill(model, cache, token_ids[:, :prompt_len].tolist())]
        logits += [step(token_ids[:, t]) for t in range(prompt_len, token_ids.shape[1])]
    return torch.stack(logits, dim=1)


@needs_bf16
@pytest.mark.parametrize("packed", [True, False])
def test_bf16_step_is_as_near_fp32_as_torchs_bf16(reference_model, token_ids, packed):
    """The bound of tests/test_packed_linear.py: the logits' relative RMS error against the fp32 reference at most twice
    that of transformers' model cast to bf16. The C step rounds less than torch's bf16 ops (its residual stream stays
    fp32), so it is nearer than the forward's bf16 decode steps; both are held to that bound."""
    from gpt2.cpu.bf16_linear import pack_bf16

    prompt_len = 4
    model = engine_twin(reference_model).to(torch.bfloat16)
    if packed:
        model = pack_bf16(model)
    with torch.inference_mode():
        exact = reference_model(token_ids).logits[:, prompt_len - 1:]  # (2, T - 3, V)
        torch_bf16 = copy.deepcopy(reference_model).to(torch.bfloat16)(token_ids).logits[:, prompt_len - 1:]
    ours = bf16_decode(model, token_ids, prompt_len, c_step=True)
    forward = bf16_decode(model, token_ids, prompt_len, c_step=False)
    assert ours.dtype == torch.bfloat16
    assert rel_rms(ours, exact) <= 2 * rel_rms(torch_bf16, exact)
    assert rel_rms(ours, exact) <= rel_rms(forward, exact)
    assert (ours.argmax(-1) == exact.argmax(-1)).float().mean().item() > 0.9


@needs_bf16
def test_bf16_generation_runs_on_it(reference_model, monkeypatch):
    from gpt2.cpu.bf16_linear import pack_bf16

    model = pack_bf16(engine_twin(reference_model).to(torch.bfloat16))
    built = []
    build = CpuDecodeStep.build
    monkeypatch.setattr(CpuDecodeStep, "build", staticmethod(lambda *a: built.append(build(*a)) or built[-1]))
    out = model.generate([[1, 2, 3], [4, 5]], max_new_tokens=6, eos_token_id=None)
    assert [len(row) for row in out] == [6, 6] and len(built) == 1 and built[0] is not None
