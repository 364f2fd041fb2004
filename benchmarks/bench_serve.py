"""Serving benchmark: `gpt2 serve` under 1, 4, 16 and 64 concurrent streaming clients, against the same server serving
one request at a time (--max-batch 1), and against llama.cpp's server (llama-cpp-python[server], the model converted
to GGUF by llama.cpp's own converter) where it is installed. DialoGPT-small and -medium shapes with seeded random
weights, fp32 and int8 (llama.cpp: f32 and q8_0).

Each client sends requests back to back for --window seconds over 127.0.0.1: the same --prompt-len-token prompt
text, --new-tokens greedy tokens (end of text suppressed: min_new_tokens for this server, a logit bias for
llama.cpp's), streamed.
Reported per server and number of clients: generated tokens/s over the window, time to first token p50 / p99, and
per-token latency (between a reply's successive tokens) p50 / p99, over the requests whose tokens arrived in the
window; and the CPU the server, the clients and other processes used meanwhile. The clients run in this process,
on the server's machine: their share of its two cores is part of what is measured. Writes serve.json, serve.md and
serve.png to --out.

    python -m benchmarks.bench_serve                                   # full run (about 17 minutes on 2 cores)
    # with llama.cpp's server too (about 25 minutes):
    python -m benchmarks.bench_serve --llama-python venv/bin/python --llama-convert llama.cpp/convert_hf_to_gguf.py
    python -m benchmarks.bench_serve --device cuda --out OUT           # on a GPU: fp16 and fp32, 64 rows
    python -m benchmarks.bench_serve --smoke --out /tmp/smoke          # seconds: the tiny shape, 1 and 2 clients (CI)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.bench_generation import machine
from benchmarks.host import cpu_times
from benchmarks.reference import make_reference_model
from gpt2.bench import SIZES, random_prompts
from gpt2.tokenizer import VOCAB_DIR, Tokenizer

REPO = Path(__file__).resolve().parent.parent
START_BOUND_S = 600  # loading (and for llama.cpp converting) medium on a busy machine
EOS = 50256


@dataclass
class Server:
    """A server process and where it listens; `name` labels its results."""

    name: str
    process: subprocess.Popen
    url: str
    model: str
    kind: str  # "engine" or "llama.cpp": how to ask for exactly --new-tokens tokens
    log: list[str] = field(default_factory=list)

    def cpu_seconds(self) -> float:
        """CPU seconds the server process has used (Linux /proc; 0 where unreadable)."""
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start(name: str, argv: list[str], model: str, kind: str, address: str, env: dict[str, str] | None = None) -> Server:
    """Run argv and wait for the line matching address (a regex whose group 1 is the URL) in its output."""
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                               env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    log: list[str] = []
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in process.stdout:
            log.append(line)
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + START_BOUND_S
    while True:
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
        except queue.Empty:
            line = None
        if line is None:
            process.kill()
            raise RuntimeError(f"{name} did not start:\n" + "".join(log[-40:]))
        found = re.search(address, line)
        if found:
            return Server(name, process, found.group(1), model, kind, log)


def engine_server(model_dir: Path, dtype: str, max_batch: int, device: str) -> Server:
    name = f"this engine {dtype}" + (" one at a time" if max_batch == 1 else "")
    precision = ["--quantize", "int8"] if dtype == "int8" else ["--dtype", dtype]
    argv = [sys.executable, "-m", "gpt2.cli", "serve", str(model_dir), "--port", "0", "--max-batch", str(max_batch),
            "--max-queue", "256", "--model-name", "bench", "--device", device, *precision]
    return start(name, argv, "bench", "engine", r"Uvicorn running on (http://127\.0\.0\.1:\d+)")


def llama_server(python: str, gguf: Path, quant: str, port: int) -> Server:
    """llama-cpp-python's server on gguf: 2 threads, GPT-2's 1024-token context, one request at a time (it has no
    continuous batching; by default a new request interrupts the running one, here it waits its turn)."""
    argv = [python, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "--n_threads", "2", "--n_threads_batch", "2", "--n_ctx", "1024", "--model_alias", "bench",
            "--interrupt_requests", "False"]
    return start(f"llama.cpp {quant}", argv, "bench", "llama.cpp", rf"Uvicorn running on (http://127\.0\.0\.1:{port})")


# --- clients -----------------------------------------------------------------------------------------------------


@dataclass
class Level:
    """What the clients saw at one number of concurrent clients."""

    clients: int
    tokens: int = 0
    seconds: float = 0.0
    requests_done: int = 0
    first_token_s: list[float] = field(default_factory=list)
    token_gaps_s: list[float] = field(default_factory=list)
    other_cores: float = 0.0  # other processes' average load meanwhile, server and clients excluded
    server_cores: float = 0.0  # the server's average CPU use meanwhile
    client_cores: float = 0.0  # the clients' (this process's)

    def summary(self) -> dict:
        return {"clients": self.clients, "tokens_per_s": self.tokens / self.seconds, "tokens": self.tokens,
                "seconds": self.seconds, "requests_done": self.requests_done,
                "ttft_p50_ms": percentile(self.first_token_s, 50), "ttft_p99_ms": percentile(self.first_token_s, 99),
                "token_p50_ms": percentile(self.token_gaps_s, 50), "token_p99_ms": percentile(self.token_gaps_s, 99),
                "ttft_samples": len(self.first_token_s), "other_cores": self.other_cores,
                "server_cores": self.server_cores, "client_cores": self.client_cores}


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile in milliseconds (nearest rank), None without values."""
    if not values:
        return None
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def request_body(server: Server, prompt: str, new_tokens: int) -> dict:
    body = {"model": server.model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True}
    if server.kind == "engine":
        return {**body, "min_new_tokens": new_tokens}
    return {**body, "logit_bias": {str(EOS): -100.0}}


async def client(http: httpx.AsyncClient, server: Server, body: dict, level: Level, end: float) -> None:
    """Requests back to back until end."""
    while time.monotonic() < end:
        await request(http, server, body, level, end)


async def request(http: httpx.AsyncClient, server: Server, body: dict, level: Level, end: float) -> None:
    """One streamed request, until its end or end; each token chunk counts, with its time."""
    sent, last = time.monotonic(), None
    async with http.stream("POST", f"{server.url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{server.name}: {response.status_code} {await response.aread()}")
        async for line in response.aiter_lines():
            now = time.monotonic()
            if now >= end:
                return  # closing the stream cancels the request
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            if choice.get("finish_reason") is not None and not choice.get("text"):
                continue  # the closing chunk carries no token
            level.tokens += 1
            if last is None:
                level.first_token_s.append(now - sent)
            else:
                level.token_gaps_s.append(now - last)
            last = now
    level.requests_done += 1


async def run_level(server: Server, clients: int, prompt: str, new_tokens: int, window_s: float) -> Level:
    level = Level(clients)
    body = request_body(server, prompt, new_tokens)
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=window_s + 600, limits=limits) as http:
        for _ in range(2):  # warm-up: first-call costs (oneDNN's primitive creation, page faults)
            await request(http, server, body, Level(1), float("inf"))
        await wait_idle(http, server)
        before, server_cpu = cpu_times(), server.cpu_seconds()
        started = time.monotonic()
        end = started + window_s
        # The window ends on time: a client still waiting for its first token (queued behind the others) would
        # otherwise keep the level open past it, counting seconds without tokens.
        tasks = [asyncio.create_task(client(http, server, body, level, end)) for _ in range(clients)]
        await asyncio.wait(tasks, timeout=window_s)
        level.seconds = time.monotonic() - started
        busy, own, now = cpu_times()
        for task in tasks:
            task.cancel()  # closing a stream cancels its request
        for outcome in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(outcome, Exception):
                raise outcome
        seconds = max(now - before[2], 1e-9)
        level.server_cores = (server.cpu_seconds() - server_cpu) / seconds
        level.client_cores = (own - before[1]) / seconds
        level.other_cores = max((busy - before[0]) / seconds - level.server_cores - level.client_cores, 0.0)
        await wait_idle(http, server)
    return level


async def wait_idle(http: httpx.AsyncClient, server: Server, bound_s: float = 120.0) -> None:
    """Until the server holds no request (this engine: /metrics; llama.cpp: a moment for its cancellations)."""
    if server.kind != "engine":
        await asyncio.sleep(1.0)
        return
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        text = (await http.get(f"{server.url}/metrics")).text
        if re.search(r"^gpt2_slots_in_use 0\.0$", text, re.M) and re.search(r"^gpt2_queue_length 0\.0$", text, re.M):
            return
        await asyncio.sleep(0.05)


# --- models -------------------------------------------------------------------------------------------------------


def hf_checkpoint(size: str, workdir: Path) -> Path:
    """A seeded random model of size's shape as a Hugging Face directory (both servers load it), made once."""
    directory = workdir / f"hf-{size}"
    if not (directory / "config.json").is_file():
        make_reference_model(SIZES[size], seed=0).save_pretrained(directory)
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(VOCAB_DIR / name, directory / name)
    return directory


def gguf(checkpoint: Path, quant: str, convert: Path, workdir: Path) -> Path:
    """checkpoint converted by llama.cpp's converter (which reads it with torch and writes with the gguf package
    beside it), made once."""
    out = workdir / f"{checkpoint.name}-{quant}.gguf"
    if not out.is_file():
        subprocess.run([sys.executable, str(convert), str(checkpoint), "--outtype", quant, "--outfile", str(out)],
                       check=True, capture_output=True)
    return out


# --- the run ------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["small", "medium"])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtypes", nargs="+", choices=["fp32", "int8", "fp16", "bf16"],
                   help="default: fp32 and int8 on the CPU, fp16 and fp32 on CUDA")
    p.add_argument("--max-batch", type=int, help="this engine's batching server (default: 16 on the CPU, the C "
                                                   "step's most rows; 64 on CUDA)")
    p.add_argument("--clients", nargs="+", type=int, default=[1, 4, 16, 64])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--window", type=float, default=12.0, help="seconds of load per number of clients")
    p.add_argument("--no-one-at-a-time", dest="one_at_a_time", action="store_false")
    p.add_argument("--llama-python", help="a Python with llama-cpp-python[server] installed (else no llama.cpp)")
    p.add_argument("--llama-convert", type=Path, help="llama.cpp's convert_hf_to_gguf.py")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bench-serve"), help="checkpoints and GGUF files")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shape, fp32, batching only, 1 and 2 clients, 1 s windows (CI)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    args.dtypes = args.dtypes or (["fp32", "int8"] if args.device == "cpu" else ["fp16", "fp32"])
    args.max_batch = args.max_batch or (16 if args.device == "cpu" else 64)
    if args.smoke:
        args.sizes, args.dtypes, args.clients, args.window, args.prompt_len, args.new_tokens = (
            ["tiny"], ["fp32"], [1, 2], 1.0, 8, 4)
        args.one_at_a_time, args.llama_python = False, None
    return args


def servers_for(size: str, args: argparse.Namespace) -> list[Callable[[], Server]]:
    """A function starting each server measured on size: per dtype, this engine batching (--max-batch rows), one at
    a time, and llama.cpp's where given (CPU, fp32 and int8)."""
    checkpoint = hf_checkpoint(size, args.workdir)
    starts = []
    for dtype in args.dtypes:
        starts.append(lambda d=dtype: engine_server(checkpoint, d, args.max_batch, args.device))
        if args.one_at_a_time:
            starts.append(lambda d=dtype: engine_server(checkpoint, d, 1, args.device))
        if args.llama_python and args.llama_convert and dtype in ("fp32", "int8"):
            quant = {"fp32": "f32", "int8": "q8_0"}[dtype]
            starts.append(lambda q=quant: llama_server(args.llama_python, gguf(
                checkpoint, q, args.llama_convert, args.workdir), q, free_port()))
    return starts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer.default()
    prompt = tokenizer.decode(random_prompts(1, args.prompt_len, 50000, seed=0)[0])
    results = {"machine": machine(), "settings": {k: str(v) for k, v in vars(args).items()}, "sizes": {}}
    if not (args.llama_python and args.llama_convert):
        results["llama.cpp"] = "not measured: give --llama-python and --llama-convert"
    for size in args.sizes:
        runs = results["sizes"][size] = {}
        failures = results.setdefault("failures", [])
        for start_server in servers_for(size, args):
            server = start_server()
            try:
                levels = [asyncio.run(run_level(server, c, prompt, args.new_tokens, args.window))
                          for c in args.clients]
            except (httpx.HTTPError, RuntimeError) as e:  # a server that breaks is reported, the others still run
                failures.append(f"{size} {server.name}: {type(e).__name__}: {e}; its log ends: "
                                + " | ".join(line.strip() for line in server.log[-3:]))
                print(failures[-1], flush=True)
                continue
            finally:
                server.stop()
            runs[server.name] = [level.summary() for level in levels]
            (args.out / "serve.json").write_text(json.dumps(results, indent=1))  # so far: a run cut short keeps it
            for summary in runs[server.name]:
                print(f"{size} {server.name} x{summary['clients']}: {summary['tokens_per_s']:.1f} tok/s, TTFT p50 "
                      f"{fmt(summary['ttft_p50_ms'])} ms, per token p50 {fmt(summary['token_p50_ms'])} / p99 "
                      f"{fmt(summary['token_p99_ms'])} ms (cores: server {summary['server_cores']:.2f}, clients "
                      f"{summary['client_cores']:.2f}, others {summary['other_cores']:.2f})",
                      flush=True)
    (args.out / "serve.json").write_text(json.dumps(results, indent=1))
    (args.out / "serve.md").write_text(report(results))
    plot(results, args.out / "serve.png")
    print(report(results))
    return 0


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def report(results: dict) -> str:
    """Markdown: a table per size, and the issue's two goals at 16 clients (against one at a time and a lone
    request)."""
    m = results["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, Python {m['python']}.",
             f"Settings: {results['settings']['prompt_len']}-token prompt, {results['settings']['new_tokens']} greedy "
             f"tokens per request, {results['settings']['window']} s of load per number of clients.", ""]
    if "llama.cpp" in results:
        lines += [f"llama.cpp: {results['llama.cpp']}", ""]
    lines += [f"Failed: {failure}" for failure in results.get("failures", [])] + [""] * bool(results.get("failures"))
    for size, runs in results["sizes"].items():
        lines += [f"### {size}", "", "| server | clients | tokens/s | TTFT p50 ms | TTFT p99 ms | per-token p50 ms | "
                  "per-token p99 ms | requests done | cores: server / others |", "| --- " * 9 + "|"]
        for name, levels in runs.items():
            for s in levels:
                lines.append(f"| {name} | {s['clients']} | {s['tokens_per_s']:.1f} | {fmt(s['ttft_p50_ms'])} | "
                             f"{fmt(s['ttft_p99_ms'])} | {fmt(s['token_p50_ms'])} | {fmt(s['token_p99_ms'])} | "
                             f"{s['requests_done']} | {s.get('server_cores', float('nan')):.2f} / "
                             f"{s['other_cores']:.2f} |")
        lines += [""] + goals(runs) + [""]
    return "\n".join(lines)


def goals(runs: dict) -> list[str]:
    """At 16 clients: tokens/s against one at a time (goal >= 5x), per-token p50 against a lone request (< 2x)."""
    lines = []
    for name, levels in runs.items():
        if "one at a time" in name or not name.startswith("this engine"):
            continue
        by_clients = {s["clients"]: s for s in levels}
        alone = {s["clients"]: s for s in runs.get(name + " one at a time", [])}
        if 16 in by_clients and 16 in alone and 1 in by_clients:
            speedup = by_clients[16]["tokens_per_s"] / alone[16]["tokens_per_s"]
            latency = by_clients[16]["token_p50_ms"] / by_clients[1]["token_p50_ms"]
            lines.append(f"- {name}, 16 clients: {speedup:.1f}x the tokens/s of one at a time (goal >= 5x); "
                         f"per-token p50 {latency:.2f}x a lone request's (goal < 2x)")
    return lines


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(results["sizes"])
    fig, axes = plt.subplots(2, len(sizes), figsize=(6 * len(sizes), 8), squeeze=False)
    for column, size in enumerate(sizes):
        for name, levels in results["sizes"][size].items():
            clients = [s["clients"] for s in levels]
            axes[0][column].plot(clients, [s["tokens_per_s"] for s in levels], marker="o", label=name)
            axes[1][column].plot(clients, [s["token_p99_ms"] or float("nan") for s in levels], marker="o", label=name)
        axes[0][column].set_title(f"{size}: generated tokens/s")
        axes[1][column].set_title(f"{size}: per-token latency p99 (ms)")
        for axis in (axes[0][column], axes[1][column]):
            axis.set_xscale("log", base=2)
            axis.set_xlabel("concurrent streaming clients")
            axis.grid(True, alpha=0.3)
        axes[1][column].set_yscale("log")
        axes[0][column].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
