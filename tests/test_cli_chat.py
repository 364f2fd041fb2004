"""`gpt2 chat` and `gpt2 generate` end to end on a small random model: through a pipe and in a pseudo-terminal."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import gpt2
from gpt2 import Chat, ChatNotice
from gpt2.cli import main
from gpt2.cpu.bf16_linear import PackedLinear, bf16_packing_available
from gpt2.cpu.int8_linear import Int8Linear
from tests.checkpoints import make_reference_model, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent
TINY = gpt2.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128)
TIMEOUT = 120  # seconds for one CLI session, a loaded machine included


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A small random model converted into an engine directory."""
    root = tmp_path_factory.mktemp("cli")
    source = save_checkpoint(make_reference_model(TINY, seed=5), root / "hf", "hf-safetensors")
    return gpt2.convert(source, root / "engine", progress=False)


def cli_env(**extra: str) -> dict[str, str]:
    """One compute thread (see one_thread), offline, this repository first on the path."""
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


# The CLI's default device; seeded sampling draws differ between CPU and CUDA generators.
CLI_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run_cli(args: list[str], stdin: str = "", **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpt2.cli", *args], input=stdin, capture_output=True, text=True,
                          env=cli_env(**env), timeout=TIMEOUT, cwd=REPO,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_chat_through_a_pipe_one_line_per_turn(model_dir):
    too_long = "word " * 200  # more tokens than the context holds: cut, with a notice
    lines = ["Hello there", "", "   ", "How are you?", "/reset", "Hello there", too_long, "/quit", "never read"]
    result = run_cli(["chat", str(model_dir), "--max-new-tokens", "6", "--seed", "4"], "\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("empty message") == 2 and "history cleared" in result.stderr
    assert result.stderr.count("notice: your message is 200 tokens") == 1

    chat = Chat(gpt2.load(model_dir, device=CLI_DEVICE), max_new_tokens=6, seed=4)  # the same conversation in-process
    expected = [chat.say("Hello there"), chat.say("How are you?")]
    chat.reset()
    expected.append(chat.say("Hello there"))
    with pytest.warns(ChatNotice):
        expected.append(chat.say(too_long.strip()))
    assert result.stdout.splitlines() == [e.replace("\n", " ").replace("\r", " ") for e in expected]
    assert expected[2] == expected[0]  # reset really forgot the conversation


class Terminal:
    """`gpt2 chat` in a pseudo-terminal (stdin is a tty: prompts, echo, Ctrl-C through the line discipline)."""

    def __init__(self, args: list[str]) -> None:
        pid, fd = pty.fork()
        if pid == 0:  # the child: session leader with the pty as its controlling terminal
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.chdir(REPO)
            os.execve(sys.executable, [sys.executable, "-m", "gpt2.cli", *args], cli_env())
        self.pid, self.fd, self.output = pid, fd, ""

    def read_until(self, text: str) -> str:
        """Everything read up to and including the next occurrence of text (after what earlier calls consumed)."""
        deadline = time.monotonic() + TIMEOUT
        while text not in self.output:
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {text!r}; terminal showed {self.output!r}")
            if select.select([self.fd], [], [], 1.0)[0]:
                try:
                    chunk = os.read(self.fd, 4096).decode("utf-8", "replace")
                except OSError:  # EIO: the child closed the terminal
                    chunk = ""
                if not chunk:
                    raise AssertionError(f"the program ended before printing {text!r}; terminal showed {self.output!r}")
                self.output += chunk
        head, _, self.output = self.output.partition(text)
        return head + text

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def finish(self) -> tuple[int, str]:
        """(exit status, the rest of the output) once the program ends."""
        rest = ""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if select.select([self.fd], [], [], 1.0)[0]:
                try:
                    chunk = os.read(self.fd, 4096).decode("utf-8", "replace")
                except OSError:
                    break
                if not chunk:
                    break
                rest += chunk
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid == 0:  # still running after TIMEOUT: never leave it (or the test run) hanging
            os.kill(self.pid, signal.SIGKILL)
            _, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        return os.waitstatus_to_exitcode(status), self.output + rest


def test_chat_in_a_terminal_streams_and_resets(model_dir):
    term = Terminal(["chat", str(model_dir), "--max-new-tokens", "6", "--seed", "4"])
    banner = term.read_until("you> ")
    assert "/reset" in banner and "/quit" in banner
    term.send("Hello there\n")
    first = term.read_until("you> ")
    assert "bot> " in first
    reply = first.split("bot> ", 1)[1].rsplit("\n", 1)[0].strip()
    term.send("\n")
    assert "empty message" in term.read_until("you> ")
    term.send("/reset\n")
    assert "history cleared" in term.read_until("you> ")
    term.send("Hello there\n")
    again = term.read_until("you> ")
    assert again.split("bot> ", 1)[1].rsplit("\n", 1)[0].strip() == reply  # same seed, history forgotten
    term.send("/quit\n")
    status, rest = term.finish()
    assert status == 0, rest
    assert "Traceback" not in rest


def test_ctrl_c_at_the_prompt_ends_cleanly(model_dir, monkeypatch, capsys):
    """Ctrl-C raises KeyboardInterrupt inside input(): the CLI ends with status 130 and no traceback.

    Raised in-process: a pty's ^C -> SIGINT was seen not to be acted on when pytest runs as a
    background job, so a signal-based version of this test would depend on how CI starts it.
    """
    def interrupted(prompt: str = "") -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr("builtins.input", interrupted)
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    assert main(["chat", str(model_dir), "--max-new-tokens", "4"]) == 130
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "KeyboardInterrupt" not in captured.err


def test_missing_model_says_how_to_convert(tmp_path):
    result = run_cli(["chat", "microsoft/DialoGPT-small"], HF_HOME=str(tmp_path / "hf"),
                     GPT2_ENGINE_CACHE=str(tmp_path / "engine"))
    assert result.returncode == 2
    assert "gpt2 convert" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_generate_streams_a_one_shot_continuation(model_dir, capsys):
    assert main(["generate", str(model_dir), "--prompt", "Hello there", "--max-new-tokens", "7"]) == 0
    out = capsys.readouterr().out
    model = gpt2.load(model_dir, device=CLI_DEVICE)
    tokens = model.generate([model.tokenizer.encode("Hello there")], max_new_tokens=7)[0]
    assert out == model.tokenizer.decode(tokens, skip_special_tokens=True) + "\n"
    assert main(["generate", str(model_dir), "--prompt", "Hello there", "--chat-format", "--sample", "--seed", "1",
                 "--max-new-tokens", "9", "--top-k", "40"]) == 0
    reply = model.generate([model.tokenizer.encode("Hello there") + [50256]], max_new_tokens=9, do_sample=True,
                           top_k=40, seed=1)[0]
    assert capsys.readouterr().out == model.tokenizer.decode(reply, skip_special_tokens=True) + "\n"

    assert main(["generate", str(model_dir), "--prompt", "Hello there", "--max-new-tokens", "500"]) == 2
    assert "exceeds the model's n_positions" in capsys.readouterr().err
    assert main(["chat", str(model_dir), "--top-p", "2"]) == 2
    assert "top_p" in capsys.readouterr().err


@pytest.mark.parametrize("flags, layer", [(["--dtype", "bf16"], PackedLinear), (["--quantize", "int8"], Int8Linear)])
def test_generate_on_the_faster_cpu_paths(model_dir, capsys, monkeypatch, flags, layer):
    if layer is PackedLinear and not bf16_packing_available():
        pytest.skip("no native bf16 in oneDNN on this CPU")
    loaded = []
    real_load = gpt2.cli.load

    def load(*args, **kwargs):  # the CLI's model, to check which layers its flags gave it
        loaded.append(real_load(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(gpt2.cli, "load", load)
    assert main(["generate", str(model_dir), "--prompt", "Hello there", "--max-new-tokens", "6", "--device", "cpu",
                 *flags]) == 0
    model, = loaded
    assert isinstance(model.h[0].mlp.c_fc, layer) and isinstance(model.lm_head, layer)
    tokens = model.generate([model.tokenizer.encode("Hello there")], max_new_tokens=6)[0]
    assert capsys.readouterr().out == model.tokenizer.decode(tokens, skip_special_tokens=True) + "\n"
