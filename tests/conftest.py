"""Shared fixtures: the code under test must come from this repository; a tiny GPT-2 and its checkpoints.

Run from the repository root: `python -m pytest` (tests/ is a package, so pytest puts the root on sys.path).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # The Triton kernels are decorated when `gpt2_kernels` is imported: without a GPU they must be
    # interpreted, and TRITON_INTERPRET is only read then, so set it before anything imports them.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import gpt2  # noqa: E402
import gpt2_kernels  # noqa: E402
from gpt2_kernels import ops  # noqa: E402  (every kernel module, decorated now)
from tests.checkpoints import FORMATS, make_reference_model, save_checkpoint
from gpt2.config import GPT2Config

REPO = Path(__file__).resolve().parent.parent


def _from_repo(module: object, folder: str) -> None:
    locations = [Path(p).resolve() for p in getattr(module, "__path__", [])]
    if REPO / folder not in locations:
        raise pytest.UsageError(
            f"`import {module.__name__}` found {locations or module}, not {REPO / folder}: another installation "
            f"shadows this repository's; install this checkout with `python -m pip install -e {REPO}`"
        )


def _kernels_interpreted() -> None:
    """Without a GPU every Triton kernel must have been decorated under TRITON_INTERPRET=1 (see above)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    modules = [module for name, module in sys.modules.items() if name.startswith("gpt2_kernels.")]
    functions = {f"{m.__name__}.{name}": f for m in modules for name, f in vars(m).items()
                 if isinstance(f, (JITFunction, InterpretedFunction))}
    compiled = sorted(name for name, f in functions.items() if not isinstance(f, InterpretedFunction))
    if not functions or compiled:
        raise pytest.UsageError(
            f"no GPU, but the Triton kernels {compiled or 'in gpt2_kernels'} were not decorated under the interpreter: "
            "`gpt2_kernels` was imported before this file set TRITON_INTERPRET=1, or the environment sets it to "
            "something else; run the tests with TRITON_INTERPRET=1"
        )


_from_repo(gpt2, "gpt2")
_from_repo(gpt2_kernels, "kernels")
if not torch.cuda.is_available():
    _kernels_interpreted()
    _problem = ops.interpreter_problem()
    if _problem:
        raise pytest.UsageError(f"no GPU, so the Triton kernels are tested interpreted, but {_problem}")

TINY = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=50257)


@pytest.fixture(scope="session")
def tiny_config() -> GPT2Config:
    return TINY


@pytest.fixture(scope="session")
def reference_model(tiny_config):
    """transformers' GPT2LMHeadModel with tiny_config, seeded, fp32, eval."""
    return make_reference_model(tiny_config, seed=0)


@pytest.fixture(scope="session")
def checkpoints(reference_model, tmp_path_factory) -> dict[str, Path]:
    """reference_model saved in every format of checkpoints.FORMATS: format -> path to read."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {fmt: save_checkpoint(reference_model, root / fmt, fmt) for fmt in FORMATS}


@pytest.fixture(scope="session")
def token_ids() -> torch.Tensor:
    """A fixed batch of inputs (2, 19) for comparing logits."""
    return torch.randint(0, TINY.vocab_size, (2, 19), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are latency-bound: one thread is fastest, and immune to other processes busying the cores.

    Module-scoped; a module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
