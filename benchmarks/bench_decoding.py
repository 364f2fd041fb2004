"""Decoding strategies on the CPU: beam search against greedy decoding and transformers' beam search, speculative
decoding against the target model alone.

Beam search: ms per decode step of 4 beams of one prompt against a greedy step of a batch of 4 (the same rows), and
against transformers' `generate(num_beams=4)` on the same seeded random weights; per step is (n-token generate -
one-token generate) / (n - 1), as `gpt2 bench` times it. Speculative decoding: tokens/s of the drafted generate against
the target alone, and the draft's acceptance (the share of its proposed tokens the target kept), for fp32 DialoGPT-small
drafted by its int8 copy, fp32 medium by its int8 copy and by fp32 small, at batch 1 and 8. Every generate runs exactly
--new-tokens greedy tokens per row (end of text suppressed); the engines of a comparison are interleaved within each
repeat, each waiting for a quiet machine, and the ratios are taken within each repeat.

Random weights are not a language. Their next-token distributions are nearly uniform over 50257 tokens, with a
different argmax for every model: a draft that is another random model (fp32 small drafting medium) agrees with the
target about as often as chance, so its speed-up says nothing about real checkpoints, while an int8 copy agrees wherever
its rounding does not flip the argmax. Acceptance is the number to watch. With --trained, a pair with language-like
distributions is added: two small GPT-2s trained for --train-seconds each on this machine's Python standard library
sources (named stdlib-gpt2-*, trained here; they are not DialoGPT), the larger drafted by the smaller and by its int8
copy.

    python -m benchmarks.bench_decoding --trained              # the committed run (about 40 minutes on 2 busy cores)
    python -m benchmarks.bench_decoding --smoke --out /tmp/smoke   # seconds: what the tests run
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import statistics
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from benchmarks.bench_generation import machine
from benchmarks.host import cpu_times, other_cores, steal_seconds, wait_for_quiet
from benchmarks.reference import reference_pair
from gpt2 import GPT2, GPT2Config
from gpt2.bench import SIZES, Engine, Timing, format_table, measure, random_model, random_prompts
from gpt2.checkpoint import to_engine_state_dict
from gpt2.cpu.huge_pages import huge_page_weights
from gpt2.cpu.int8_linear import quantize_int8
from gpt2.tokenizer import Tokenizer

BEAMS = 4


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8], help="speculative decoding's batch sizes")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5,
                   help="timed repeats per engine, interleaved; medians and the fastest reported")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--trained", action="store_true",
                   help="add a pair trained here on the Python standard library's sources (language-like)")
    p.add_argument("--train-seconds", type=float, default=240.0, help="training time of each trained model")
    p.add_argument("--smoke", action="store_true", help="tiny models, 3 tokens, one repeat, no waiting (the tests)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results",
                   help="directory for decoding.json and decoding.md")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.prompt_len, args.new_tokens, args.repeats, args.train_seconds = [1, 2], 8, 3, 1, 2.0
        args.trained = True
    return args


# --- engines -------------------------------------------------------------------------------------------------------

def greedy_engine(model: GPT2, name: str, **kwargs) -> Engine:
    """This engine's greedy generate of exactly n tokens per row, with generate's kwargs (num_beams, draft_model)."""

    def generate(prompts: list[list[int]], n: int) -> list[list[int]]:
        return model.generate(prompts, max_new_tokens=n, min_new_tokens=n, eos_token_id=model.config.eos_token_id,
                              **kwargs)

    return Engine(name, generate)


def first_prompt_only(engine: Engine) -> Engine:
    """engine on the first prompt alone: beam search's rows are its beams."""
    return Engine(engine.name, lambda prompts, n: engine.generate(prompts[:1], n))


def transformers_beams(hf_model: torch.nn.Module) -> Engine:
    def generate(prompts: list[list[int]], n: int) -> list[list[int]]:
        ids = torch.tensor(prompts[:1])
        with torch.inference_mode():
            out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                    num_beams=BEAMS, do_sample=False, pad_token_id=hf_model.config.eos_token_id)
        return out[:, ids.shape[1]:].tolist()

    return Engine(f"transformers beam search {BEAMS}", generate)


def timed(engines: list[Engine], prompts: list[list[int]], args: argparse.Namespace) -> dict[str, Timing]:
    for engine in engines:  # warm-up: kernels built, pages touched, caches pooled
        engine.generate(prompts, 2)
    return measure(engines, prompts, args.new_tokens, args.repeats, before_turn=None if args.smoke else wait_for_quiet)


def ratio(a: float, b: float) -> float:
    """a / b; NaN where b, a decode time (the difference of two generates), came out 0: a smoke run's few tokens."""
    return a / b if b > 0 else float("nan")


def paired(timings: dict[str, Timing], slow: str, fast: str, by: Callable[[Timing], list[float]]) -> list[float]:
    """Per repeat, by(slow) / by(fast): ratios of samples taken seconds apart."""
    return [ratio(a, b) for a, b in zip(by(timings[slow]), by(timings[fast]))]


def full_seconds(t: Timing) -> list[float]:
    return t.full


# --- beam search ---------------------------------------------------------------------------------------------------

def run_beams(config: GPT2Config, args: argparse.Namespace) -> dict:
    hf_model, model = reference_pair(config)
    prompts = random_prompts(BEAMS, args.prompt_len, config.vocab_size)
    greedy = greedy_engine(model, f"greedy batch {BEAMS}")
    ours = first_prompt_only(greedy_engine(model, f"beam search {BEAMS}", num_beams=BEAMS))
    theirs = transformers_beams(hf_model)
    same = ours.generate(prompts, args.new_tokens) == theirs.generate(prompts, args.new_tokens)
    timings = timed([greedy, ours, theirs], prompts, args)
    return {"config": vars(config), "identical_to_transformers": same,
            "decode_ms": {name: t.decode_ms for name, t in timings.items()},
            "best_decode_ms": {name: t.best_decode_ms for name, t in timings.items()},
            "decode_ms_by_repeat": {name: t.decode_by_repeat() for name, t in timings.items()},
            "beam_over_greedy_by_repeat": paired(timings, ours.name, greedy.name, Timing.decode_by_repeat),
            "transformers_over_beam_by_repeat": paired(timings, theirs.name, ours.name, Timing.decode_by_repeat)}


# --- speculative decoding ------------------------------------------------------------------------------------------

def run_pair(name: str, target: GPT2, draft: GPT2, args: argparse.Namespace, vocab_size: int,
             prompts_for: Callable[[int], list[list[int]]] | None = None) -> dict:
    """The target alone against the target drafted by draft, at each batch size."""
    runs = []
    for batch in args.batch:
        prompts = prompts_for(batch) if prompts_for else random_prompts(batch, args.prompt_len, vocab_size)
        alone, drafted = greedy_engine(target, "target alone"), greedy_engine(target, "drafted", draft_model=draft)
        out = target.generate(prompts, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                              eos_token_id=target.config.eos_token_id, draft_model=draft, return_dict=True)
        same = out.sequences == alone.generate(prompts, args.new_tokens)
        timings = timed([alone, drafted], prompts, args)
        runs.append({"batch": batch, "acceptance": out.draft_acceptance, "identical_to_target": same,
                     "draft_stopped_after": out.draft_stopped_after,
                     "tokens_per_s": {n: t.tokens_per_s for n, t in timings.items()},
                     "best_tokens_per_s": {n: batch * args.new_tokens / min(t.full) for n, t in timings.items()},
                     "speedup_by_repeat": paired(timings, alone.name, drafted.name, full_seconds),
                     "seconds_by_repeat": {n: t.full for n, t in timings.items()}})
        print(f"{name}, batch {batch}: acceptance {out.draft_acceptance:.3f}, speed-up "
              f"{statistics.median(runs[-1]['speedup_by_repeat']):.2f}", flush=True)
    return {"pair": name, "runs": runs}


def random_pairs(args: argparse.Namespace) -> list[dict]:
    sizes = ["tiny"] if args.smoke else ["small", "medium"]
    models = {size: random_model(SIZES[size]) for size in sizes}
    vocab = SIZES[sizes[0]].vocab_size
    results = []
    for size in sizes:
        int8 = quantize_int8(copy.deepcopy(models[size]))
        results.append(run_pair(f"{size} fp32 drafted by {size} int8 (random weights)", models[size], int8, args, vocab))
        del int8
    if not args.smoke:
        results.append(run_pair("medium fp32 drafted by small fp32 (random weights)", models["medium"], models["small"],
                                args, vocab))
    return results


# --- a language-like pair, trained here ----------------------------------------------------------------------------

# The trained models read GPT-2's BPE tokens mapped onto ids 1 .. STDLIB_VOCAB - 2 by frequency, the rest onto the last
# id (a 50257-row lm_head would take most of a few minutes' training on 2 cores); id 0, their end of text, never occurs,
# so suppressing it (the benchmark's min_new_tokens) leaves their distributions as trained.
STDLIB_VOCAB = 8192
STDLIB_CONFIGS = {
    "stdlib-gpt2-4x256": GPT2Config(n_embd=256, n_layer=4, n_head=4, n_positions=256, vocab_size=STDLIB_VOCAB,
                                    bos_token_id=0, eos_token_id=0),
    "stdlib-gpt2-2x128": GPT2Config(n_embd=128, n_layer=2, n_head=2, n_positions=256, vocab_size=STDLIB_VOCAB,
                                    bos_token_id=0, eos_token_id=0)}
SMOKE_CONFIGS = {name: GPT2Config(n_embd=64, n_layer=1, n_head=4, n_positions=64, vocab_size=STDLIB_VOCAB,
                                  bos_token_id=0, eos_token_id=0) for name in ("stdlib-gpt2-smoke-a", "stdlib-gpt2-smoke-b")}


def stdlib_tokens(limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training tokens, held-out tokens): the Python standard library's .py sources in GPT-2's BPE (files in sorted
    order, every tenth held out for the prompts, at most about limit tokens to train on), each id mapped to 1 + its
    rank among the training tokens' STDLIB_VOCAB - 2 most frequent, the rest to STDLIB_VOCAB - 1."""
    tokenizer = Tokenizer.default()
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    train_ids: list[int] = []
    held_ids: list[int] = []
    for i, path in enumerate(files):
        ids = tokenizer.encode(path.read_text(errors="replace"))
        (held_ids if i % 10 == 9 else train_ids).extend(ids)
        if len(train_ids) >= limit and len(held_ids) >= limit // 10:
            break
    train_t, held_t = torch.tensor(train_ids, dtype=torch.long), torch.tensor(held_ids, dtype=torch.long)
    ranked = torch.bincount(train_t, minlength=tokenizer.vocab_size).argsort(descending=True)
    rank = torch.full((tokenizer.vocab_size,), STDLIB_VOCAB - 1)
    rank[ranked[:STDLIB_VOCAB - 2]] = torch.arange(1, STDLIB_VOCAB - 1)
    return rank[train_t], rank[held_t]


def train(config: GPT2Config, tokens: torch.Tensor, seconds: float, seed: int = 0) -> tuple[GPT2, dict]:
    """A transformers GPT-2 of config trained from scratch on random windows of tokens for `seconds` (AdamW), as this
    engine's model; and what the training did (steps, the last loss)."""
    torch.manual_seed(seed)
    hf_model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config.to_dict())).train()
    optimizer = torch.optim.AdamW(hf_model.parameters(), lr=1e-3, weight_decay=0.0)
    window, batch = min(128, config.n_positions), 16  # (batch, window, vocab) logits: 64 MiB
    g = torch.Generator().manual_seed(seed)
    start, steps, losses = time.perf_counter(), 0, []
    while time.perf_counter() - start < seconds or steps == 0:
        offsets = torch.randint(0, len(tokens) - window, (batch,), generator=g)
        ids = torch.stack([tokens[o:o + window] for o in offsets.tolist()])  # (batch, window)
        loss = hf_model(ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        steps += 1
    _, state_dict = to_engine_state_dict(hf_model.eval().state_dict(), source="trained model", config=config)
    model = GPT2(config)
    model.load_state_dict(state_dict)
    huge_page_weights(model)  # as gpt2.load places them
    return model.eval(), {"steps": steps, "seconds": time.perf_counter() - start,
                          "loss_last_20": statistics.mean(losses[-20:]), "loss_first": losses[0]}


def held_out_agreement(target: GPT2, draft: GPT2, held: torch.Tensor, window: int) -> float:
    """How often draft's argmax is target's over held-out text, each position read with the text before it in its
    window (teacher forcing): what greedy acceptance would be were the generated text like the held-out text."""
    n = min(len(held) // window, 32) * window
    ids = held[:n].view(-1, window)  # (rows, window)
    with torch.inference_mode():
        return (target(ids).argmax(-1) == draft(ids).argmax(-1)).float().mean().item()


def trained_pairs(args: argparse.Namespace) -> tuple[list[dict], dict]:
    configs = SMOKE_CONFIGS if args.smoke else STDLIB_CONFIGS
    train_tokens, held = stdlib_tokens(20_000 if args.smoke else 3_000_000)
    (big_name, big_config), (small_name, small_config) = configs.items()
    big, big_training = train(big_config, train_tokens, args.train_seconds, seed=0)
    small, small_training = train(small_config, train_tokens, args.train_seconds, seed=1)

    def prompts_for(batch: int) -> list[list[int]]:
        starts = torch.randint(0, len(held) - args.prompt_len, (batch,), generator=torch.Generator().manual_seed(2))
        return [held[s:s + args.prompt_len].tolist() for s in starts.tolist()]

    vocab = big_config.vocab_size
    agreement = held_out_agreement(big, small, held, big_config.n_positions)
    print(f"{small_name}'s argmax agrees with {big_name}'s at {agreement:.3f} of held-out positions", flush=True)
    pairs = [run_pair(f"{big_name} fp32 drafted by its int8 copy (trained here)", big,
                      quantize_int8(copy.deepcopy(big)), args, vocab, prompts_for),
             run_pair(f"{big_name} fp32 drafted by {small_name} fp32 (trained here)", big, small, args, vocab,
                      prompts_for)]
    training = {"tokens": len(train_tokens), "held_out_tokens": len(held), "held_out_argmax_agreement": agreement,
                big_name: {"config": vars(big_config), **big_training},
                small_name: {"config": vars(small_config), **small_training}}
    return pairs, training


# --- report --------------------------------------------------------------------------------------------------------

def beam_lines(beams: dict) -> list[str]:
    ms, best = beams["decode_ms"], beams["best_decode_ms"]
    over_greedy, over_ours = beams["beam_over_greedy_by_repeat"], beams["transformers_over_beam_by_repeat"]
    names = list(ms)
    greedy, ours, theirs = names
    return [format_table(["engine", "decode ms/step (median)", "fastest"],
                         [[name, f"{ms[name]:.2f}", f"{best[name]:.2f}"] for name in names]), "",
            f"- a step of {BEAMS} beams over a greedy step of batch {BEAMS}: {statistics.median(over_greedy):.2f}x "
            f"(median of the repeats' ratios; each repeat {', '.join(f'{r:.2f}' for r in over_greedy)}); of the "
            f"fastest runs {ratio(best[ours], best[greedy]):.2f}x",
            f"- transformers' beam search step over this engine's: {statistics.median(over_ours):.2f}x (each repeat "
            f"{', '.join(f'{r:.2f}' for r in over_ours)}); of the fastest runs {ratio(best[theirs], best[ours]):.2f}x",
            f"- this engine's beams identical to transformers': {beams['identical_to_transformers']}"]


def speculative_table(pairs: list[dict]) -> str:
    rows = []
    for pair in pairs:
        for run in pair["runs"]:
            tps = run["tokens_per_s"]
            speedup = run["speedup_by_repeat"]
            best = run["best_tokens_per_s"]
            rows.append([pair["pair"], run["batch"], f"{run['acceptance']:.3f}", f"{tps['target alone']:.1f}",
                         f"{tps['drafted']:.1f}", f"{statistics.median(speedup):.2f} "
                         f"({min(speedup):.2f}-{max(speedup):.2f})", f"{best['drafted'] / best['target alone']:.2f}",
                         run["identical_to_target"], run["draft_stopped_after"] or "never"])
    return format_table(["pair", "batch", "acceptance", "alone tokens/s", "drafted tokens/s",
                         "speed-up: median (range over repeats)", "of the fastest", "same tokens",
                         "drafting stopped after (rounds)"], rows)


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = ["# Decoding benchmark: beam search and speculative decoding", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, CPU capability {m['cpu_capability']}; torch {m['torch']}, "
             f"transformers {m['transformers']}; Python {m['python']}; {results['threads']} threads. "
             f"This engine's {m['cpu_kernels']}.",
             f"Other processes used {results['other_processes_cores']:.2f} cores on average during the run, other "
             f"guests of the host (steal time) {results['steal_cores']:.2f}.", "",
             f"Command: `{results['command']}`; every sample: `decoding.json`. Prompt {results['prompt_len']} tokens, "
             f"{results['new_tokens']} greedy tokens per row (end of text suppressed), median of {results['repeats']} "
             "interleaved repeats, seeded random weights of the DialoGPT shapes unless named.", "",
             f"## Beam search ({results['beams']['size']}, {BEAMS} beams, fp32)", "", *beam_lines(results["beams"]),
             "", "## Speculative decoding (greedy)", "", speculative_table(results["speculative"]), "",
             "Acceptance: the share of the draft's proposed tokens the target kept. Tokens/s: medians over the "
             "repeats. Speed-up: the target alone's generate time over the drafted one's, within each repeat; of the "
             "fastest: the same from each engine's fastest repeat, what a machine undisturbed by its neighbours gets. "
             "Same tokens: the drafted output equals the target's alone. Drafting stopped after: the rounds the "
             "check run drafted before drafting was measured not to pay (`gpt2.draft_gate`; each timed repeat decides "
             "anew). Random weights are not a language: their next-token distributions are nearly uniform, "
             "so a draft that is another random model agrees with the target about as often as chance and its "
             "figures say nothing about real checkpoints; acceptance is the number to watch."]
    if "training" in results:
        t = results["training"]
        lines += ["", "Trained here (not DialoGPT): "
                  + "; ".join(f"{name}: n_embd {v['config']['n_embd']}, {v['config']['n_layer']} layers, "
                              f"{v['steps']} AdamW steps in {v['seconds']:.0f} s, loss {v['loss_first']:.2f} -> "
                              f"{v['loss_last_20']:.2f}" for name, v in t.items() if isinstance(v, dict))
                  + f", on {t['tokens']} tokens of the Python standard library's sources (GPT-2 BPE, the 8190 most "
                  "frequent tokens kept); prompts from held-out files. Over held-out text read with teacher forcing, the "
                  f"smaller model's argmax is the larger's at {t['held_out_argmax_agreement']:.3f} of the positions: "
                  "the greedy acceptance were the generated text like the held-out text."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    start, steal_start = cpu_times(), steal_seconds()
    command = shlex.join(["python", "-m", "benchmarks.bench_decoding", *(sys.argv[1:] if argv is None else argv)])
    results: dict = {"machine": machine(), "command": command, "threads": args.threads, "prompt_len": args.prompt_len,
                     "new_tokens": args.new_tokens, "repeats": args.repeats}
    beam_size = "tiny" if args.smoke else "small"
    results["beams"] = {"size": beam_size, **run_beams(SIZES[beam_size], args)}
    print("\n".join(beam_lines(results["beams"])), flush=True)
    results["speculative"] = random_pairs(args)
    if args.trained:
        pairs, results["training"] = trained_pairs(args)
        results["speculative"] += pairs
    results["other_processes_cores"] = other_cores(start)
    results["steal_cores"] = (steal_seconds() - steal_start) / max(cpu_times()[2] - start[2], 1e-9)
    (args.out / "decoding.json").write_text(json.dumps(results, indent=1))
    (args.out / "decoding.md").write_text(markdown(results))
    print(speculative_table(results["speculative"]))
    print(f"wrote decoding.json and decoding.md to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
