"""`gpt2 chat` and `gpt2 generate` end to end on a small random model: through a pipe and in a pseudo-terminal."""

from __future__ import annotations

import io
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
from gpt2.cli import CHAT_COMMANDS, main
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


# The C locale with strict UTF-8 streams: a byte that is not UTF-8 fails to decode unless the CLI tolerates it.
STRICT_LOCALE = {"LC_ALL": "C", "PYTHONIOENCODING": "utf-8:strict"}


def run_cli(args: list[str | bytes], stdin: str | bytes = "", **env: str) -> subprocess.CompletedProcess:
    """The CLI in a subprocess; output is text for text stdin, bytes for bytes stdin."""
    return subprocess.run([sys.executable, "-m", "gpt2.cli", *args], input=stdin, capture_output=True,
                          text=isinstance(stdin, str), env=cli_env(**env), timeout=TIMEOUT, cwd=REPO,
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

    def __init__(self, args: list[str], **env: str) -> None:
        pid, fd = pty.fork()
        if pid == 0:  # the child: session leader with the pty as its controlling terminal
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.chdir(REPO)
            os.execve(sys.executable, [sys.executable, "-m", "gpt2.cli", *args], cli_env(**env))
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

    def send(self, text: str | bytes) -> None:
        os.write(self.fd, text if isinstance(text, bytes) else text.encode())

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


def one_line(reply: str) -> str:
    """A reply as the CLI prints it: on one line."""
    return reply.replace("\n", " ").replace("\r", " ")


def test_chat_reads_undecodable_bytes_as_replacement_characters(model_dir):
    """Under a strict locale a byte that is not UTF-8 becomes U+FFFD, instead of a UnicodeDecodeError ending the chat
    before it answers even the lines before it."""
    result = run_cli(["chat", str(model_dir), "--greedy", "--max-new-tokens", "3"], b"hello\n\xff\xfe bad\nbye\n",
                     **STRICT_LOCALE)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    chat = Chat(gpt2.load(model_dir, device=CLI_DEVICE), do_sample=False, max_new_tokens=3)
    expected = [one_line(chat.say(text)) for text in ("hello", "\ufffd\ufffd bad", "bye")]
    assert result.stdout.decode().split("\n") == [*expected, ""]


def test_chat_in_a_terminal_reads_undecodable_bytes_as_replacement_characters(model_dir):
    """The same through input(), which decodes a terminal's line with stdin's encoding and error handler."""
    term = Terminal(["chat", str(model_dir), "--greedy", "--max-new-tokens", "3"], **STRICT_LOCALE)
    term.read_until("you> ")
    term.send(b"\xff\xfe bad\n")
    shown = term.read_until("you> ")
    term.send("/quit\n")
    status, rest = term.finish()
    assert status == 0 and "Traceback" not in shown + rest, shown + rest
    chat = Chat(gpt2.load(model_dir, device=CLI_DEVICE), do_sample=False, max_new_tokens=3)
    assert shown.split("bot> ", 1)[1].rsplit("\n", 1)[0].strip() == one_line(chat.say("\ufffd\ufffd bad")).strip()


def greedy_continuation(model_dir: Path, text: str, n: int) -> str:
    model = gpt2.load(model_dir, device=CLI_DEVICE)
    return model.tokenizer.decode(model.generate([model.tokenizer.encode(text)], max_new_tokens=n)[0],
                                  skip_special_tokens=True)


def test_generate_reads_an_undecodable_prompt_argument_as_replacement_characters(model_dir):
    """argv arrives with surrogateescape: each byte that is not UTF-8 is one lone surrogate, continued as U+FFFD."""
    result = run_cli(["generate", str(model_dir), "--prompt", b"\xff\xfe bad", "--max-new-tokens", "3"], b"",
                     **STRICT_LOCALE)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout.decode() == greedy_continuation(model_dir, "\ufffd\ufffd bad", 3) + "\n"


def test_generate_prints_unencodable_text_as_question_marks(model_dir):
    """A continuation the locale cannot encode prints "?" in place of each such character, not an error."""
    prompt = next((p for p in ("ught", " transcripts") if not greedy_continuation(model_dir, p, 3).isascii()), None)
    if prompt is None:  # on the CPU "ught" is continued by three U+FFFD
        pytest.skip("no candidate prompt has a non-ASCII continuation on this device")
    result = run_cli(["generate", str(model_dir), "--prompt", prompt, "--max-new-tokens", "3"], b"",
                     PYTHONIOENCODING="ascii")
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    expected = greedy_continuation(model_dir, prompt, 3).encode("ascii", "replace").decode()
    assert result.stdout.decode("ascii") == expected + "\n"


@pytest.mark.parametrize("interactive", [False, True], ids=["pipe", "terminal"])
def test_ctrl_c_stops_a_reply_and_the_chat_goes_on(model_dir, monkeypatch, capsys, interactive):
    """Ctrl-C (KeyboardInterrupt from inside generation, after the first reply's first token) stops that reply; the
    next message gets the reply it would get had the stopped turn never been sent; Ctrl-C at the prompt leaves."""
    real_continue = gpt2.chat.continue_from_cache
    calls = []

    def interrupted_once(*args, **kwargs):  # continue_from_cache(model, cache, logits, contexts, params, on_token, ...)
        calls.append(args)
        if len(calls) == 1:
            stream = args[5]

            def stream_then_ctrl_c(row: int, token: int) -> None:
                stream(row, token)
                raise KeyboardInterrupt

            args = (*args[:5], stream_then_ctrl_c, *args[6:])
        return real_continue(*args, **kwargs)

    monkeypatch.setattr(gpt2.chat, "continue_from_cache", interrupted_once)
    messages = ["Hello there", "How are you?"]
    if interactive:
        typed = iter(messages)

        def typing(prompt: str = "") -> str:
            line = next(typed, None)
            if line is None:
                raise KeyboardInterrupt  # Ctrl-C at the prompt
            return line

        monkeypatch.setattr("builtins.input", typing)
        monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    else:
        monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(messages) + "\n"))
    status = main(["chat", str(model_dir), "--max-new-tokens", "6", "--seed", "4"])

    captured = capsys.readouterr()
    assert status == (130 if interactive else 0)
    assert "(reply stopped)" in captured.err and "Traceback" not in captured.err and len(calls) == 2
    lines = captured.out.split("\n")[1:] if interactive else captured.out.split("\n")  # after the banner
    prefix = "bot> " if interactive else ""
    chat = Chat(gpt2.load(model_dir, device=CLI_DEVICE), max_new_tokens=6, seed=4)
    assert (prefix + one_line(chat.say(messages[0]))).startswith(lines[0])  # the stopped reply, cut short
    chat.reset()
    assert lines[1] == prefix + one_line(chat.say(messages[1]))


def test_unknown_commands_get_the_list_of_commands(model_dir, monkeypatch, capsys):
    """A line whose first word is /word but no command lists the commands instead of going to the model, as /help
    does; a slash that begins a message otherwise (a path) still goes to the model."""
    lines = ["/foo bar", "/help", "Hello there", "/usr/bin is a path", "/quit", "never read"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    assert main(["chat", str(model_dir), "--max-new-tokens", "6", "--seed", "4"]) == 0
    captured = capsys.readouterr()
    chat = Chat(gpt2.load(model_dir, device=CLI_DEVICE), max_new_tokens=6, seed=4)
    assert captured.out.split("\n") == [one_line(chat.say("Hello there")), one_line(chat.say("/usr/bin is a path")), ""]
    assert "not a command: /foo bar" in captured.err
    assert captured.err.count(f"/reset {CHAT_COMMANDS['/reset']}") == 2  # the list, for /foo and for /help


def test_generate_takes_the_prompt_as_an_argument_or_as_an_option(model_dir, capsys):
    flags = ["--max-new-tokens", "5"]
    assert main(["generate", str(model_dir), "--prompt", "Hello there", *flags]) == 0
    as_option = capsys.readouterr().out
    assert main(["generate", str(model_dir), "Hello there", *flags]) == 0
    assert capsys.readouterr().out == as_option
    assert main(["generate", str(model_dir), *flags, "Hello there"]) == 0  # after options too
    assert capsys.readouterr().out == as_option

    assert main(["generate", str(model_dir), "Hello there", "--prompt", "Hello there"]) == 2
    err = capsys.readouterr().err
    assert "PROMPT" in err and "--prompt" in err and "not both" in err
    assert main(["generate", str(model_dir)]) == 2
    err = capsys.readouterr().err
    assert "no prompt" in err and "PROMPT" in err and "--prompt" in err


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_non_finite_logits_end_with_a_clean_error(model_dir, monkeypatch, capsys, command):
    """A model whose logits are NaN: one error line naming the problem, status 2, no traceback."""
    real_load = gpt2.cli.load

    def broken_load(*args, **kwargs):
        model = real_load(*args, **kwargs)
        with torch.no_grad():
            model.ln_f.weight.fill_(float("nan"))
        return model

    monkeypatch.setattr(gpt2.cli, "load", broken_load)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\nnever answered\n"))
    args = [command, str(model_dir), *(["--prompt", "Hello there"] if command == "generate" else [])]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gpt2 {command}: error: ") and "NaN" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_seed_outside_torchs_range_is_a_usage_error(model_dir, capsys, command):
    prompt = ["--prompt", "Hello there"] if command == "generate" else []
    assert main([command, str(model_dir), *prompt, "--seed", str(2**70)]) == 2
    err = capsys.readouterr().err
    assert "--seed" in err and str(2**70) in err and "Traceback" not in err


def test_hub_failure_says_how_to_convert_and_chat(monkeypatch, capsys):
    """Whatever the hub fails with, the error names the command-line path and the Python one."""
    import huggingface_hub

    def unreachable(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    assert main(["chat", "someone/some-model"]) == 2
    err = capsys.readouterr().err
    assert "network unreachable" in err
    assert "gpt2 convert SRC DST && gpt2 chat DST" in err and "gpt2.load(DST)" in err
