"""`gpt2 serve` over HTTP: a real server on 127.0.0.1 driven by httpx and by the official `openai` client.

Greedy text equals `generate`'s for the same prompt, alone and under 16 concurrent requests of mixed lengths arriving
at random moments, streamed or not; beams equal `generate`'s; chat messages take DialoGPT's turn format; malformed
and invalid requests get 400 in OpenAI's error shape naming the field; a client that disconnects mid-stream frees its
slot.
"""

from __future__ import annotations

import json
import random
import threading
import time

import pytest
import torch

pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install -e '.[serve,test]'")
pytest.importorskip("starlette", reason="the serve extra is not installed: pip install -e '.[serve,test]'")
httpx = pytest.importorskip("httpx", reason="the test extra is not installed: pip install -e '.[test]'")
openai = pytest.importorskip("openai", reason="the test extra is not installed: pip install -e '.[test]'")

import gpt2  # noqa: E402
from gpt2.chat import format_history  # noqa: E402
from tests.serve_server import STOPPED_BY_SIGTERM, Server, save_model  # noqa: E402

WAIT_S = 60  # a bound on polling for the server's state, never reached unless something hangs


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="module")
def model(model_dir):
    return gpt2.load(model_dir)


@pytest.fixture(scope="module")
def server(model_dir):
    server = Server(model_dir, "--prefill-chunk", "32")  # prompts over 32 tokens are prefilled in chunks
    yield server
    assert server.stop() in STOPPED_BY_SIGTERM, "".join(server.log)


def greedy_text(model, prompt: list[int], max_tokens: int) -> str:
    tokens = model.generate([prompt], max_new_tokens=max_tokens)[0]
    return model.tokenizer.decode(tokens, skip_special_tokens=True)


def complete(server: Server, client: httpx.Client, stream: bool, **body) -> str:
    """The first choice's text of a /v1/completions request, streamed or whole."""
    body = {"model": server.model_id, "temperature": 0, **body}
    if not stream:
        response = client.post(f"{server.url}/v1/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]
    text, done = "", False
    with client.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line:
                continue
            assert line.startswith("data: ")
            if line == "data: [DONE]":
                done = True
                continue
            text += json.loads(line[len("data: "):])["choices"][0]["text"]
    assert done
    return text


def test_a_lone_greedy_request_equals_generate(server, model):
    prompt = "Does money buy happiness?"
    ids = model.tokenizer.encode(prompt)
    with httpx.Client(timeout=WAIT_S) as client:
        for stream in (False, True):
            assert complete(server, client, stream, prompt=prompt, max_tokens=20) == greedy_text(model, ids, 20)
            assert complete(server, client, stream, prompt=ids, max_tokens=7) == greedy_text(model, ids, 7)


def test_sixteen_concurrent_greedy_requests_of_mixed_lengths_equal_generate(server, model):
    rng = random.Random(0)
    requests = [([rng.randrange(50000) for _ in range(rng.randrange(1, 120))], rng.randrange(1, 48), i % 2 == 0,
                  rng.random() * 0.05) for i in range(16)]
    expected = [greedy_text(model, prompt, n) for prompt, n, _, _ in requests]
    got: list[str | Exception] = [RuntimeError("never answered")] * len(requests)

    def send(i: int) -> None:
        prompt, n, stream, delay = requests[i]
        time.sleep(delay)  # arrivals at random moments, over running decode steps
        try:
            with httpx.Client(timeout=WAIT_S) as client:
                got[i] = complete(server, client, stream, prompt=prompt, max_tokens=n)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            got[i] = e

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert got == expected
    assert server.metric("gpt2_decode_batch_rows_sum") > server.metric("gpt2_decode_batch_rows_count")  # batched


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_sixteen_concurrent_greedy_requests_equal_generate(model_dir):
    """The CUDA path: the slots' one cache of max_batch rows, each step replayed from its captured graph."""
    cuda_model = gpt2.load(model_dir, device="cuda")
    server = Server(model_dir, device="cuda")
    try:
        rng = random.Random(3)
        requests = [([rng.randrange(50000) for _ in range(rng.randrange(1, 120))], rng.randrange(1, 48))
                    for _ in range(16)]
        results: list[str | None] = [None] * len(requests)

        def send(i: int) -> None:
            with httpx.Client(timeout=WAIT_S) as client:
                results[i] = complete(server, client, i % 2 == 0, prompt=requests[i][0], max_tokens=requests[i][1])

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results == [greedy_text(cuda_model, prompt, n) for prompt, n in requests]
    finally:
        assert server.stop() in STOPPED_BY_SIGTERM, "".join(server.log)


def test_the_openai_client_completes_and_chats_streaming_and_not(server, model):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [server.model_id]
    prompt = "The best way to buy happiness is"
    expected = greedy_text(model, model.tokenizer.encode(prompt), 12)
    completion = client.completions.create(model=server.model_id, prompt=prompt, max_tokens=12, temperature=0)
    assert completion.choices[0].text == expected
    assert completion.usage.completion_tokens == len(model.generate([model.tokenizer.encode(prompt)],
                                                                    max_new_tokens=12)[0])
    chunks = client.completions.create(model=server.model_id, prompt=prompt, max_tokens=12, temperature=0,
                                       stream=True)
    assert "".join(chunk.choices[0].text for chunk in chunks) == expected

    messages = [{"role": "system", "content": "left out: DialoGPT has no system turn"},
                {"role": "user", "content": "Hi! How are you?"}, {"role": "assistant", "content": "Fine, you?"},
                {"role": "user", "content": "Tired."}]
    context = format_history([model.tokenizer.encode(m["content"]) for m in messages[1:]], 50256)
    settings = dict(max_new_tokens=16, no_repeat_ngram_size=3, min_new_tokens=2)  # chat's defaults, greedy
    reply = model.tokenizer.decode(model.generate([context], **settings)[0], skip_special_tokens=True)
    chat = client.chat.completions.create(model=server.model_id, messages=messages, max_tokens=16, temperature=0)
    assert chat.choices[0].message.content == reply and chat.choices[0].message.role == "assistant"
    streamed = client.chat.completions.create(model=server.model_id, messages=messages, max_tokens=16, temperature=0,
                                              stream=True, stream_options={"include_usage": True})
    deltas = list(streamed)
    assert deltas[0].choices[0].delta.role == "assistant"
    assert "".join(d.choices[0].delta.content or "" for d in deltas if d.choices) == reply
    assert deltas[-1].usage.prompt_tokens == len(context)


def test_sampled_choices_with_a_seed_and_logprobs(server, model):
    ids = model.tokenizer.encode("Hello there")
    body = {"model": server.model_id, "prompt": ids, "max_tokens": 6, "n": 3, "seed": 11, "temperature": 0.7,
            "top_k": 20, "logprobs": 2, "stop": ["\n"]}
    first = httpx.post(f"{server.url}/v1/completions", json=body, timeout=WAIT_S).json()
    again = httpx.post(f"{server.url}/v1/completions", json=body, timeout=WAIT_S).json()
    assert [c["text"] for c in first["choices"]] == [c["text"] for c in again["choices"]]
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    alone = model.generate([ids], max_new_tokens=6, do_sample=True, temperature=0.7, top_k=20, seed=11,
                           stop_strings="\n")[0]
    text = model.tokenizer.decode(alone, skip_special_tokens=True)
    assert first["choices"][0]["text"] == text.split("\n")[0]
    logprobs = first["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(alone) and all(len(top) == 2 for top in logprobs["top_logprobs"])


def test_beam_search_equals_generates_beams_streamed_or_not(server, model):
    """num_beams (greedy unless told otherwise) returns generate's n best hypotheses; streamed, each choice's whole
    text comes in one chunk at the end."""
    ids = model.tokenizer.encode("Does money buy happiness?")
    settings = dict(num_beams=3, length_penalty=0.5, early_stopping=True)
    expected = [model.tokenizer.decode(t, skip_special_tokens=True)
                for t in model.generate([ids], max_new_tokens=10, num_return_sequences=2, **settings)]
    body = {"model": server.model_id, "prompt": ids, "max_tokens": 10, "n": 2, **settings}
    whole = httpx.post(f"{server.url}/v1/completions", json=body, timeout=WAIT_S).json()
    assert [c["text"] for c in whole["choices"]] == expected
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=WAIT_S) as r:
        lines = [line for line in r.iter_lines() if line]
    chunks = [json.loads(line[len("data: "):])["choices"][0] for line in lines[:-1]]
    texts = [c for c in chunks if c["finish_reason"] is None]
    assert sorted((c["index"], c["text"]) for c in texts) == list(enumerate(expected)) and lines[-1] == "data: [DONE]"


@pytest.mark.parametrize("body, param", [
    (b'{"model": "M", "prompt": "hi", "max_tokens": 8', None),  # malformed JSON
    (b'["not", "an", "object"]', None),
    ({"prompt": "hi"}, "model"),
    ({"model": "M"}, "prompt"),
    ({"model": "M", "prompt": "hi", "max_tokens": "8"}, "max_tokens"),  # a string where a number belongs
    ({"model": "M", "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"model": "M", "prompt": 5}, "prompt"),
    ({"model": "M", "prompt": [1, -2]}, "prompt"),
    ({"model": "M", "prompt": [1, 50257]}, "prompt"),  # outside the vocabulary
    ({"model": "M", "prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"model": "M", "prompt": "hi", "temperature": 3}, "temperature"),
    ({"model": "M", "prompt": "hi", "top_p": 0}, "top_p"),
    ({"model": "M", "prompt": "hi", "n": 17, "temperature": 1}, "n"),  # more choices than the batch holds
    ({"model": "M", "prompt": "hi", "n": 2, "temperature": 0}, "n"),  # copies of one greedy completion
    ({"model": "M", "prompt": "hi " * 1000, "max_tokens": 30}, "prompt"),  # over the context
    ({"model": "M", "prompt": "hi", "max_tokens": 1025}, "prompt"),
    ({"model": "M", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "M", "prompt": "hi", "stop": [""]}, "stop"),
    ({"model": "M", "prompt": "hi", "logprobs": 6}, "logprobs"),
    ({"model": "M", "prompt": "hi", "seed": 2**70}, "seed"),
    ({"model": "M", "prompt": "hi", "presence_penalty": 0.5}, "presence_penalty"),
    ({"model": "M", "prompt": "hi", "num_beams": 17}, "num_beams"),  # more beams than the batch holds
    ({"model": "M", "prompt": "hi", "num_beams": 4, "temperature": 0.7}, "temperature"),  # no beam sampling
    ({"model": "M", "prompt": "hi", "num_beams": 2, "n": 3}, "n"),
    ({"model": "M", "prompt": "hi", "num_beams": 2, "stop": "\n"}, "stop"),
    ({"model": "M", "prompt": "hi", "num_beams": 2, "logprobs": 1}, "logprobs"),
    ({"model": "M", "prompt": "hi", "num_beams": 2, "early_stopping": "always"}, "early_stopping"),
    ({"model": "M", "prompt": "hi", "length_penalty": "long"}, "length_penalty"),
    ({"model": "M", "prompt": "hi", "repetition_penalty": 0}, "repetition_penalty"),
    ({"model": "M", "prompt": "hi", "colour": "blue"}, "colour"),
])
def test_bad_completion_requests_get_400_naming_the_field(server, body, param):
    if isinstance(body, dict):
        body = json.dumps({**body, "model": server.model_id} if "model" in body else body).encode()
    response = httpx.post(f"{server.url}/v1/completions", content=body, timeout=WAIT_S)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "  "}]}, "messages[0].content"),
    ({"messages": [{"role": "system", "content": "only a system turn"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1023}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "num_beams": 2, "logprobs": True, "top_logprobs": 2},
     "top_logprobs"),
])
def test_bad_chat_requests_get_400_naming_the_field(server, body, param):
    response = httpx.post(f"{server.url}/v1/chat/completions", json={"model": server.model_id, **body},
                          timeout=WAIT_S)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_a_body_over_the_size_limit_gets_413(server):
    response = httpx.post(f"{server.url}/v1/completions", content=b"x" * (5 * 2**20), timeout=WAIT_S)
    assert response.status_code == 413 and "MiB" in response.json()["error"]["message"]


def test_an_unknown_model_and_path_get_404_in_openais_shape(server):
    response = httpx.post(f"{server.url}/v1/completions", json={"model": "gpt-4", "prompt": "hi"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    assert httpx.get(f"{server.url}/v1/nothing").json()["error"]["type"] == "invalid_request_error"


def test_a_long_prompt_is_cut_to_fit_in_chat_as_chat_cuts_it(server, model):
    """Old turns are dropped whole to fit the history cap: the reply is the one to the kept turns."""
    turns = [f"turn {i}: " + "word " * 60 for i in range(12)]
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    response = httpx.post(f"{server.url}/v1/chat/completions", timeout=WAIT_S, json={
        "model": server.model_id, "messages": messages, "max_tokens": 8, "temperature": 0})
    assert response.status_code == 200, response.text
    kept, _ = gpt2.chat.fit_history([model.tokenizer.encode(t) for t in turns], 1024 - 8, max_tokens=512)
    assert response.json()["usage"]["prompt_tokens"] == len(format_history(kept, 50256)) < 1024


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    cancelled = server.metric("gpt2_jobs_finished_total", {"outcome": "cancelled"})
    body = {"model": server.model_id, "prompt": "Hello", "max_tokens": 900, "min_new_tokens": 900, "stream": True,
            "temperature": 0}
    with httpx.Client(timeout=WAIT_S) as client:
        with client.stream("POST", f"{server.url}/v1/completions", json=body) as response:
            first = next(line for line in response.iter_lines() if line)
            assert json.loads(first[len("data: "):])["choices"][0]["finish_reason"] is None
    # Closed after one token of 900: the server sees the disconnect and the scheduler frees the slot.
    wait_for(lambda: server.metric("gpt2_jobs_finished_total", {"outcome": "cancelled"}) == cancelled + 1)
    wait_for(lambda: server.metric("gpt2_slots_in_use") == 0)
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def wait_for(condition) -> None:
    """Poll the server until condition holds (its scheduler gets there at its next step)."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, "the server never got there"
        time.sleep(0.02)
