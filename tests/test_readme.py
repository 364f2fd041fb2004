"""README.md's code blocks run as written, against tiny local models posing as the hub ids they name.

The hub ids in README (`microsoft/DialoGPT-*`) resolve offline from a Hugging Face cache this test writes:
each holds a seeded random tiny GPT-2 (no machine here reaches the hub). The setup and test commands are
what CI itself runs around this test (`.ci/run` reads them from README), so they are checked to be there,
not run again.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.checkpoints import make_reference_model, save_checkpoint

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"^```(\w+)\n(.*?)^```$", README, flags=re.DOTALL | re.MULTILINE)  # (language, code)
SETUP, TEST = "python -m pip install", "python -m pytest"  # run by CI around this test, not by it
HUB_IDS = sorted(set(re.findall(r"\bmicrosoft/DialoGPT-\w+", README)))
SNAPSHOT = "0" * 40  # the commit hash the fake hub cache's refs/main points to


def commands(language: str, code: str) -> list[str]:
    """The block's commands: a python block whole, a bash block line by line (comments and blanks dropped)."""
    if language == "python":
        return [code]
    return [line for line in code.splitlines() if line.strip() and not line.lstrip().startswith("#")]


RUNNABLE = [(language, command) for language, code in BLOCKS if language in ("bash", "python")
            for command in commands(language, code) if not command.startswith((SETUP, TEST))]


def test_the_front_door_has_the_setup_main_job_and_test_commands():
    """`.ci/run` takes the line after `# set up` and after `# tests` in README's first bash block."""
    language, first = BLOCKS[0]
    lines = first.splitlines()
    assert language == "bash"
    for marker, command in (("# set up", SETUP), ("# main job", "gpt2 "), ("# tests", TEST)):
        at = next(i for i, line in enumerate(lines) if line.startswith(marker))
        assert lines[at + 1].startswith(command), (marker, lines[at + 1])
    assert 10 <= README.index("```bash") < 1500  # near the top


@pytest.fixture(scope="module")
def readme_env(tmp_path_factory, tiny_config) -> dict[str, str]:
    """An environment where README's hub ids resolve offline to tiny models, with caches in a temporary directory."""
    root = tmp_path_factory.mktemp("readme")
    hub = root / "hub"
    model = make_reference_model(tiny_config, seed=0)
    for repo_id in HUB_IDS:
        repo = hub / f"models--{repo_id.replace('/', '--')}"
        save_checkpoint(model, repo / "snapshots" / SNAPSHOT, "hf-safetensors")
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(SNAPSHOT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "GPT2_"))}
    env.update(HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1", GPT2_ENGINE_CACHE=str(root / "engine"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(REPO))
    return env


@pytest.mark.parametrize("language, command", RUNNABLE, ids=[f"{lang}:{cmd.splitlines()[0][:40]}" for lang, cmd in RUNNABLE])
def test_readme_block_runs_as_written(language, command, readme_env, tmp_path):
    argv = [sys.executable, "-c", command] if language == "python" else ["bash", "-c", command]
    run = subprocess.run(argv, cwd=tmp_path, env=readme_env, input="Hello, how are you?\n", capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, f"{command}\n--- stdout\n{run.stdout[-2000:]}\n--- stderr\n{run.stderr[-3000:]}"
