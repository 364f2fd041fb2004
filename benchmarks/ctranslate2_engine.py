"""CTranslate2 as a benchmark engine, each compute type in a worker process of its own.

In the benchmark's process, CTranslate2's OpenMP threads keep spinning for a while after each of its calls,
on the two cores the next engine timed needs: this engine measured 1-4 ms per decode step slower beside it.
In a worker process that spinning is another process's CPU use, which the benchmark's quiet wait
(`benchmarks.host.wait_for_quiet`) sits out before timing the next engine. A call's round trip through the pipe
(lists of token ids) is timed with it and costs well under a millisecond.
"""

from __future__ import annotations

import multiprocessing
import time
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from gpt2.bench import Engine

COMPUTE_TYPES = {"float32": "ctranslate2 fp32", "int8": "ctranslate2 int8"}


def ctranslate2_engines(hf_model: torch.nn.Module, workdir: Path, threads: int) -> list[Engine]:
    """One engine per compute type, converted from hf_model's weights with CTranslate2's TransformersConverter."""
    import transformers
    from ctranslate2.converters import TransformersConverter

    from gpt2.tokenizer import VOCAB_DIR

    hf_dir, ct2_dir = workdir / "hf", workdir / "ct2"
    hf_model.save_pretrained(hf_dir)
    tokenizer = transformers.GPT2TokenizerFast.from_pretrained(VOCAB_DIR)  # the converter wants the vocabulary
    tokenizer.save_pretrained(hf_dir)
    TransformersConverter(str(hf_dir)).convert(str(ct2_dir), force=True)
    vocabulary = tokenizer.convert_ids_to_tokens(list(range(hf_model.config.vocab_size)))  # id -> token string
    return [_worker_engine(name, ct2_dir, compute_type, threads, vocabulary)
            for compute_type, name in COMPUTE_TYPES.items()]


def _worker_engine(name: str, model_dir: Path, compute_type: str, threads: int, vocabulary: list[str]) -> Engine:
    parent, child = multiprocessing.get_context("spawn").Pipe()
    process = multiprocessing.get_context("spawn").Process(
        target=serve, args=(child, str(model_dir), compute_type, threads, vocabulary), daemon=True, name=name)
    process.start()
    child.close()

    def call(*request: object) -> object:
        parent.send(request)
        status, value = parent.recv()
        if status == "error":
            raise RuntimeError(f"{name} worker: {value}")
        return value

    call("ready")  # raises here, at set-up, if the worker could not load the model

    def close() -> None:
        if process.is_alive():
            parent.send(("stop",))
        process.join(timeout=30)
        parent.close()

    return Engine(name, lambda prompts, n: call("generate", prompts, n),
                  logits=lambda prompts: torch.from_numpy(call("logits", prompts)),
                  memory_mb=lambda prompts, n: call("memory", prompts, n), close=close,
                  footprint=lambda: call("footprint"))


def serve(conn: Connection, model_dir: str, compute_type: str, threads: int, vocabulary: list[str]) -> None:
    """The worker: answers ("ready"), ("generate", prompts, n), ("logits", prompts), ("memory", prompts, n),
    ("footprint") until ("stop")."""
    try:
        import ctranslate2
        import numpy as np

        from benchmarks.host import peak_rss_growth_mb
        from gpt2.process_memory import process_memory

        runtime = process_memory().rss  # this process's RSS before the model, imports done
        start = time.perf_counter()
        generator = ctranslate2.Generator(model_dir, device="cpu", compute_type=compute_type,
                                          intra_threads=threads, inter_threads=1)
        load_s, after_load = time.perf_counter() - start, process_memory()
    except Exception as e:  # noqa: BLE001 - reported to the parent, which skips this engine with the reason
        conn.recv()
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return

    def generate(prompts: list[list[int]], n: int) -> list[list[int]]:
        tokens = [[vocabulary[i] for i in p] for p in prompts]
        results = generator.generate_batch(tokens, max_length=n, min_length=n, sampling_topk=1,
                                           include_prompt_in_result=False)
        return [r.sequences_ids[0] for r in results]

    while True:
        kind, *args = conn.recv()
        if kind == "stop":
            return
        try:
            if kind == "ready":
                value: object = True
            elif kind == "generate":
                value = generate(*args)
            elif kind == "logits":  # (B, T, V) fp32 at every position of equal-length prompts
                value = np.asarray(generator.forward_batch(args[0]), dtype=np.float32)
            elif kind == "footprint":  # as benchmarks.footprints reports transformers'
                value = {"runtime_mb": runtime, "rss_after_load_mb": after_load.rss, "load_peak_mb": after_load.peak,
                         "load_s": load_s}
            else:  # "memory"
                value = peak_rss_growth_mb(lambda: generate(*args))
            conn.send(("ok", value))
        except Exception as e:  # noqa: BLE001
            conn.send(("error", f"{type(e).__name__}: {e}"))
