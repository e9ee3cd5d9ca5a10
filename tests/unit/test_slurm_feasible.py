"""Before a Slurm submission: `sbatch --test-only`, then sinfo's node facts, refuse a job that could never start.

No cluster needed: sbatch and sinfo are stubs on PATH that answer as Slurm 22.05 does
(tests/e2e/test_slurm_submit_checks.py runs the same on the live cluster).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from launcher import cli
from launcher.errors import UserError
from launcher.run import slurm_feasible
from launcher.run.slurm_feasible import Node, Request

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "bert_tiny.yaml"
NOT_AVAILABLE = "allocation failure: Requested node configuration is not available"
# sinfo --all --noheader --Node --format='%N|%P|%c|%m|%G' on a small mixed cluster.
SINFO = """\
c1|cpu*|2|2000|(null)
c2|cpu*|2|2000|(null)
g1|gpu|64|512000|gpu:a100:4(S:0-1)
g2|gpu|32|256000|gpu:a100:2,gpu:v100:2
g3|gpu|64|512000|gpu:8
"""
NODES = slurm_feasible.parse_nodes(SINFO)


def stub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, body: str) -> None:
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    (stubs / name).write_text(f"#!/bin/bash\n{body}\n")
    (stubs / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{stubs}:{os.environ['PATH']}")


def fake_sbatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, test_only: str, rc: int = 1) -> None:
    """--test-only answers `test_only` on stderr with exit `rc` (the script on stdin kept);
    a real submission is recorded and gets job 77."""
    stub(
        tmp_path,
        monkeypatch,
        "sbatch",
        f"""if [ "$1" = --test-only ]; then
  cat > {tmp_path}/test-only.stdin; echo "{test_only}" >&2; exit {rc}
fi
echo "$@" >> {tmp_path}/submitted; echo 77""",
    )


def fake_sinfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str = SINFO, rc: int = 0) -> None:
    stub(tmp_path, monkeypatch, "sinfo", f"cat <<'EOF'\n{text}EOF\nexit {rc}")


# --------------------------------------------------------------------------- the nodes' facts


def test_sinfo_lines_are_read_with_their_gpus_and_default_partition() -> None:
    assert NODES is not None
    assert NODES[0] == Node("c1", "cpu", True, 2, 2000, 0)
    assert [(n.name, n.partition, n.default, n.gpus) for n in NODES[2:]] == [
        ("g1", "gpu", False, 4),
        ("g2", "gpu", False, 4),  # two types, four GPUs
        ("g3", "gpu", False, 8),
    ]


@pytest.mark.parametrize("text", ["", "n1|test*|2|2000\n", "n1|test*|two|2000|(null)\n", "sinfo: error: x\n"])
def test_unreadable_sinfo_is_no_facts(text: str) -> None:
    assert slurm_feasible.parse_nodes(text) is None


@pytest.mark.parametrize(
    ("request_", "line"),
    [
        (Request(1, 64, 0, None), "no node of partition cpu has 64 CPUs (the most is 2: c1, c2)"),
        (Request(1, 1, 1, None), "no node of partition cpu has 1 GPU (none has any)"),
        (Request(1, 1, 0, 4096), "no node of partition cpu has 4G of memory (the most is 2000M: c1, c2)"),
        (Request(3, 1, 0, None), "only 2 nodes of partition cpu (c1, c2) have 1 CPU; the job asks for 3"),
        (Request(1, 8, 16, None, ("gpu",)), "no node of partition gpu has 16 GPUs (the most is 8: g3)"),
        (Request(2, 64, 8, None, ("gpu",)), "only 1 node of partition gpu (g3) has 64 CPUs and 8 GPUs; the job asks for 2"),
        (Request(1, 64, 4, 300000, ("gpu",)), None),  # g1 holds it
        (Request(1, 33, 8, 300000, ("gpu",)), None),
    ],
)  # fmt: skip
def test_shortfall_names_what_no_node_has(request_: Request, line: str | None) -> None:
    assert NODES is not None
    found = slurm_feasible.shortfalls(request_, NODES)
    assert found is not None
    assert [text for text, _ in found] == ([] if line is None else [line])


def test_resources_no_single_node_has_together() -> None:
    nodes = slurm_feasible.parse_nodes("a|p*|64|1000|(null)\nb|p*|2|1000|gpu:4\n")
    assert nodes is not None
    [(line, _)] = slurm_feasible.shortfalls(Request(1, 8, 2, None), nodes) or [("", "")]
    assert line == "no node of partition p has 8 CPUs and 2 GPUs together"


def test_a_partition_list_is_refused_only_when_no_partition_fits() -> None:
    assert NODES is not None
    assert slurm_feasible.shortfalls(Request(1, 8, 0, None, ("cpu", "gpu")), NODES) == []
    found = slurm_feasible.shortfalls(Request(1, 128, 0, None, ("cpu", "gpu")), NODES)
    assert [line for line, _ in found or []] == [
        "no node of partition cpu has 128 CPUs (the most is 2: c1, c2)",
        "no node of partition gpu has 128 CPUs (the most is 64: g1, g3)",
    ]


def test_partitions_sinfo_does_not_list_are_no_facts() -> None:
    assert NODES is not None
    assert slurm_feasible.shortfalls(Request(1, 1, 0, None, ("other",)), NODES) is None
    no_default = [n for n in NODES if not n.default]
    assert slurm_feasible.shortfalls(Request(1, 1, 0, None), no_default) is None


# --------------------------------------------------------------------------- the check


def test_a_job_test_only_accepts_passes_quietly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_sbatch(tmp_path, monkeypatch, "sbatch: Job 3 to start at 2025-01-01T00:00:00 using 4 processors", 0)
    slurm_feasible.check("sbatch", "#!/bin/bash\n", Request(1, 64, 0, None))
    assert capsys.readouterr().err == ""
    assert (tmp_path / "test-only.stdin").read_text() == "#!/bin/bash\n"


def test_no_facts_refuse_with_sbatchs_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_sbatch(tmp_path, monkeypatch, NOT_AVAILABLE)
    fake_sinfo(tmp_path, monkeypatch, "", rc=1)
    with pytest.raises(UserError) as err:
        slurm_feasible.check("sbatch", "", Request(1, 64, 0, None))
    assert err.value.lines[0].startswith(
        "sbatch --test-only says the job cannot start: Requested node configuration is not available; "
        "nothing was submitted"
    )


def test_nodes_that_exist_but_are_drained_do_not_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The controller says "not available" for a job whose nodes are drained; it is submitted and waits."""
    fake_sbatch(tmp_path, monkeypatch, NOT_AVAILABLE)
    fake_sinfo(tmp_path, monkeypatch)
    slurm_feasible.check("sbatch", "", Request(2, 2, 0, None))
    assert "yet the partition's nodes have what the job asks" in capsys.readouterr().err


@pytest.mark.parametrize(
    "answer",
    [
        "allocation failure: Unable to contact slurm controller (connect failure)",
        "sbatch: error: Batch job submission failed: Invalid account or account/partition combination",
    ],
)
def test_a_check_that_fails_otherwise_does_not_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], answer: str
) -> None:
    fake_sbatch(tmp_path, monkeypatch, answer)
    fake_sinfo(tmp_path, monkeypatch)
    slurm_feasible.check("sbatch", "", Request(1, 64, 0, None))
    err = capsys.readouterr().err
    assert err.startswith("mplaunch: could not check that the job can start (sbatch --test-only: ")
    assert len(err.splitlines()) == 1


def test_a_check_without_answer_does_not_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stub(tmp_path, monkeypatch, "sbatch", "exec sleep 30")
    monkeypatch.setattr(slurm_feasible, "TEST_ONLY_TIMEOUT_S", 0.5)
    slurm_feasible.check("sbatch", "", Request(1, 64, 0, None))
    assert "no answer in 0.5 s" in capsys.readouterr().err


# --------------------------------------------------------------------------- mplaunch --slurm


def test_a_job_no_node_can_hold_is_refused_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_sbatch(tmp_path, monkeypatch, NOT_AVAILABLE)
    fake_sinfo(tmp_path, monkeypatch, "n1|test*|2|2000|(null)\nn2|test*|2|2000|(null)\n")
    argv = [str(TINY), "--slurm", f"logging.dir={tmp_path}/runs", "slurm.cpus_per_task=64"]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: the job could never start, nothing was submitted: no node of partition test has 64 CPUs "
        "(the most is 2: n1, n2) (hint: ask for at most 2 CPUs (slurm.cpus_per_task) or use another "
        "slurm.partition)"
    ]
    assert not (tmp_path / "submitted").exists()
    run_dir = tmp_path / "runs" / "bert-tiny-mlm"
    assert not (run_dir / "plan.json").exists()
    assert not (run_dir / "slurm").exists()
    assert (run_dir / ".lock").read_text() == ""  # names no job
    assert "#SBATCH --cpus-per-task=64" in (tmp_path / "test-only.stdin").read_text()


def test_a_feasible_job_is_checked_then_submitted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_sbatch(tmp_path, monkeypatch, "sbatch: Job 3 to start at 2025-01-01T00:00:00", 0)
    assert cli.main([str(TINY), "--slurm", f"logging.dir={tmp_path}/runs"]) == 0
    run_dir = tmp_path / "runs" / "bert-tiny-mlm"
    script = run_dir / "slurm" / "job.sbatch"
    assert (tmp_path / "test-only.stdin").read_text() == script.read_text()  # the very script submitted
    assert (tmp_path / "submitted").read_text().split() == ["--parsable", str(script)]
    assert json.loads((run_dir / ".lock").read_text())["job_id"] == "77"
    assert "submitted job 77" in capsys.readouterr().out
