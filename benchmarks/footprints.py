"""What transformers' load costs in memory, measured as this engine's is (`gpt2.memory`): in a fresh process,
`python -m benchmarks.footprints HF_DIR`, the RSS after `from_pretrained` and its peak, then a generate's growth.
CTranslate2's worker process reports its own (benchmarks/ctranslate2_engine.py)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

from gpt2.process_memory import process_memory, reset_peak


def transformers_footprint(hf_model: torch.nn.Module, workdir: Path, threads: int, batch: int, prompt_len: int,
                           new_tokens: int) -> dict[str, float]:
    """hf_model saved into workdir and loaded back in a fresh process: its runtime (RSS after importing torch and
    transformers), RSS after `from_pretrained`, the peak by then and the load's seconds, and a generate's peak growth
    (MB). Raises RuntimeError with the child's stderr if it fails."""
    hf_model.save_pretrained(workdir)
    command = [sys.executable, "-m", "benchmarks.footprints", str(workdir), "--threads", str(threads), "--batch",
               str(batch), "--prompt-len", str(prompt_len), "--new-tokens", str(new_tokens)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    if done.returncode != 0:
        raise RuntimeError(f"transformers footprint failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    runtime = process_memory().rss
    start = time.perf_counter()
    model = transformers.GPT2LMHeadModel.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    load_s = time.perf_counter() - start
    after_load = process_memory()
    reset_peak()
    ids = torch.tensor([[(17 * row + 31 * i) % model.config.vocab_size for i in range(args.prompt_len)]
                        for row in range(args.batch)])
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                       min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=model.config.eos_token_id)
    print(json.dumps({"runtime_mb": runtime, "rss_after_load_mb": after_load.rss, "load_peak_mb": after_load.peak,
                      "load_s": load_s, "generate_growth_mb": process_memory().peak - after_load.rss}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
