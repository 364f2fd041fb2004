"""`gpt2 serve`: an OpenAI-compatible HTTP server whose requests join and leave one running batch at every decode step.

job.py       what the scheduler takes (a `Job`) and what it sends back (`Token`, `Finish`, `Failure` events)
text.py      one choice's text as its tokens come, cut at its stop strings
slots.py     the scheduler's KV cache: a slot per running row, resized in row buckets
scheduler.py the continuous-batching loop, on its own thread, owning the model and the slots; beam jobs a step a turn
metrics.py   the Prometheus metrics
protocol.py  the OpenAI wire format of requests (strict models) and of errors
requests.py  from an OpenAI request to a `Job`, every error naming its field
responses.py a job's events as OpenAI's response bodies and stream chunks
app.py       the ASGI app (Starlette): routes, API key, streaming
server.py    a loaded model's app, run under uvicorn (`gpt2 serve` in gpt2/cli.py loads it)

The HTTP stack (starlette, uvicorn, pydantic, prometheus-client) is the `serve` extra: job.py, text.py and slots.py
need none of it, the scheduler only the metrics' prometheus-client.
"""
