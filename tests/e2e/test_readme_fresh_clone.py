"""A fresh clone runs the README's commands in the README's order, as a new user pastes them.

The README's install commands are what `.ci/run` runs (tests/unit/test_readme_fresh_clone.py checks;
CI installs with them before this test runs), so the clone uses this interpreter's environment. Commands that need what a CPU
machine has not are run as far as one can be: the Slurm submission as a dry run (the live Slurm
tests submit), the GPU proof not at all (tests/e2e/test_gpu_proof.py rehearses it on the CPU).

Nothing reaches the network: every command runs in a network namespace of its own with only the
loopback up (where `unshare -n` is allowed: as root), and with HF_HUB_OFFLINE=1 in any case. The
tiny fine-tune recipes name models no clone holds; the launcher saves them on first use.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.readme_steps import ROOT, script


def _offline() -> list[str]:
    """The prefix that runs a command without a network (only the loopback up, for torchrun), if allowed."""
    prefix = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec bash -c "$0"']
    allowed = shutil.which("unshare") and shutil.which("ip")
    if allowed and subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
        return prefix
    return ["bash", "-c"]


OFFLINE = _offline()


def _run(command: str, clone: Path, env: dict[str, str]) -> str:
    done = subprocess.run(
        [*OFFLINE, command], cwd=clone, env=env, capture_output=True, text=True, timeout=900
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"`{command}` exited {done.returncode}:\n{out[-3000:]}"
    assert "Traceback" not in out, f"`{command}`:\n{out[-3000:]}"
    return out


@pytest.mark.slow
def test_every_readme_command_works_in_a_fresh_clone(tmp_path: Path) -> None:
    clone = tmp_path / "mplaunch"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    assert not list((clone / "recipes" / "models").glob("tiny-*"))  # not in the repository
    bin_dir = str(Path(sys.executable).parent)  # this environment's mplaunch and python
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CUDA_VISIBLE_DEVICES": ""}
    env["HF_HUB_OFFLINE"] = "1"
    env.pop("PYTHONPATH", None)
    steps = script()
    commands = [text for kind, text in steps if kind == "run"]
    assert len(commands) >= 20, commands  # the README's commands were found, not a handful
    assert not [c for c in commands if "make_tiny" in c]  # no preparation step before the fine-tunes
    outputs: dict[str, str] = {}
    for kind, text in steps:
        if kind.startswith("write "):
            (clone / kind.removeprefix("write ")).write_text(text)
            if kind.endswith(".yaml"):  # the README shows the recipe; a user then checks and runs it
                recipe = kind.removeprefix("write ")
                outputs[f"check {recipe}"] = _run(f"mplaunch check {recipe}", clone, env)
                outputs[f"run {recipe}"] = _run(f"mplaunch {recipe} train.max_steps=20", clone, env)
        elif kind == "python":
            _run(f"{sys.executable} -c {shlex.quote(text)}", clone, env)
        elif "gpu_proof.sh" in text:
            continue  # one H100/H200 run; tests/e2e/test_gpu_proof.py rehearses it on the CPU
        elif "--slurm" in text:
            outputs[text] = _run(f"{text} --dry-run", clone, env)
        else:
            outputs[text] = _run(text, clone, env)

    # What the commands left is what the README says they leave.
    assert "finished 150 steps" in outputs[commands[0]]  # the main job: bert_tiny on a CPU machine
    assert (clone / "new" / "dir" / "bert_tiny.yaml").is_file()  # --copy made the folders
    slurm = next(out for cmd, out in outputs.items() if "--slurm" in cmd)
    assert "#SBATCH --nodes=2" in slurm
    assert (clone / "runs" / "bert-tiny-mlm" / "report" / "loss.png").is_file()
    sweep = clone / "runs" / "bert-tiny-mlm-sweep"  # Many runs: the 4-point sweep, then compare
    assert sorted(p.parent.name for p in sweep.glob("*/FINISHED")) == ["lr-1e-3", "lr-1e-4", "lr-3e-3", "lr-3e-4"]
    compared = outputs["mplaunch compare runs/bert-tiny-mlm-sweep"]
    assert all(f"optimizer.lr={lr}" in compared for lr in ("0.0001", "0.0003", "0.001", "0.003")), compared
    assert (sweep / "compare" / "loss.png").is_file()
    assert (clone / "runs" / "tracked" / "trackers.json").is_file()  # the trackers' run ids, for a resume
    for exported in ("bert-cls", "llama-sft-lora", "bert-tiny", "bert-tiny-100"):
        assert any((clone / "exported" / exported).iterdir()), exported
    finetune = next(cmd for cmd in commands if "bert_finetune_tiny" in cmd)
    assert "mplaunch: saving the tiny models of " in outputs[finetune]  # on first use, no download
    assert "finished 40 steps" in outputs[finetune]
    assert "finished 30 steps" in outputs[next(cmd for cmd in commands if "llama_sft_tiny.yaml" in cmd)]
    assert "finished 20 steps" in outputs["run recipes/my-lm.yaml"]
    assert "finished 20 steps" in outputs["run recipes/my-arithmetic.yaml"]
