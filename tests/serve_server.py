"""Test helper: a real `gpt2 serve` in a subprocess on 127.0.0.1 (a free port the server picks itself), and the
models it serves. Import as `from tests.serve_server import Server, save_model`.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from gpt2.config import GPT2Config
from tests.checkpoints import make_reference_model, save_checkpoint

REPO = Path(__file__).resolve().parent.parent
# uvicorn drains, then ends the process by the signal it caught (since 0.29; before, with status 0).
STOPPED_BY_SIGTERM = (-signal.SIGTERM, 0)
START_BOUND_S = 120  # a bound on the server's start (importing torch, loading, building the kernels on a cold cache)
# The test model with GPT-2's 1024 positions: a 900-token reply then takes hundreds of decode steps, long enough for a
# test to open, read and close other connections while it runs.
SERVE_CONFIG = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=1024)


def save_model(directory: Path, config: GPT2Config = SERVE_CONFIG) -> Path:
    """A seeded random model of config, saved as a Hugging Face checkpoint directory (what `gpt2 serve` loads)."""
    return save_checkpoint(make_reference_model(config, seed=0), directory, "hf-safetensors")


class Server:
    """`gpt2 serve MODEL --port 0 --device DEVICE FLAGS` until stop(); url is where it listens. The device is the
    CPU unless a test asks for CUDA (the server's own default is CUDA where there is one)."""

    def __init__(self, model: Path, *flags: str, env: dict[str, str] | None = None, device: str = "cpu") -> None:
        environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        argv = [sys.executable, "-m", "gpt2.cli", "serve", str(model), "--port", "0", "--device", device, *flags]
        self.process = subprocess.Popen(argv,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                        env=environment)
        self.log: list[str] = []
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read_log, args=(lines,), daemon=True).start()
        self.url = self._wait_for_address(lines)
        self.model_id = str(model)

    def _read_log(self, lines: queue.Queue) -> None:
        for line in self.process.stderr:
            self.log.append(line)
            lines.put(line)
        lines.put(None)

    def _wait_for_address(self, lines: queue.Queue) -> str:
        while True:
            try:
                line = lines.get(timeout=START_BOUND_S)
            except queue.Empty:
                self.stop()
                raise RuntimeError("the server did not start:\n" + "".join(self.log)) from None
            if line is None:
                raise RuntimeError(f"the server exited ({self.process.wait()}):\n" + "".join(self.log))
            found = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line)
            if found:
                return found.group(1)

    def metric(self, name: str, labels: dict[str, str] | None = None, headers: dict[str, str] | None = None) -> float:
        """A sample's value from /metrics (0 when absent)."""
        text = httpx.get(f"{self.url}/metrics", headers=headers).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                    return sample.value
        return 0.0

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def stop(self) -> int:
        """SIGTERM, then the exit status (SIGKILL if it does not exit within the start bound)."""
        if self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(START_BOUND_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()
