"""`gpt2 serve` under overload and at its edges, on a real server on 127.0.0.1: the bounded queue answers 429 with
Retry-After, the API key is required where set, and SIGTERM lets a stream in flight finish before the process exits.
"""

from __future__ import annotations

import json
from contextlib import ExitStack

import pytest

pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install -e '.[serve,test]'")
pytest.importorskip("starlette", reason="the serve extra is not installed: pip install -e '.[serve,test]'")
httpx = pytest.importorskip("httpx", reason="the test extra is not installed: pip install -e '.[test]'")

from gpt2.cli import main  # noqa: E402
from tests.serve_server import STOPPED_BY_SIGTERM, Server, save_model  # noqa: E402
from tests.test_serve_http import WAIT_S, wait_for  # noqa: E402

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG = {"prompt": "Hello", "max_tokens": 900, "min_new_tokens": 900, "temperature": 0, "stream": True}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="module")
def small_server(model_dir):
    """One choice decoding at a time, one request waiting at most, an API key."""
    server = Server(model_dir, "--max-batch", "1", "--max-queue", "1", env={"GPT2_SERVE_API_KEY": KEY})
    yield server
    assert server.stop() in STOPPED_BY_SIGTERM, "".join(server.log)


def test_beyond_the_queue_requests_get_429_with_retry_after(small_server):
    """Long streams opened one after another: one runs, one waits, and the next is refused (each takes hundreds of
    steps, so a refusal comes within the first few). Closing them frees every slot."""
    url = f"{small_server.url}/v1/completions"
    with httpx.Client(timeout=WAIT_S, headers=AUTH) as client, ExitStack() as streams:
        refused = None
        for _ in range(6):
            response = streams.enter_context(client.stream("POST", url, json={"model": small_server.model_id,
                                                                               **LONG}))
            if response.status_code != 200:
                refused = response
                break
        assert refused is not None and refused.status_code == 429
        assert refused.headers["Retry-After"] == "1"
        refused.read()
        assert refused.json()["error"]["type"] == "rate_limit_exceeded"
    wait_for(lambda: small_server.metric("gpt2_slots_in_use", headers=AUTH) == 0
             and small_server.metric("gpt2_queue_length", headers=AUTH) == 0)


def test_the_api_key_is_required_except_for_health(small_server):
    url = small_server.url
    body = {"model": small_server.model_id, "prompt": "Hi", "max_tokens": 2}
    assert httpx.post(f"{url}/v1/completions", json=body).status_code == 401
    wrong = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/metrics").status_code == 401
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=WAIT_S).status_code == 200


def test_sigterm_lets_a_stream_in_flight_finish_then_exits(model_dir):
    server = Server(model_dir)
    chunks, done = [], False
    try:
        with httpx.Client(timeout=WAIT_S) as client:
            body = {"model": server.model_id, **LONG, "max_tokens": 300, "min_new_tokens": 300}
            with client.stream("POST", f"{server.url}/v1/completions", json=body) as response:
                lines = (line for line in response.iter_lines() if line)
                chunks.append(json.loads(next(lines)[len("data: "):]))
                server.terminate()  # mid-stream
                for line in lines:
                    if line == "data: [DONE]":
                        done = True
                    else:
                        chunks.append(json.loads(line[len("data: "):]))
    finally:
        status = server.stop()
    assert done and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(1 for c in chunks if c["choices"][0]["finish_reason"] is None) == 300  # every token arrived
    assert status in STOPPED_BY_SIGTERM
    assert any("Application shutdown complete" in line for line in server.log)


def test_bad_serve_flags_are_refused_before_loading(model_dir, capsys):
    assert main(["serve", str(model_dir), "--max-batch", "0"]) == 2
    assert "--max-batch 0 must be at least 1" in capsys.readouterr().err
