"""Generation semantics beyond greedy parity: seeded sampling, the sampling filters, bad parameters, limits."""

from __future__ import annotations

import pytest
import torch

from gpt2 import GPT2, GPT2Config
from gpt2.sampling import NGramBans, SamplingParams, apply_top_p, choose_next

CONFIG = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=50257)


@pytest.fixture(scope="module")
def model() -> GPT2:
    torch.manual_seed(0)
    return GPT2(CONFIG).eval()


PROMPTS = [[464, 3290, 318], [40, 588, 257, 1310, 11, 290]]


def test_sampling_is_reproducible_with_a_seed(model):
    kwargs = dict(max_new_tokens=12, do_sample=True, top_k=50, top_p=0.95, temperature=0.9, eos_token_id=None)
    a = model.generate(PROMPTS, seed=123, **kwargs)
    b = model.generate(PROMPTS, seed=123, **kwargs)
    c = model.generate(PROMPTS, seed=124, **kwargs)
    assert a == b
    assert a != c


def test_top_k_one_and_tiny_top_p_equal_greedy(model):
    greedy = model.generate(PROMPTS, max_new_tokens=10, eos_token_id=None)
    assert model.generate(PROMPTS, max_new_tokens=10, do_sample=True, top_k=1, seed=0, eos_token_id=None) == greedy
    assert model.generate(PROMPTS, max_new_tokens=10, do_sample=True, top_p=1e-6, seed=0, eos_token_id=None) == greedy


def test_tensor_prompts_and_on_token_stream(model):
    seen: list[tuple[int, int]] = []
    out = model.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=5, eos_token_id=None,
                         on_token=lambda row, tok: seen.append((row, tok)))
    assert [tok for _, tok in seen] == out[0] and len(out[0]) == 5


def test_min_new_tokens_forbids_early_eos(model):
    first = model.generate([PROMPTS[0]], max_new_tokens=1, eos_token_id=None)[0][0]
    out = model.generate([PROMPTS[0]], max_new_tokens=6, min_new_tokens=4, eos_token_id=first)[0]
    assert first not in out[:4]


def test_top_p_filter_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    probs = logits.softmax(-1)  # ~[0.03, 0.64, 0.24, 0.09]
    kept = ~torch.isinf(apply_top_p(logits, 0.8))
    assert kept.tolist() == [[False, True, True, False]]
    assert probs[kept].sum() >= 0.8


@pytest.mark.parametrize("top_k, top_p, allowed", [(2, 1.0, {1, 2}), (3, 0.8, {1, 2}), (0, 0.8, {1, 2}),
                                                    (1, 1.0, {1}), (0, 1.0, {0, 1, 2, 3})])
def test_sampling_draws_only_what_top_k_and_top_p_keep(top_k, top_p, allowed):
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]]).repeat(400, 1)  # 400 independent rows
    params = SamplingParams(do_sample=True, top_k=top_k, top_p=top_p)
    drawn = set(choose_next(logits, params, torch.Generator().manual_seed(0)).tolist())
    assert drawn == allowed


def test_per_row_random_streams_make_each_row_independent_of_the_others():
    logits = torch.randn(3, 50)  # (B, V)
    params = SamplingParams(do_sample=True, top_k=20)
    rows = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    together = choose_next(logits, params, rows([1, 2, 3]))
    alone = [choose_next(logits[i:i + 1], params, rows([s]))[0] for i, s in enumerate([1, 2, 3])]
    assert together.tolist() == [t.item() for t in alone]


def test_ngram_bans_track_each_row():
    bans = NGramBans(2, [[1, 2, 3, 1], [5, 5]])
    assert bans.banned(0) == [2]  # "1 2" seen: after 1, 2 is banned
    assert bans.banned(1) == [5]
    bans.append(0, 7)
    assert bans.banned(0) == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(do_sample=True, temperature=0.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(no_repeat_ngram_size=-2), "no_repeat_ngram_size"),
        (dict(min_new_tokens=-1), "min_new_tokens"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(eos_token_id=60000), "eos_token_id"),
    ],
)
def test_bad_parameters_are_refused_by_name(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model.generate(PROMPTS, **kwargs)


@pytest.mark.parametrize(
    "prompts, message",
    [
        ([], "empty"),
        ([[1, 2], []], "prompt 1 is empty"),
        ([[1, 50257]], "token id 50257 at index 1"),
        ([[-1]], "token id -1"),
        ("hello", "list of token-id lists"),
        (torch.ones(3, dtype=torch.long), "integer tensor"),
    ],
)
def test_bad_prompts_are_refused(model, prompts, message):
    with pytest.raises(ValueError, match=message):
        model.generate(prompts)


def test_context_limit_is_enforced_per_row(model):
    with pytest.raises(ValueError, match=r"prompt 1: 60 tokens \+ max_new_tokens 5 = 65 exceeds .*n_positions \(64\)"):
        model.generate([[1] * 10, [1] * 60], max_new_tokens=5)
    assert len(model.generate([[1] * 59], max_new_tokens=5, eos_token_id=None)[0]) == 5


def test_forward_longer_than_context_is_refused(model):
    with pytest.raises(ValueError, match="exceeds n_positions"):
        model(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(do_sample=True, temperature=float("inf")), "temperature=inf: must be a finite number"),
        (dict(do_sample=True, temperature=float("nan")), "temperature=nan: must be a finite number"),
        (dict(top_p=float("nan")), "top_p=nan"),
        (dict(repetition_penalty=float("inf")), "repetition_penalty=inf"),
        (dict(do_sample=True, seed=2**70), r"seed=1180591620717411303424 is outside .*\[-2\*\*63, 2\*\*64\)"),
        (dict(do_sample=True, seed=-(2**63) - 1), "seed=.* is outside"),
        (dict(do_sample=True, seed=1.5), "seed=1.5 must be an integer"),
    ],
)
def test_non_finite_and_out_of_range_settings_are_refused_before_any_work(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model.generate(PROMPTS, **kwargs)


def test_seeds_at_the_ends_of_torchs_range_are_taken(model):
    for seed in (-(2**63), 2**64 - 1):
        assert len(model.generate(PROMPTS, max_new_tokens=3, do_sample=True, seed=seed, eos_token_id=None)[0]) == 3


def test_a_tiny_temperature_samples_the_best_token(model):
    """Scaled before shifting, a temperature this small sends the best logit to +inf and softmax to NaN."""
    greedy = model.generate(PROMPTS, max_new_tokens=6, eos_token_id=None)
    assert model.generate(PROMPTS, max_new_tokens=6, do_sample=True, temperature=1e-40, seed=0,
                          eos_token_id=None) == greedy


def broken_copy(model: GPT2, dtype: torch.dtype, poison) -> GPT2:
    copy = GPT2(CONFIG).to(dtype).eval()
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        poison(copy)
    return copy


@pytest.mark.parametrize(
    "dtype, poison, where",
    [
        # A NaN weight in the last block reaches every logit from the first token on.
        (torch.float32, lambda m: m.h[-1].mlp.c_proj.bias.fill_(float("nan")), "the prompt's last token"),
        # fp16 weights of 1e4: the activations pass fp16's 65504 and the logits become NaN.
        (torch.float16, lambda m: m.h[0].mlp.c_fc.weight.uniform_(-1e4, 1e4, generator=torch.Generator().manual_seed(0)),
         "the prompt's last token"),
    ],
)
def test_nan_logits_raise_instead_of_returning_tokens(model, dtype, poison, where):
    from gpt2.decoding import NonFiniteLogitsError

    broken = broken_copy(model, dtype, poison)
    with pytest.raises(NonFiniteLogitsError, match=f"NaN or inf at {where} \\(rows 0, 1\\)"):
        broken.generate(PROMPTS, max_new_tokens=4)
    with pytest.raises(NonFiniteLogitsError, match="pair 0"):
        broken.score([PROMPTS[0]], [[1, 2]])


def test_nan_logits_mid_generation_name_the_decode_step(model):
    """Only the positions past the prompt are broken: the prefill's logits are fine, the first decode step's not."""
    from gpt2.decoding import NonFiniteLogitsError

    broken = broken_copy(model, torch.float32, lambda m: m.wpe.weight[2:].fill_(float("nan")))
    with pytest.raises(NonFiniteLogitsError, match=r"NaN or inf at decode step 1 \(row 0\)"):
        broken.generate([[464, 3290]], max_new_tokens=4, eos_token_id=None)


@pytest.mark.parametrize(
    "input_ids, message",
    [
        (torch.zeros(0, 1, dtype=torch.long), r"shape \(0, 1\) is empty"),
        (torch.zeros(1, 0, dtype=torch.long), r"shape \(1, 0\) is empty"),
        (torch.zeros(3, dtype=torch.long), r"\(batch, length\) tensor .* got \(3,\)"),
        (torch.zeros(1, 3), r"got \(1, 3\) torch.float32"),
        (torch.tensor([[1, 50257]]), r"token id 50257, outside the vocabulary \[0, 50257\)"),
        (torch.tensor([[-4, 1]]), "token id -4"),
    ],
)
def test_bad_forward_inputs_are_refused_by_name(model, input_ids, message):
    with pytest.raises(ValueError, match=message):
        model(input_ids)


def test_an_attribute_error_while_choosing_the_backend_is_not_hidden(model, monkeypatch):
    """nn.Module.__getattr__ turns an AttributeError escaping a property into "no attribute 'backend'"."""
    from gpt2 import model as model_module

    def broken_select(name, device):
        raise AttributeError("module 'gpt2_kernels' has no attribute 'interpreter_problem'")

    fresh = GPT2(CONFIG)
    monkeypatch.setattr(model_module, "select_backend", broken_select)
    with pytest.raises(RuntimeError, match="choosing the backend failed: AttributeError: module 'gpt2_kernels'"):
        fresh.backend  # noqa: B018
