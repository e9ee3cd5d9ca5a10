"""The sbatch script: rendered values, topology, validation, shell safety, the requeue contract.

No cluster needed: scripts are checked with shellcheck and `bash -n`, and run
with stub srun/scontrol/python on PATH that record what they were given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher import cli
from launcher.errors import UserError
from launcher.plan.resolve import Plan
from launcher.recipe import schema as recipe_mod
from launcher.run import requeue, slurm, slurm_checks

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "bert_tiny.yaml"
PER_TASK = ("SLURM_NODEID", "SLURM_PROCID", "SLURMD_NODENAME")


def load(tmp_path: Path, *overrides: str, recipe: Path = TINY) -> recipe_mod.Recipe:
    return recipe_mod.load(recipe, [f"logging.dir={json.dumps(str(tmp_path / 'runs'))}", *overrides])


def plan_for(tmp_path: Path, nodes: int, gpus: int, *overrides: str) -> Plan:
    device = ["launch.device=cuda", "launch.nproc_per_node=auto"] if gpus else ["launch.device=cpu"]
    args = [f"launch.nnodes={nodes}", f"slurm.gpus_per_node={gpus}", *device,
            "train.global_batch_size=null", *overrides]  # fmt: skip
    return slurm.resolve_for_cluster(load(tmp_path, *args))


def sbatch_options(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]


def task_script(script: str) -> tuple[str, str]:
    """(the single-quoted per-task script, everything else)."""
    m = re.search(r"bash -c '(.*?)' &\n", script, re.S)
    assert m, "no single-quoted per-task script"
    return m.group(1), script[: m.start()] + script[m.end() :]


# --------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("nodes", [1, 2, 8])
@pytest.mark.parametrize("gpus", [0, 4])
def test_render_topology(tmp_path: Path, nodes: int, gpus: int) -> None:
    plan = plan_for(tmp_path, nodes, gpus, "slurm.partition=batch", "slurm.account=proj1", "slurm.qos=normal",
                    "slurm.mem=64G", "slurm.signal_s=300", "launch.max_restarts=2")  # fmt: skip
    script = slurm.render(plan)
    procs = gpus or 2  # bert_tiny runs 2 CPU processes per node
    assert plan.nnodes == nodes
    assert plan.nproc_per_node == procs
    assert plan.device == ("cuda" if gpus else "cpu")
    assert plan.dist_backend == ("nccl" if gpus else "gloo")
    run_dir = tmp_path / "runs" / "bert-tiny-mlm"
    expected = [
        "--job-name=bert-tiny-mlm",
        f"--nodes={nodes}",
        "--ntasks-per-node=1",
        *([f"--gpus-per-node={gpus}"] if gpus else []),
        f"--cpus-per-task={procs}",
        "--mem=64G",
        "--time=01:00:00",
        "--partition=batch",
        "--account=proj1",
        "--qos=normal",
        f'--output="{run_dir}/slurm/slurm-%j.out"',
        f'--error="{run_dir}/slurm/slurm-%j.err"',
        "--signal=USR1@300",
        "--requeue",
        "--open-mode=append",
    ]
    assert sbatch_options(script) == expected
    task, _ = task_script(script)
    flat = " ".join(task.replace("\\\n", " ").split())
    for flag in (f"--nnodes={nodes}", f"--nproc-per-node={procs}", "--rdzv-backend=c10d",
                 '--rdzv-endpoint="$MPLAUNCH_HEAD:$MPLAUNCH_PORT"', '--rdzv-id="$SLURM_JOB_ID"',
                 "--max-restarts=2", "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
                 "--shutdown-timeout=300", '-m launcher.worker.train "$MPLAUNCH_PLAN"'):  # fmt: skip
        assert flag in flat
    assert f'[ "$SLURM_JOB_NUM_NODES" != {nodes} ]' in script
    assert (f'[ "${{SLURM_GPUS_ON_NODE:-0}}" != {gpus} ]' in script) == bool(gpus)
    # The environment is the plan's, the one a local launch gets (NCCL's settings on GPUs only).
    exports = [line.removeprefix("export ") for line in script.splitlines() if line.startswith("export ")]
    assert exports[: len(plan.env)] == [f"{k}={shlex.quote(v)}" for k, v in plan.env.items()]
    assert "PYTHONUNBUFFERED=1" in exports
    for line in ("TORCH_NCCL_ASYNC_ERROR_HANDLING=1", "NCCL_DEBUG=WARN"):
        assert (line in exports) == bool(gpus)


def test_task_runs_the_plans_torchrun_command(tmp_path: Path) -> None:
    """One torchrun builder: the task's words are the local command's, with the cluster's rendezvous."""
    plan = plan_for(tmp_path, 2, 4, "launch.max_restarts=1")
    words = slurm.task_torchrun(plan)
    assert words[0] == '"$MPLAUNCH_PYTHON"'
    assert words[-1] == '"$MPLAUNCH_PLAN"'
    local = [w for w in plan.command[1:-1] if w not in ("--standalone", "--nnodes=1")]
    assert [w for w in words if w in local] == local  # same flags, same order


@pytest.mark.parametrize("nodes", [1, 2, 8])
@pytest.mark.parametrize("gpus", [0, 8])
def test_render_is_shellcheck_clean(tmp_path: Path, nodes: int, gpus: int) -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (.ci/run installs it)")
    path = tmp_path / "job.sbatch"
    path.write_text(slurm.render(plan_for(tmp_path, nodes, gpus, "slurm.setup=['module load cuda']")))
    done = subprocess.run(["shellcheck", "-s", "bash", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_per_task_variables_only_inside_the_task(tmp_path: Path) -> None:
    script = slurm.render(plan_for(tmp_path, 2, 0))
    task, batch = task_script(script)
    code = "\n".join(line for line in batch.splitlines() if not line.lstrip().startswith("#"))
    for name in PER_TASK:
        assert f"${name}" in task
        assert name not in code, f"{name} would be expanded by the batch shell"
    assert "'" not in task  # nothing can close the quotes early
    assert str(tmp_path) not in task  # recipe values reach the task only through exported variables


def test_plan_is_for_the_cluster_not_this_machine(tmp_path: Path) -> None:
    plan = plan_for(tmp_path, 2, 8)
    assert plan.nproc_per_node == 8
    assert plan.world_size == 16
    assert plan.device == "cuda"
    assert plan.batch.world_size == 16
    cpu = slurm.resolve_for_cluster(
        load(tmp_path, "launch.nnodes=3", "slurm.cpus_per_task=8", "train.global_batch_size=96")
    )
    assert cpu.nnodes == 3
    assert cpu.device == "cpu"
    assert cpu.env["OMP_NUM_THREADS"] == "4"


def test_master_port_from_recipe_or_job_id(tmp_path: Path) -> None:
    assert "export MPLAUNCH_PORT=$((20000 + SLURM_JOB_ID % 20000))" in slurm.render(plan_for(tmp_path, 2, 0))
    script = slurm.render(plan_for(tmp_path, 2, 0, "launch.master_port=29400"))
    assert "export MPLAUNCH_PORT=29400" in script
    assert "SLURM_JOB_ID %" not in script


def test_env_order_defaults_then_plan_then_recipe(tmp_path: Path) -> None:
    script = slurm.render(plan_for(tmp_path, 1, 0, "slurm.env={NCCL_DEBUG: INFO, MY_VAR: 'a b'}"))
    lines = script.splitlines()
    assert lines.index("export NCCL_DEBUG=INFO") > lines.index("export DS_ACCELERATOR=cpu")
    assert "export NCCL_DEBUG=WARN" not in lines
    assert "export MY_VAR='a b'" in lines


def test_extra_sbatch_and_setup_lines(tmp_path: Path) -> None:
    plan = plan_for(tmp_path, 1, 0, "slurm.extra_sbatch=['--constraint=h100|a100', '--exclusive']",
                    "slurm.setup=['module load cuda/12', 'source /opt/venv/bin/activate']")  # fmt: skip
    script = slurm.render(plan)
    assert sbatch_options(script)[-2:] == ["--constraint=h100|a100", "--exclusive"]
    assert "\nmodule load cuda/12\nsource /opt/venv/bin/activate\n" in script


def test_percent_in_run_dir_is_escaped_for_sbatch(tmp_path: Path) -> None:
    plan = plan_for(tmp_path / "100%", 1, 0)
    assert f'--output="{tmp_path}/100%%/runs/bert-tiny-mlm/slurm/slurm-%j.out"' in sbatch_options(
        slurm.render(plan)
    )


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("slurm.partition='gpu; touch x'", "slurm.partition: 'gpu; touch x' is not a Slurm name"),
        ("slurm.account=$(id)", "slurm.account: '$(id)' is not a Slurm name"),
        ('slurm.qos="a\\nb"', "slurm.qos"),
        ("slurm.mem=lots", "slurm.mem: 'lots' is not a size"),
        ("slurm.time=tomorrow", "slurm.time: 'tomorrow' is not a Slurm time"),
        (
            "slurm.time='00:01:00'",
            "slurm.signal_s: the 120 s warning must come before the time limit 00:01:00",
        ),
        (
            "slurm.extra_sbatch=['--exclude=n1 --nodes=9']",
            "slurm.extra_sbatch[0]: '--exclude=n1 --nodes=9' is not a single",
        ),
        ("slurm.extra_sbatch=['-N 2']", "slurm.extra_sbatch[0]: '-N 2' is not a single"),
        ('slurm.extra_sbatch=["--constraint=a\\n#SBATCH --x"]', "slurm.extra_sbatch[0]"),
        (
            "slurm.extra_sbatch=['--time=9:00:00']",
            "slurm.extra_sbatch[0]: --time is written by mplaunch (set slurm.time",
        ),
        ("slurm.extra_sbatch=['--no-requeue']", "slurm.extra_sbatch[0]: --no-requeue is written by mplaunch"),
        ("slurm.env={'A;touch x': x}", "slurm.env: 'A;touch x' is not an environment variable name"),
        ("slurm.env={'1A': x}", "slurm.env: '1A' is not an environment variable name"),
        ('slurm.setup=["echo a\\ntouch x"]', "slurm.setup[0]: one shell line per item"),
    ],
)
def test_unsafe_values_are_rejected(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(UserError) as err:
        slurm.resolve_for_cluster(load(tmp_path, override))
    assert any(line.startswith(message) for line in err.value.lines), err.value.lines


@pytest.mark.parametrize(
    ("option", "managed"),
    [
        ("--parti=x", "partition"),
        ("--sig=KILL@10", "signal"),
        ("--no-req", "no-requeue"),
        ("--job=y", "job-name"),
    ],
)
def test_prefixes_of_managed_options_are_rejected(tmp_path: Path, option: str, managed: str) -> None:
    # sbatch reads an unambiguous prefix as the whole option.
    with pytest.raises(UserError) as err:
        slurm.resolve_for_cluster(load(tmp_path, f"slurm.extra_sbatch=['{option}']"))
    typed = option[2:].split("=")[0]
    assert len(err.value.lines) == 1
    assert err.value.lines[0].startswith(
        f"slurm.extra_sbatch[0]: --{typed} (sbatch reads it as --{managed}) is written by mplaunch"
    )


def test_unmanaged_options_that_only_share_a_start_pass(tmp_path: Path) -> None:
    slurm.resolve_for_cluster(
        load(tmp_path, "slurm.extra_sbatch=['--time-min=10', '--nodelist=n1', '--exclusive']")
    )


@pytest.mark.parametrize(
    ("line", "shown", "reason"),
    [
        ("--array=0-3", "--array", "one run directory is one job"),
        ("--chd=/tmp", "--chd (sbatch reads it as --chdir)", "the job starts where mplaunch ran"),
        ("--chdir=/tmp", "--chdir", "slurm.setup lines and relative paths are read there"),
        ("--export=NONE", "--export", "the job needs the submitting environment"),
        ("--export=PATH,HOME", "--export", "keep ALL in the list"),
        ("--export", "--export", "the job needs the submitting environment"),
        ("--export-file=/tmp/env", "--export-file", "it replaces the environment"),
        ("--export-f=/tmp/env", "--export-f (sbatch reads it as --export-file)", "set slurm.env instead"),
        ("--hold", "--hold", "the job would sit held until `scontrol release`"),
        ("--ho", "--ho (sbatch reads it as --hold)", "the job would sit held"),
        ("--wrap=hostname", "--wrap", "the job's script is mplaunch's"),
        ("--wait", "--wait", "sbatch would not answer until the job ends"),
        ("--test-only", "--test-only", "nothing would be queued"),
        ("--parsable", "--parsable", "mplaunch reads sbatch's answer itself"),
        (
            "--clusters=other",
            "--clusters",
            "mplaunch follows the job with squeue and scontrol on this cluster",
        ),
        ("--cluster=other", "--cluster", "mplaunch follows the job with squeue"),
        ("--uid=alice", "--uid", "the job must run as the user who wrote the run directory"),
        ("--w", "--w (sbatch may read it as --wait or --wrap)", "spell out the option meant"),
        (
            "--exp=ALL",
            "--exp (sbatch may read it as --export or --export-file)",
            "spell out the option meant",
        ),
    ],
)
def test_options_that_break_the_job_are_refused(tmp_path: Path, line: str, shown: str, reason: str) -> None:
    """Each reason names what breaks: one job per run directory, started where mplaunch ran, with
    the submitting environment, submitted and followed by mplaunch on this cluster."""
    with pytest.raises(UserError) as err:
        slurm.resolve_for_cluster(load(tmp_path, f"slurm.extra_sbatch={json.dumps([line])}"))
    assert len(err.value.lines) == 1
    assert err.value.lines[0].startswith(f"slurm.extra_sbatch[0]: {shown} is refused: "), err.value.lines
    assert reason in err.value.lines[0]


@pytest.mark.parametrize("line", ["--export=ALL", "--export=all,MY_VAR=1", "--export=MY_VAR=1,ALL",
                                  "--get-user-env", "--cluster-constraint=x", "--wait-all-nodes=1"])  # fmt: skip
def test_options_that_keep_the_contract_pass(tmp_path: Path, line: str) -> None:
    # ALL anywhere in --export's list keeps the whole environment (sbatch's env_merge_filter).
    plan = slurm.resolve_for_cluster(load(tmp_path, f"slurm.extra_sbatch={json.dumps([line])}"))
    assert sbatch_options(slurm.render(plan))[-1] == line


def test_refused_and_managed_options_are_real_sbatch_options() -> None:
    """A typo in the tables would refuse nothing: every name is one of sbatch's long options."""
    man = shutil.which("man") and subprocess.run(["man", "sbatch"], capture_output=True, text=True)
    if not man or man.returncode != 0:
        pytest.skip("no sbatch man page here (.ci/run installs slurm-client)")
    documented = set(re.findall(r"--([a-z][a-z0-9-]*)", man.stdout))
    undocumented = {"cluster"}  # sbatch's alias of --clusters (src/common/slurm_opt.c)
    assert set(slurm_checks.MANAGED_OPTIONS) | set(slurm_checks.REFUSED_OPTIONS) <= documented | undocumented


def test_resubmit_hint_pastes_the_path_verbatim(tmp_path: Path) -> None:
    """The script's resubmit line, pasted into bash, gives sbatch the path as one word and runs nothing."""
    hostile = tmp_path / "a $(touch pwned) `touch pwned` b;touch pwned 'q'"
    plan = plan_for(hostile, 1, 0)
    script = Path(plan.run_dir) / "slurm" / "job.sbatch"
    [hint] = [line for line in slurm.render(plan).splitlines() if line.startswith("# Resubmit")]
    command = hint.split(": ", 1)[1]
    assert command.startswith("sbatch ")
    assert shlex.split(command) == ["sbatch", str(script)]
    done = subprocess.run(["bash", "-c", f'sbatch() {{ printf "%s\\0" "$@"; }}\n{command}'],
                          cwd=tmp_path, capture_output=True, text=True, check=True)  # fmt: skip
    assert done.stdout.split("\0")[:-1] == [str(script)]
    assert not list(tmp_path.rglob("pwned")), "the pasted line ran a command"


@pytest.mark.parametrize(
    "value", ["plain", "a b$(touch pwned)'c'", "line\nbreak$(touch pwned)", "tab\there\u2028x"]
)
def test_qline_filter_stays_on_its_line_and_pastes_verbatim(tmp_path: Path, value: str) -> None:
    word = slurm.shell_line(value)
    assert word.isprintable()
    done = subprocess.run(["bash", "-c", f'printf "%s" {word}'], cwd=tmp_path, capture_output=True, text=True)
    assert done.stdout == value
    assert not list(tmp_path.rglob("pwned"))


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        slurm.resolve_for_cluster(
            load(tmp_path, "slurm.partition='a b'", "slurm.mem=x", "slurm.env={'-': x}")
        )
    assert len(err.value.lines) == 3


def test_hostile_run_name_is_rejected_by_the_schema(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="name"):
        load(tmp_path, "name='x$(touch pwned)'")


@pytest.mark.parametrize("bad", ["with\nnewline", 'with"quote', "with\\backslash"])
def test_run_dir_slurm_cannot_take_is_rejected(tmp_path: Path, bad: str) -> None:
    with pytest.raises(UserError, match="#SBATCH line"):
        slurm.render(plan_for(tmp_path / bad, 1, 0))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30", 1800),
        ("30:15", 1815),
        ("2:00:00", 7200),
        ("1-0", 86400),
        ("1-2:30", 95400),
        ("1-00:00:10", 86410),
    ],
)
def test_time_limit_seconds(text: str, seconds: int) -> None:
    assert slurm_checks.time_limit_s(text) == seconds
    assert slurm_checks.time_limit_s("1:2:3:4") is None


def test_cuda_without_gpus_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="slurm.gpus_per_node"):
        slurm.resolve_for_cluster(load(tmp_path, "launch.device=cuda", "launch.nproc_per_node=auto"))
    with pytest.raises(UserError, match="slurm.gpus_per_node: 0 GPUs"):
        slurm.resolve_for_cluster(load(tmp_path, "launch.device=cuda", "slurm.gpus_per_node=0"))


# --------------------------------------------------------------------------- CLI flags


def parse(*argv: str) -> argparse.Namespace:
    return cli._run_parser().parse_intermixed_args(["recipe.yaml", *argv])


def test_flags_are_the_dotted_overrides() -> None:
    args = parse("--slurm", "--nodes", "4", "--partition", "gpu", "--time", "2:00:00", "--account", "p",
                 "--qos", "high", "--gpus-per-node", "8")  # fmt: skip
    assert cli.slurm_values(args) == {
        "launch.nnodes": 4, "slurm.gpus_per_node": 8,
        "slurm.partition": "gpu", "slurm.time": "2:00:00", "slurm.account": "p", "slurm.qos": "high",
    }  # fmt: skip


def test_flag_validation_matches_the_override(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    errors = []
    for extra in (["--nodes", "two"], ["launch.nnodes=two"]):
        assert cli.main([str(TINY), "--slurm", "--dry-run", f"logging.dir={tmp_path}", *extra]) == 2
        errors.append(capsys.readouterr().err.splitlines())
    assert errors[0] == errors[1]
    assert len(errors[0]) == 1
    assert "launch.nnodes" in errors[0][0]


def test_time_flag_stays_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([str(TINY), "--slurm", "--dry-run", "--time", "1:30:00", f"logging.dir={tmp_path}"]) == 0
    assert "#SBATCH --time=1:30:00" in capsys.readouterr().out


def test_dry_run_prints_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([str(TINY), "--slurm", "--nodes", "2", "--dry-run", f"logging.dir={tmp_path}/runs"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("#!/bin/bash\n")
    assert "#SBATCH --nodes=2" in out
    assert not (tmp_path / "runs").exists()


def test_user_template(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    template = tmp_path / "mine.j2"
    template.write_text("#!/bin/bash\n#SBATCH --nodes={{ nodes }}\necho {{ run_dir|q }}\n")
    assert cli.main([str(TINY), "--slurm", "--dry-run", "--slurm-template", str(template), "--nodes", "2",
                     f"logging.dir={tmp_path}"]) == 0  # fmt: skip
    assert capsys.readouterr().out == f"#!/bin/bash\n#SBATCH --nodes=2\necho {tmp_path}/bert-tiny-mlm\n"
    template.write_text("{{ no_such_name }}\n")
    assert cli.main([str(TINY), "--slurm", "--dry-run", "--slurm-template", str(template)]) == 2
    assert "'no_such_name' is undefined" in capsys.readouterr().err


# --------------------------------------------------------------------------- running the script with stubs

STUBS = {
    "srun": '#!/bin/bash\nprintf "%s\\0" "$@" > "$STUB_LOG/srun.argv"\n'
    'while [[ "$1" == --* ]]; do shift; done\n'
    'SLURM_NODEID=1 SLURM_PROCID=1 SLURMD_NODENAME=n2 exec "$@"\n',
    "scontrol": '#!/bin/bash\necho "$*" >> "$STUB_LOG/scontrol.calls"\nprintf "n1\\nn2\\n"\n',
    "scancel": '#!/bin/bash\necho "$*" >> "$STUB_LOG/scancel.calls"\n',
    # torchrun's argv and environment; the requeue helper's call, run by the real Python.
    "python": '#!/bin/bash\nif [ "$2" = launcher.run.requeue ]; then\n'
    '  printf "%s\\0" "$@" > "$STUB_LOG/requeue.argv"; exec "$REAL_PYTHON" "$@"\nfi\n'
    # the node's hang watch (launcher.run.hangwatch), run by the real Python: it leaves with the stub
    'if [ "$2" = launcher.run.hangwatch ]; then exec "$REAL_PYTHON" "$@"; fi\n'
    'printf "%s\\0" "$@" > "$STUB_LOG/python.argv"\n'
    'printf "%s" "$HOSTILE" > "$STUB_LOG/hostile.env"\n'
    # the lock file as the workers' torchrun sees it (the job holds it while they run)
    'cp "$(dirname "${@: -1}")/.lock" "$STUB_LOG/lock.seen" 2>/dev/null || true\n',
}
HOSTILE = "a$(touch pwned)b`touch pwned`c;touch pwned;d'e\"f\ntouch pwned\n$HOME"
HOSTILE_PATH = "r$(touch pwned)`touch pwned`;touch pwned;'q $HOME"


def run_with_stubs(
    tmp_path: Path, plan: Plan, head_addr: str = "10.0.0.1", **env: str
) -> subprocess.CompletedProcess[str]:
    """Run the rendered script as node 1 of the job; `head_addr` is what the head's name resolves to."""
    stubs, log = tmp_path / "stubs", tmp_path / "log"
    stubs.mkdir(exist_ok=True)
    log.mkdir(exist_ok=True)
    getent = f'#!/bin/bash\necho "{head_addr}        $2"\n'
    for name, text in {**STUBS, "getent": getent}.items():
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    plan = dataclasses.replace(plan, command=(str(stubs / "python"), *plan.command[1:]))
    script = tmp_path / "job.sbatch"
    script.write_text(slurm.render(plan))
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    job_env = {"PATH": f"{stubs}:{os.environ['PATH']}", "HOME": os.environ.get("HOME", "/root"),
               "STUB_LOG": str(log), "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": str(plan.nnodes),
               "SLURM_JOB_NODELIST": "n[1-2]", "REAL_PYTHON": sys.executable,
               "PYTHONPATH": str(ROOT), **env}  # fmt: skip
    return subprocess.run(
        ["bash", str(script)], cwd=tmp_path, env=job_env, capture_output=True, text=True, timeout=60
    )


def read0(path: Path) -> list[str]:
    return path.read_text().split("\0")[:-1]


def test_injection_corpus_executes_nothing(tmp_path: Path) -> None:
    recipe_dir = tmp_path / "rec\n$(touch pwned)`touch pwned`;touch pwned"
    recipe_dir.mkdir()
    recipe = recipe_dir / "r.yaml"
    recipe.write_text(f"extends: {TINY}\n")
    plan = slurm.resolve_for_cluster(
        recipe_mod.load(recipe, [
            f"logging.dir={json.dumps(str(tmp_path / HOSTILE_PATH))}",
            f"slurm.env={json.dumps({'HOSTILE': HOSTILE, 'OTHER': '`touch pwned`'})}",
            "slurm.extra_sbatch=['--comment=$(touch${IFS}pwned)']",
            "launch.nnodes=2",
        ])
    )  # fmt: skip
    done = run_with_stubs(tmp_path, plan)
    assert not list(tmp_path.rglob("pwned")), "an injected command ran"
    log = tmp_path / "log"
    argv = read0(log / "python.argv")
    assert argv[-1] == f"{tmp_path / HOSTILE_PATH}/bert-tiny-mlm/plan.json", done.stderr
    assert (log / "hostile.env").read_text() == HOSTILE
    srun = read0(log / "srun.argv")
    assert "$SLURM_NODEID" in srun[-1]  # the task script reached srun unexpanded
    assert "--rdzv-id=4242" in argv
    assert "--rdzv-endpoint=n1:24242" in argv
    assert "--rdzv-conf=is_host=false" in argv


def test_finished_run_exits_before_srun(tmp_path: Path) -> None:
    plan = plan_for(tmp_path, 2, 0)
    Path(plan.run_dir).mkdir(parents=True)
    (Path(plan.run_dir) / "FINISHED").write_text('{"step": 150}')
    done = run_with_stubs(tmp_path, plan)
    assert done.returncode == 0
    assert "the run is complete" in done.stdout
    assert not (tmp_path / "log" / "srun.argv").exists()


def test_wrong_node_count_fails_clearly(tmp_path: Path) -> None:
    done = run_with_stubs(tmp_path, plan_for(tmp_path, 2, 0), SLURM_JOB_NUM_NODES="3")
    assert done.returncode == 2
    assert "the plan is for 2 nodes but job 4242 has 3" in done.stderr
    done = run_with_stubs(tmp_path, plan_for(tmp_path, 2, 4), SLURM_GPUS_ON_NODE="2")
    assert done.returncode == 2
    assert "the plan is for 4 GPUs per node but this node has 2" in done.stderr


@pytest.mark.parametrize(
    ("head_addr", "allow", "rc"), [("10.0.0.1", "", 0), ("127.0.1.1", "", 2), ("127.0.1.1", "1", 0)]
)
def test_loopback_head_is_rejected_unless_allowed(
    tmp_path: Path, head_addr: str, allow: str, rc: int
) -> None:
    done = run_with_stubs(tmp_path, plan_for(tmp_path, 2, 0), head_addr, MPLAUNCH_SLURM_ALLOW_LOOPBACK=allow)
    assert done.returncode == rc, done.stderr
    assert ("resolves to the loopback address 127.0.1.1" in done.stderr) == (rc != 0)


# --------------------------------------------------------------------------- submitting


def stub_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, body: str) -> None:
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    (stubs / name).write_text(f"#!/bin/bash\n{body}\n")
    (stubs / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{stubs}:{os.environ['PATH']}")


def test_submit_writes_run_dir_and_prints_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    stub_on_path(
        tmp_path, monkeypatch, "sbatch", f'printf "%s\\n" "$@" > {tmp_path}/sbatch.argv\necho "4242;cluster"'
    )
    assert cli.main([str(TINY), "--slurm", "--nodes", "2", f"logging.dir={tmp_path}/runs"]) == 0
    run_dir = tmp_path / "runs" / "bert-tiny-mlm"
    script = run_dir / "slurm" / "job.sbatch"
    assert (tmp_path / "sbatch.argv").read_text().split() == ["--parsable", str(script)]
    assert json.loads((run_dir / "plan.json").read_text())["plan"]["nnodes"] == 2
    out = capsys.readouterr().out
    assert "submitted job 4242" in out
    assert f"{run_dir}/slurm/slurm-4242.out" in out
    assert "#SBATCH --nodes=2" in script.read_text()


def test_submit_skips_a_finished_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    stub_on_path(tmp_path, monkeypatch, "sbatch", f"touch {tmp_path}/submitted")
    run_dir = tmp_path / "bert-tiny-mlm"
    run_dir.mkdir()
    (run_dir / "FINISHED").write_text('{"step": 150}')
    assert cli.main([str(TINY), "--slurm", f"logging.dir={tmp_path}"]) == 0
    assert "already finished 150 steps" in capsys.readouterr().out
    assert not (tmp_path / "submitted").exists()


# --------------------------------------------------------------------------- after_stop


def fake_scontrol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, state: str) -> Path:
    calls = tmp_path / "scontrol.calls"
    answer = f'if [ "$1 $2 $3" = "-o show job" ]; then echo "JobId=$4 JobState={state} X=1"; fi'
    stub_on_path(tmp_path, monkeypatch, "scontrol", f'echo "$*" >> {calls}\n{answer}')
    return calls


def stopped_run(plan: Plan, at: float | None = None) -> Path:
    """The run directory as the workers leave it after a stop: plan.json, and a "stop" event."""
    run_dir = Path(plan.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    plan.plan_path.write_text(plan.to_json())
    if at is not None:
        stop = {"kind": "event", "step": 12, "time": at, "event": "stop", "message": "stopped at step 12"}
        (run_dir / "metrics.jsonl").write_text(json.dumps(stop) + "\n")
    return run_dir


def test_after_stop_outside_slurm_does_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    calls = fake_scontrol(tmp_path, monkeypatch, "RUNNING")
    assert not requeue.after_stop(stopped_run(plan_for(tmp_path, 1, 0), time.time()), 0)
    assert not calls.exists()


def test_after_stop_needs_a_stop_of_this_attempt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "76")
    calls = fake_scontrol(tmp_path, monkeypatch, "RUNNING")
    plan = plan_for(tmp_path, 2, 0)
    assert not requeue.after_stop(stopped_run(plan), 0)  # no metrics: the workers never started
    assert not requeue.after_stop(stopped_run(plan, at=1000.0), 1001.0)  # an earlier attempt's stop
    assert not calls.exists()
    assert requeue.after_stop(stopped_run(plan, at=1001.0), 1001.0)
    assert "requeue 76" in calls.read_text().splitlines()


def test_after_stop_requeues_up_to_the_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    calls = fake_scontrol(tmp_path, monkeypatch, "RUNNING")
    plan = plan_for(tmp_path, 2, 0, "slurm.max_requeues=2")
    run_dir = stopped_run(plan, time.time())
    assert [requeue.after_stop(run_dir, 0) for _ in range(3)] == [True, True, False]
    requeues = [line for line in calls.read_text().splitlines() if line.startswith("requeue")]
    assert requeues == ["requeue 77", "requeue 77"]
    assert json.loads((Path(plan.run_dir) / "slurm" / "requeues.json").read_text()) == {"77": 2}
    out = capsys.readouterr().out
    assert "requeueing job 77 (1 of 2)" in out
    assert "requeued 2 times (slurm.max_requeues=2); not again" in out


@pytest.mark.parametrize("state", ["CANCELLED", "TIMEOUT", "PREEMPTED", "COMPLETING"])
def test_after_stop_leaves_an_ending_job_to_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  state: str) -> None:  # fmt: skip
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    calls = fake_scontrol(tmp_path, monkeypatch, state)
    assert not requeue.after_stop(stopped_run(plan_for(tmp_path, 2, 0), time.time()), 0)
    assert "requeue" not in calls.read_text()


@pytest.mark.parametrize("stopped", [True, False])
def test_script_requeues_after_the_workers_stop(tmp_path: Path, stopped: bool) -> None:
    """After srun returns, the script (not a worker) calls the requeue helper, which requeues a stopped run."""
    plan = plan_for(tmp_path, 2, 0)
    stopped_run(plan, time.time() + 5 if stopped else None)  # srun's start is stamped when the script runs
    done = run_with_stubs(tmp_path, plan)
    log = tmp_path / "log"
    assert read0(log / "requeue.argv")[2:3] == [plan.run_dir], done.stderr
    assert ("requeue 4242" in (log / "scontrol.calls").read_text().splitlines()) == stopped, done.stdout
    assert done.returncode == 0
    assert ("requeueing job 4242 (1 of 3)" in done.stdout) == stopped
    assert ("workers exited with status 0 before train.max_steps" in done.stderr) != stopped


def test_requeue_helper_is_light() -> None:
    heavy = "('torch', 'deepspeed', 'accelerate', 'transformers', 'jinja2')"
    code = f"import sys, launcher.run.requeue; print(any(m in sys.modules for m in {heavy}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_slurm_module_is_light() -> None:
    heavy = "('torch', 'deepspeed', 'accelerate')"
    code = f"import sys, launcher.run.slurm; print(any(m in sys.modules for m in {heavy}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_readme_slurm_commands_dry_run(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    readme = (ROOT / "README.md").read_text()
    commands = [
        line.strip() for line in readme.splitlines() if line.startswith("mplaunch ") and "--slurm" in line
    ]
    assert commands, "the README's Slurm section shows no command"
    monkeypatch.chdir(ROOT)
    for command in commands:
        assert cli.main([*shlex.split(command)[1:], "--dry-run"]) == 0, capsys.readouterr().err
        out = capsys.readouterr().out
        if command.startswith("mplaunch sweep "):  # Many runs: the points, then the array script
            assert "\n#!/bin/bash\n" in out
            assert "\n#SBATCH --array=0-3%2\n" in out
        else:
            assert out.startswith("#!/bin/bash\n")


# --------------------------------------------------------------------------- one run per directory


def test_script_holds_the_run_dir_lock_and_names_the_job(tmp_path: Path) -> None:
    from launcher.rundir.lock import Holder

    plan = plan_for(tmp_path, 2, 0)
    done = run_with_stubs(tmp_path, plan)
    assert done.returncode == 0, done.stderr
    assert "flock" in slurm.render(plan)
    holder = Holder.parse((tmp_path / "log" / "lock.seen").read_text())
    assert holder is not None
    assert (holder.job_id, holder.state) == ("4242", "running")
    assert (Path(plan.run_dir) / ".lock").read_text() == ""  # the ended job names nobody


def test_script_refuses_a_run_dir_another_run_holds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from launcher.rundir.lock import RunLock

    monkeypatch.setattr(slurm, "LOCK_WAIT_S", 1)
    plan = plan_for(tmp_path, 2, 0)
    with RunLock.acquire(Path(plan.run_dir) / ".lock"):
        done = run_with_stubs(tmp_path, plan)
    assert done.returncode == 2
    assert "is in use by another run" in done.stderr
    assert f'"pid": {os.getpid()}' in done.stderr
    assert not (tmp_path / "log" / "srun.argv").exists()


def test_submit_is_refused_while_a_local_run_holds_the_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    from launcher.rundir.lock import RunLock

    stub_on_path(tmp_path, monkeypatch, "sbatch", f"touch {tmp_path}/submitted; echo 77")
    run_dir = tmp_path / "runs" / "bert-tiny-mlm"
    with RunLock.acquire(run_dir / ".lock"):
        assert cli.main([str(TINY), "--slurm", f"logging.dir={tmp_path}/runs"]) == 2
    assert f"pid {os.getpid()}" in capsys.readouterr().err
    assert not (tmp_path / "submitted").exists()
    assert not (run_dir / "plan.json").exists()
    assert cli.main([str(TINY), "--slurm", f"logging.dir={tmp_path}/runs"]) == 0
    held = json.loads((run_dir / ".lock").read_text())
    assert (held["job_id"], held["state"]) == ("77", "submitted")


def test_failed_workers_are_recorded_as_an_error_event(tmp_path: Path) -> None:
    from launcher.rundir.layout import RunDir

    plan = plan_for(tmp_path, 1, 0)
    run_dir = stopped_run(plan)
    files = RunDir.of(run_dir)
    files.write_rank_error(1, "RuntimeError: Connection closed by peer", "")
    files.write_rank_error(0, "model.target: cannot import 'x'", "")
    assert requeue.main([str(run_dir), "0", "1"]) == 1
    event = json.loads(files.metrics.read_text().splitlines()[-1])
    assert (event["event"], event["message"]) == (
        "error",
        "the run failed on rank-0: model.target: cannot import 'x'",
    )
