"""Beam search against transformers' `generate(num_beams=...)` on the same fp32 weights: the same hypotheses, token
for token, for ragged batches (each prompt as transformers runs it alone), on every decode path.

Tolerances: beam scores within 1e-4 of transformers' and log-probabilities within 1e-4 of the log-softmax of its raw
logits (both fp32; the logits differ by accumulation-order rounding, ~1e-6, and a score sums at most 16 of them).
"""

from __future__ import annotations

import pytest
import torch

from gpt2 import GPT2Config
from gpt2.kv_cache import KVCache
from tests.checkpoints import engine_twin, make_reference_model
from tests.decode_paths import PATHS, use_path

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-4
# A small vocabulary and wte (the tied lm_head) doubled: random weights of GPT-2's scale give a near-uniform next-token
# distribution over 50257 tokens, where no beam ever ends early and the finished-hypotheses logic goes untested.
CONFIG = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=512, bos_token_id=511,
                    eos_token_id=511)
PROMPTS = [[46, 290, 318, 257], [40], [154, 11, 73, 389, 345, 30]]
N_NEW = 14


@pytest.fixture(scope="module")
def pair():
    reference = make_reference_model(CONFIG, seed=0)
    with torch.no_grad():
        reference.transformer.wte.weight.mul_(2.0)
    return reference, engine_twin(reference)


@pytest.fixture(scope="module")
def frequent_token(pair) -> int:
    """The eos for these tests: the fifth most likely first token of the first prompt, which beams take now and then,
    so that hypotheses end at eos mid-search under most settings (`test_the_settings_end_hypotheses_mid_search`)."""
    _, model = pair
    with torch.no_grad():
        return int(model(torch.tensor(PROMPTS[:1]))[0, -1].topk(5).indices[4])


def transformers_beams(reference, prompt: list[int], eos: int, **kwargs) -> tuple[list[list[int]], list[float],
                                                                                    list[list[float]]]:
    """transformers' returned hypotheses for prompt alone: (new tokens, scores, each token's raw log-probability)."""
    with torch.no_grad():
        out = reference.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=N_NEW, do_sample=False, eos_token_id=eos, pad_token_id=eos,
                                 return_dict_in_generate=True, output_scores=True, output_logits=True, **kwargs)
    sequences, logprobs = [], []
    for i in range(out.sequences.shape[0]):
        rows = out.beam_indices[i]
        n = int((rows >= 0).sum())  # the hypothesis' own length; the rest is padding
        tokens = out.sequences[i, len(prompt):len(prompt) + n].tolist()
        sequences.append(tokens)
        logprobs.append([out.logits[j][rows[j]].log_softmax(-1)[t].item() for j, t in enumerate(tokens)])
    return sequences, out.sequences_scores.tolist(), logprobs


SETTINGS = [
    dict(num_beams=4),
    dict(num_beams=4, num_return_sequences=4, early_stopping=True),
    dict(num_beams=3, num_return_sequences=2, early_stopping="never", length_penalty=0.0),
    dict(num_beams=4, num_return_sequences=2, early_stopping="never", length_penalty=2.0),
    dict(num_beams=2, length_penalty=-1.0),
    dict(num_beams=5, num_return_sequences=3, no_repeat_ngram_size=2, repetition_penalty=1.3, min_new_tokens=4),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_beams_equal_transformers_for_a_ragged_batch(pair, frequent_token, settings):
    reference, model = pair
    out = model.generate(PROMPTS, max_new_tokens=N_NEW, eos_token_id=frequent_token, return_dict=True, **settings)
    k = settings.get("num_return_sequences", 1)
    assert len(out.sequences) == len(PROMPTS) * k
    for p, prompt in enumerate(PROMPTS):
        sequences, scores, logprobs = transformers_beams(reference, prompt, frequent_token, **settings)
        mine = slice(p * k, (p + 1) * k)
        assert out.sequences[mine] == sequences, f"prompt {p}"
        assert out.scores[mine] == pytest.approx(scores, abs=ATOL)
        for got, expected in zip(out.logprobs[mine], logprobs):
            assert got == pytest.approx(expected, abs=ATOL)


def test_the_settings_end_hypotheses_mid_search(pair, frequent_token):
    """The parity test above covers hypotheses that end at eos before the last step (not at the first: those end
    whatever the bookkeeping) for most settings."""
    _, model = pair
    ending = [any(1 < len(s) < N_NEW for s in model.generate(PROMPTS, max_new_tokens=N_NEW,
                                                               eos_token_id=frequent_token, **settings))
              for settings in SETTINGS]
    assert sum(ending) >= 4, ending


def test_beams_equal_transformers_at_dialogpt_small_size():
    """The near-uniform distributions of random weights at full size: many close scores, the same beams."""
    reference = make_reference_model(GPT2Config.from_preset("dialogpt-small"), seed=0)
    model = engine_twin(reference)
    prompts = [[464, 3290, 318, 257, 1310, 11], [40, 588]]
    settings = dict(num_beams=4, num_return_sequences=2, length_penalty=1.0)
    out = model.generate(prompts, max_new_tokens=8, return_dict=True, **settings)
    for p, prompt in enumerate(prompts):
        with torch.no_grad():
            expected = reference.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                                                                           dtype=torch.long),
                                          max_new_tokens=8, do_sample=False, pad_token_id=50256,
                                          return_dict_in_generate=True, output_scores=True, **settings)
        assert out.sequences[2 * p:2 * p + 2] == expected.sequences[:, len(prompt):].tolist()
        assert out.scores[2 * p:2 * p + 2] == pytest.approx(expected.sequences_scores.tolist(), abs=ATOL)


@pytest.mark.parametrize("path", PATHS)
def test_beams_are_the_same_on_every_decode_path(pair, frequent_token, path, monkeypatch):
    reference, model = pair
    settings = dict(num_beams=4, num_return_sequences=2, length_penalty=0.7)
    steps = use_path(path, monkeypatch)
    out = model.generate(PROMPTS, max_new_tokens=N_NEW, eos_token_id=frequent_token, **settings)
    assert steps[path] > 0
    for p, prompt in enumerate(PROMPTS):
        assert out[2 * p:2 * p + 2] == transformers_beams(reference, prompt, frequent_token, **settings)[0]


def test_reorder_rows_moves_only_rows_whose_parent_changed(pair):
    _, model = pair
    cache = KVCache(model.config, 4, 16, "cpu", torch.float32)
    model(torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]]), cache=cache)
    before = cache.k.clone(), cache.v.clone()
    cache.reorder_rows([0, 0, 3, 3])
    for row, parent in enumerate([0, 0, 3, 3]):
        assert torch.equal(cache.k[:, row], before[0][:, parent]) and torch.equal(cache.v[:, row], before[1][:, parent])
    assert cache.lengths == [3, 3, 3, 3]
    cache.reorder_rows([0, 0, 2, 3], shared=[0, 2, 0, 0])  # row 1 holds row 0's first two slots already: not copied
    moved = cache.k.clone()
    assert torch.equal(moved[:, 1, :, :2], before[0][:, 0, :, :2]) and torch.equal(moved[:, 1, :, 2], moved[:, 0, :, 2])
    cache.k[:, 1, :, :2] = 7.0
    cache.reorder_rows([0, 0, 2, 3], shared=[0, 2, 0, 0])
    assert cache.k[:, 1, :, :2].eq(7.0).all() and torch.equal(cache.k[:, 1, :, 2], cache.k[:, 0, :, 2])


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences=3 exceeds num_beams=2"),
    (dict(num_beams=2, do_sample=True), "num_beams=2 with do_sample=True"),
    (dict(num_beams=2, stop_strings=["\n"]), "stop_strings with num_beams=2"),
    (dict(num_beams=2, on_token=lambda row, token: None), "on_token with num_beams=2"),
    (dict(num_beams=0), "num_beams=0 must be a positive integer"),
    (dict(num_beams=2, early_stopping="sometimes"), "early_stopping='sometimes'"),
    (dict(num_beams=2, length_penalty=float("nan")), "length_penalty=nan"),
])
def test_bad_beam_settings_are_refused_by_name(pair, kwargs, message):
    _, model = pair
    with pytest.raises(ValueError, match=message):
        model.generate(PROMPTS, max_new_tokens=4, eos_token_id=None, **kwargs)
