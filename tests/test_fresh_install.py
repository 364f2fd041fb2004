"""The installed packages as a new user meets them: this engine beside Hugging Face's `kernels`, from any directory.

`transformers` imports Hugging Face's `kernels` package (its hub-kernels integration). This repository's Triton
kernels live in the folder `kernels/` but import as `gpt2_kernels`, and the folder is no regular package, so
neither shadows the other: checked from the repository root (where `python -c` puts the folder on sys.path)
and from elsewhere, through the API and the CLI, in fresh processes under the Triton interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GPT2_COMMAND = Path(sys.executable).with_name("gpt2")  # the console script the install put beside python

BOTH_IN_ONE_PROCESS = textwrap.dedent("""
    import sys
    from pathlib import Path
    import transformers
    from transformers.integrations import hub_kernels  # `from kernels import CUDAProperties, ...` when installed
    transformers.GPT2LMHeadModel
    import gpt2, gpt2_kernels
    try:
        import kernels
    except ImportError:
        kernels = None
    repo = Path(sys.argv[2])
    assert kernels is None or not Path(kernels.__path__[0]).resolve().is_relative_to(repo), kernels.__path__
    assert (repo / "kernels").resolve() in [Path(p).resolve() for p in gpt2_kernels.__path__], gpt2_kernels.__path__
    model = gpt2.load(sys.argv[1], backend="triton")
    assert model.backend.name == "triton"
    print(model.generate([[464, 3290, 318]], max_new_tokens=2, eos_token_id=None))
""")


def interpreted_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GPT2_BACKEND")}
    env["TRITON_INTERPRET"] = "1"
    return env


@pytest.fixture(params=["repo root", "elsewhere"])
def cwd(request, tmp_path) -> Path:
    return REPO if request.param == "repo root" else tmp_path


def test_transformers_and_the_triton_backend_in_one_process(cwd, checkpoints):
    run = subprocess.run([sys.executable, "-c", BOTH_IN_ONE_PROCESS, str(checkpoints["hf-safetensors"]), str(REPO)],
                         cwd=cwd, env=interpreted_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("[[")


@pytest.mark.skipif(not GPT2_COMMAND.exists(), reason="the gpt2 console script is not installed beside this python")
def test_the_cli_runs_the_triton_backend(cwd, checkpoints):
    run = subprocess.run([str(GPT2_COMMAND), "generate", str(checkpoints["hf-safetensors"]), "--prompt", "Hello",
                          "--backend", "triton", "--greedy", "--max-new-tokens", "2"],
                         cwd=cwd, env=interpreted_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def test_the_kernels_folder_is_no_regular_package():
    """An __init__.py would make `kernels/` the package `kernels` from the repository root, shadowing Hugging Face's."""
    assert not (REPO / "kernels" / "__init__.py").exists()
