"""`gpt2 serve`: an OpenAI-compatible HTTP server whose requests join and leave one running batch at every decode step.

job.py       what the scheduler takes (a `Job`) and what it sends back (`Token`, `Finish`, `Failure` events)
text.py      one choice's text as its tokens come, cut at its stop strings
slots.py     the scheduler's KV cache: a slot per running row, resized in row buckets
scheduler.py the continuous-batching loop, on its own thread, owning the model and the slots
metrics.py   the Prometheus metrics
protocol.py  the OpenAI wire format: request models, error bodies, response and chunk bodies
requests.py  from an OpenAI request to a `Job`, every error naming its field
app.py       the ASGI app (Starlette): routes, API key, streaming
server.py    load a model and run the app under uvicorn

The HTTP stack (starlette, uvicorn, pydantic, prometheus-client) is the `serve` extra; job.py, text.py, slots.py and
scheduler.py need none of it.
"""
