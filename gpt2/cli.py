"""The `gpt2` command line: one subcommand per task, each registered by its own `_add_*_parser` function.

Bad input (a checkpoint, config, tokenizer or destination problem) prints `gpt2 <command>: error: <message>`
to stderr and exits with status 2, without a traceback; an operating-system error (permission, disk full)
does the same with status 1. Text that the locale cannot decode or encode (bytes that are not UTF-8 under
LC_ALL=C or PYTHONIOENCODING=utf-8:strict) becomes U+FFFD on input and "?" on output, never an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .bench import quick_bench, quick_bench_estimate
from .chat import CHAT_DEFAULTS, DEFAULT_MAX_HISTORY_TOKENS, Chat, ChatNotice
from .checkpoint import CheckpointError
from .config import ConfigError
from .convert import DTYPES, ConvertError, convert
from .dispatch import BACKENDS
from .decoding import NonFiniteLogitsError
from .loading import load
from .model import GPT2
from .sampling import SamplingParams
from .tokenizer import TokenizerError

USER_ERRORS = (CheckpointError, ConfigError, ConvertError, TokenizerError)
Handler = Callable[[argparse.Namespace], int]


# --- convert ---------------------------------------------------------------------------------------

def _add_convert_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="convert a released checkpoint into this engine's directory format",
        description="Convert SRC (a Hugging Face directory, a DialoGPT .pkl / .bin / .safetensors file, or an "
                    "engine directory) into the engine directory DST (config.json, model.safetensors, vocab.json, "
                    "merges.txt). The model size is inferred from the weights unless --preset or --config is given.",
    )
    p.add_argument("src", help="checkpoint directory or weights file")
    p.add_argument("dst", help="directory to create")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--preset", help="named model size, e.g. dialogpt-medium")
    which.add_argument("--config", help="a Hugging Face GPT-2 config.json to use (checked against the weights)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="store weights in this dtype (default: keep the source's)")
    p.add_argument("--force", action="store_true", help="replace DST if it is a previously converted model")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(handler=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    dst = convert(args.src, args.dst, preset=args.preset, config=args.config,
                  dtype=DTYPES[args.dtype] if args.dtype else None, force=args.force, progress=args.progress)
    print(f"wrote {dst}")
    return 0


# --- generate --------------------------------------------------------------------------------------

def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL",
                   help="an engine directory (gpt2 convert), a Hugging Face directory, a weights file, or a hub id")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="compute dtype (default: fp32; bf16 on a CPU with native bf16 runs the C kernels and oneDNN)")
    p.add_argument("--backend", choices=BACKENDS, help="fused-op backend (default: triton on cuda, torch elsewhere)")
    p.add_argument("--quantize", choices=["int8"],
                   help="int8 linear layers, activations quantized on the fly (CPU, fp32 only)")
    p.add_argument("--kv-dtype", choices=sorted(DTYPES),
                   help="the KV cache's dtype (default: the model's; bf16 or fp16 halve an fp32 cache, CPU only)")
    p.add_argument("--packed-prefill", action="store_true",
                   help="bf16 / int8 on the CPU: keep a second, packed copy of the weights for faster prefills")


SAMPLING_FLAGS = (("max_new_tokens", int, "most tokens per reply"), ("temperature", float, "sampling temperature"),
                  ("top_k", int, "sample among the k most likely tokens (0: all)"),
                  ("top_p", float, "sample within this probability mass (1: all)"),
                  ("repetition_penalty", float, "divide seen tokens' logits by this (1: off)"),
                  ("no_repeat_ngram_size", int, "never repeat an n-gram of this size (0: off)"),
                  ("min_new_tokens", int, "no end of text before this many tokens"))


def _add_sampling_flags(p: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--sample", dest="do_sample", action="store_true", help="sample the next token"
                      + (" (default, but with --num-beams)" if defaults["do_sample"] else ""))
    mode.add_argument("--greedy", dest="do_sample", action="store_false", help="always take the most likely token"
                      + ("" if defaults["do_sample"] else " (default)"))
    p.set_defaults(do_sample=None, sample_by_default=defaults["do_sample"])  # resolved in _sampling
    for name, kind, text in SAMPLING_FLAGS:
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=defaults[name],
                       help=f"{text} (default: {defaults[name]})")
    p.add_argument("--seed", type=_seed, help="random seed, for reproducible sampling")


def _seed(text: str) -> int:
    """--seed's type: an integer SamplingParams accepts, so that a bad one is a usage error naming --seed."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    try:
        return SamplingParams(seed=seed).seed
    except ValueError as e:  # e.g. outside the range torch's generators take
        raise argparse.ArgumentTypeError(str(e)) from None


STOP_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def _add_stop_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stop", action="append", metavar="TEXT", type=_stop_text,
                   help="end a reply once its text contains TEXT, which is kept (repeatable; \\n and \\t are read "
                        "as newline and tab)")


def _stop_text(text: str) -> str:
    """--stop's type: the text with \\n, \\t and \\\\ read as newline, tab and backslash (a shell passes them as typed)."""
    return re.sub(r"\\([nt\\])", lambda m: STOP_ESCAPES[m.group(1)], _text_from_argv(text))


def _add_decoding_flags(p: argparse.ArgumentParser) -> None:
    """Beam search, several sequences, stop strings and a draft model: `generate`'s options of the same names."""
    p.add_argument("--num-beams", type=int, default=1,
                   help="beam search with this many beams, as transformers' (greedy; default: 1, no beam search)")
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam scores are divided by length ** this: > 0 favours longer replies (default: 1.0)")
    p.add_argument("--early-stopping", choices=["true", "false", "never"], default="false",
                   help="when beam search stops, as transformers' early_stopping (default: false)")
    _add_stop_flag(p)
    p.add_argument("--draft", metavar="MODEL",
                   help="speculative decoding: MODEL (same vocabulary, e.g. DialoGPT-small for medium, or the same "
                        "model with --draft-quantize int8) proposes tokens that the model checks several at a time; "
                        "the output is the model's own")
    p.add_argument("--draft-quantize", choices=["int8"], help="int8 linear layers for the draft (CPU, fp32 only)")


def _decoding(args: argparse.Namespace, draft: GPT2 | None) -> dict[str, Any]:
    early_stopping = {"true": True, "false": False, "never": "never"}[args.early_stopping]
    return dict(num_beams=args.num_beams, length_penalty=args.length_penalty, early_stopping=early_stopping,
                num_return_sequences=args.num_return_sequences, stop_strings=args.stop, draft_model=draft)


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling flags as keywords; sampling is the command's default unless --num-beams asks for beam search."""
    do_sample = args.do_sample if args.do_sample is not None else args.sample_by_default and args.num_beams == 1
    return {"do_sample": do_sample, **{name: getattr(args, name) for name, _, _ in SAMPLING_FLAGS}}


def _load(args: argparse.Namespace, model: str, quantize: str | None = None) -> GPT2:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load(model, device=device, dtype=DTYPES[args.dtype], backend=args.backend, quantize=quantize,
                kv_dtype=DTYPES[args.kv_dtype] if args.kv_dtype else None, packed_prefill=args.packed_prefill)


def _load_draft(args: argparse.Namespace) -> GPT2 | None:
    return _load(args, args.draft, args.draft_quantize) if args.draft else None


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _tolerate_undecodable_text() -> None:
    """Undecodable stdin bytes read as U+FFFD (for readline and input() alike) and unencodable reply characters
    print as "?": under a strict locale either would otherwise end the program with a UnicodeError."""
    for stream in (sys.stdin, sys.stdout):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="replace")


def _text_from_argv(text: str) -> str:
    """A command-line argument with its undecodable bytes (lone surrogates, from surrogateescape) as U+FFFD."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _report_non_finite_logits(command: str, error: NonFiniteLogitsError) -> int:
    """End the streamed line and report a model whose logits are NaN / inf: no later reply could be better."""
    _write("\n")
    print(f"gpt2 {command}: error: {error}", file=sys.stderr)
    return 2


def _add_generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt, streaming the text",
                       description="Generate a continuation of PROMPT (or --prompt) with MODEL and stream it to "
                                   "stdout, stopping at <|endoftext|> or --max-new-tokens.")
    _add_model_flags(p)
    p.add_argument("positional_prompt", nargs="?", metavar="PROMPT", help="the text to continue")
    p.add_argument("--prompt", help="the text to continue, as an option (instead of PROMPT)")
    p.add_argument("--chat-format", action="store_true",
                   help="treat the prompt as one DialoGPT turn (append <|endoftext|>) and print the reply")
    defaults = {f.name: f.default for f in dataclasses.fields(SamplingParams)}
    _add_sampling_flags(p, defaults)
    p.add_argument("--num-return-sequences", type=int, default=1,
                   help="sequences to print: with --sample, that many samples continuing one prefill of the prompt; "
                        "with --num-beams, the best beams; each printed after a line naming it and its score "
                        "(default: 1)")
    _add_decoding_flags(p)
    p.set_defaults(handler=_run_generate)


def _prompt_text(args: argparse.Namespace) -> str:
    """The prompt, given either as PROMPT or as --prompt."""
    if args.positional_prompt is not None and args.prompt is not None:
        raise ValueError("give the prompt once: as PROMPT or as --prompt, not both")
    if args.positional_prompt is None and args.prompt is None:
        raise ValueError("no prompt: give the text to continue as PROMPT or as --prompt")
    return _text_from_argv(args.prompt if args.positional_prompt is None else args.positional_prompt)


def _run_generate(args: argparse.Namespace) -> int:
    try:
        text = _prompt_text(args)
        model = _load(args, args.model, args.quantize)
        draft = _load_draft(args)
        tokenizer = model.tokenizer
        prompt = tokenizer.encode(text) + ([tokenizer.eos_token_id] if args.chat_format else [])
        if not prompt:
            raise ValueError("the prompt is empty: give some text as PROMPT or with --prompt")
        params = SamplingParams(**_sampling(args), eos_token_id=tokenizer.eos_token_id, seed=args.seed)
    except ValueError as e:  # a bad model, device or setting
        print(f"gpt2 generate: error: {e}", file=sys.stderr)
        return 2
    decoder = tokenizer.stream_decoder()
    streamed = args.num_beams == 1 and args.num_return_sequences == 1  # else printed once all are known
    try:
        out = model.generate([prompt], **dataclasses.asdict(params), **_decoding(args, draft), return_dict=True,
                             on_token=(lambda _row, token: _write(decoder.push(token))) if streamed else None)
    except NonFiniteLogitsError as e:
        return _report_non_finite_logits("generate", e)
    except ValueError as e:  # e.g. prompt plus max_new_tokens longer than the model's context
        print(f"gpt2 generate: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _write("\n")
        return 130
    if streamed:
        _write(decoder.flush() + "\n")
        return 0
    for i, (tokens, score) in enumerate(zip(out.sequences, out.scores)):
        if len(out.sequences) > 1:
            _write(f"--- {i + 1} of {len(out.sequences)}, score {score:.3f}\n")
        _write(tokenizer.decode(tokens, skip_special_tokens=True) + "\n")
    return 0


# --- chat ------------------------------------------------------------------------------------------

CHAT_COMMANDS = {"/help": "list these commands", "/reset": "forget the conversation",
                 "/quit": "leave (also /exit, Ctrl-D, or Ctrl-C at the prompt; Ctrl-C during a reply stops it)"}
QUIT_COMMANDS = ("/quit", "/exit")
COMMAND_WORD = re.compile(r"/[A-Za-z]\w*")  # a line whose first word is this is meant as a command, not a message


def _command_list() -> str:
    return "commands: " + "; ".join(f"{c} {what}" for c, what in CHAT_COMMANDS.items())


def _add_chat_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a DialoGPT model",
                       description=f"Chat with MODEL, streaming each reply. Interactive on a terminal "
                                   f"({_command_list()}); with stdin a pipe, each input line is one turn and each "
                                   "reply one output line.")
    _add_model_flags(p)
    p.add_argument("--reverse-model", metavar="M", help="a reverse (backward) model: rerank sampled replies by MMI")
    p.add_argument("--n-candidates", type=int, default=10, help="replies sampled per turn for MMI (default: 10)")
    p.add_argument("--mmi-temperature", type=float, default=0.0,
                   help="0 picks the best MMI score; > 0 samples from softmax(score / T) (default: 0)")
    p.add_argument("--mmi-source-turns", type=int, default=1,
                   help="newest history turns the reverse model must predict (default: 1, the message answered)")
    p.add_argument("--max-history-turns", type=int, help="most turns the model sees, the new message included")
    p.add_argument("--max-history-tokens", type=int, default=DEFAULT_MAX_HISTORY_TOKENS,
                   help=f"most history tokens the model sees; 0: only the context length limits it "
                        f"(default: {DEFAULT_MAX_HISTORY_TOKENS})")
    _add_sampling_flags(p, CHAT_DEFAULTS)
    p.add_argument("--num-return-sequences", type=int, default=1,
                   help="replies sampled per turn from one prefill, the one of the best mean log-probability kept "
                        "(n-best; with --reverse-model, --n-candidates are reranked by MMI instead) (default: 1)")
    _add_decoding_flags(p)
    p.set_defaults(handler=_run_chat)


def _run_chat(args: argparse.Namespace) -> int:
    try:
        model = _load(args, args.model, args.quantize)
        reverse = _load(args, args.reverse_model, args.quantize) if args.reverse_model else None
        chat = Chat(model, max_history_turns=args.max_history_turns,
                    max_history_tokens=args.max_history_tokens or None, seed=args.seed, reverse_model=reverse,
                    n_candidates=args.n_candidates, mmi_temperature=args.mmi_temperature,
                    mmi_source_turns=args.mmi_source_turns, **_decoding(args, _load_draft(args)), **_sampling(args))
    except ValueError as e:  # a bad model, device or setting
        print(f"gpt2 chat: error: {e}", file=sys.stderr)
        return 2
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {args.model}; " + ", ".join(f"{c} to {what}" for c, what in CHAT_COMMANDS.items()))
    try:
        _chat_loop(chat, interactive)
    except NonFiniteLogitsError as e:
        return _report_non_finite_logits("chat", e)
    except KeyboardInterrupt:  # at the prompt, or a second Ctrl-C while a reply was being stopped
        _write("\n")
        return 130
    return 0


def _chat_loop(chat: Chat, interactive: bool) -> None:
    """Read turns until end of input or /quit; each reply is streamed on one line."""
    while True:
        if interactive:
            try:
                line = input("you> ")
            except EOFError:  # Ctrl-D
                _write("\n")
                return
        else:
            line = sys.stdin.readline()
            if not line:
                return
        text = line.strip()
        if text in QUIT_COMMANDS:
            return
        if text == "/reset":
            chat.reset()
            print("(history cleared)", file=sys.stderr, flush=True)
        elif text == "/help":
            print(_command_list(), file=sys.stderr, flush=True)
        elif not text:
            print("(empty message: type some text; /reset clears the history, /quit leaves)", file=sys.stderr,
                  flush=True)
        elif COMMAND_WORD.fullmatch(text.split()[0]):
            print(f"(not a command: {text}; {_command_list()})", file=sys.stderr, flush=True)
        else:
            _reply(chat, text, interactive)


def _reply(chat: Chat, text: str, interactive: bool) -> None:
    """Stream the reply to text on one line. Ctrl-C stops it and the chat goes on as if the turn never happened
    (Chat keeps a turn only once its reply is complete)."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", ChatNotice)
        warnings.showwarning = lambda message, *_: print(f"notice: {message}", file=sys.stderr, flush=True)
        _write("bot> " if interactive else "")
        try:
            chat.say(text, on_text=lambda piece: _write(piece.replace("\r", " ").replace("\n", " ")))
        except KeyboardInterrupt:
            _write("\n")
            print("(reply stopped)", file=sys.stderr, flush=True)
            return
    _write("\n")


# --- bench ---------------------------------------------------------------------------------------

def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time generation on this machine (seeded random weights, no download)",
                       description="Time this engine (CPU: fp32, int8, bf16; CUDA: fp16, fp32) on seeded random "
                                   "weights of the DialoGPT shapes: prefill, decode per step, tokens/s, against the "
                                   "machine's weight-streaming bound. The comparisons with other engines are "
                                   "`python -m benchmarks.bench_generation` (CPU: transformers, CTranslate2, "
                                   "torch.compile) and `python -m benchmarks.bench_generation_cuda` in a checkout.")
    p.add_argument("--sizes", nargs="+", choices=["tiny", "small", "medium"], default=["small"],
                   help="model shapes (default: small)")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8], help="batch sizes (default: 1 8)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per row (default: 32)")
    p.add_argument("--new-tokens", type=int, default=16, help="greedy tokens per row (default: 16)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats, medians reported (default: 3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cpu: fp32, int8 and bf16 paths; cuda: fp16 and fp32 with CUDA-graph decode (default: cpu)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(handler=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    if args.new_tokens < 2 or args.repeats < 1 or args.prompt_len < 1 or min(args.batch) < 1:
        print("gpt2 bench: error: --new-tokens must be >= 2; --repeats, --prompt-len and --batch >= 1",
              file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpt2 bench: error: --device cuda, but torch sees no CUDA GPU", file=sys.stderr)
        return 2
    print(quick_bench_estimate(args.sizes, args.batch, args.prompt_len, args.new_tokens, args.repeats, args.threads,
                               args.device), file=sys.stderr, flush=True)
    print(quick_bench(args.sizes, args.batch, args.prompt_len, args.new_tokens, args.repeats, args.threads,
                      args.progress, args.device))
    return 0


# --- serve ---------------------------------------------------------------------------------------

API_KEY_VARIABLE = "GPT2_SERVE_API_KEY"


def _add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve MODEL over HTTP with OpenAI's API, batching requests as they come",
                       description="Serve MODEL over HTTP with OpenAI's completions and chat completions API "
                                   "(/v1/completions, /v1/chat/completions, /v1/models), /health and /metrics "
                                   "(Prometheus). Requests join and leave one running batch at every decode step. "
                                   "Needs the serve extra: pip install 'dialogpt-engine[serve]'.")
    _add_model_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0: any free port)")
    p.add_argument("--model-name", help="the model's id in the API (default: MODEL as given)")
    p.add_argument("--max-batch", type=int,
                   help="most choices decoding together (default: 16 on the CPU, the C step's most rows; 64 on CUDA)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="most requests waiting for the batch; beyond, 429 with Retry-After (default: 64)")
    p.add_argument("--prefill-chunk", type=int, default=256,
                   help="most prompt tokens prefilled between two decode steps (default: 256)")
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds a request may take, waiting included (default: 600)")
    p.add_argument("--drain-timeout", type=int, default=30,
                   help="on SIGTERM, seconds the requests in flight may take to finish (default: 30)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_VARIABLE),
                   help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_VARIABLE}; unset: no key)")
    p.set_defaults(handler=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    try:  # the serve extra's packages, needed by this command alone
        from .serve.server import ServeOptions, serve
    except ImportError as e:
        print(f"gpt2 serve: error: the serve extra is not installed ({e}): pip install 'dialogpt-engine[serve]'",
              file=sys.stderr)
        return 2
    try:
        options = ServeOptions(model_id=args.model_name or args.model, host=args.host, port=args.port,
                               max_batch=args.max_batch, max_queue=args.max_queue, prefill_chunk=args.prefill_chunk,
                               request_timeout_s=args.request_timeout, drain_timeout_s=args.drain_timeout,
                               api_key=args.api_key or None)
        model = _load(args, args.model, args.quantize)
        serve(model, options)
    except ValueError as e:  # a bad model, device or setting
        print(f"gpt2 serve: error: {e}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpt2", description="GPT-2 / DialoGPT inference engine")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_convert_parser(sub)
    _add_generate_parser(sub)
    _add_chat_parser(sub)
    _add_bench_parser(sub)
    _add_serve_parser(sub)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """parse_args, but `gpt2 generate MODEL --greedy "text"` works too: argparse (Python 3.11's at least) gives the
    optional PROMPT nothing when it reads MODEL alone, and leaves the text over as an unrecognized argument."""
    args, extras = parser.parse_known_args(argv)
    if getattr(args, "positional_prompt", "") is None and len(extras) == 1 and not extras[0].startswith("-"):
        args.positional_prompt = extras.pop()
    if extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    _tolerate_undecodable_text()
    try:
        args = _parse(build_parser(), argv)
    except SystemExit as e:  # argparse has printed the usage error or the help
        return e.code if isinstance(e.code, int) else 2
    handler: Handler = args.handler
    try:
        return handler(args)
    except USER_ERRORS as e:
        print(f"gpt2 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. permission denied or disk full while writing
        print(f"gpt2 {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
