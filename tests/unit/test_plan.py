"""The launch plan: batch arithmetic, auto-resolution against a faked device inventory, machine checks."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from launcher.errors import UserError
from launcher.plan import hardware
from launcher.plan.batch import resolve_batch
from launcher.plan.hardware import Gpu, Hardware
from launcher.plan.resolve import Plan, resolve
from launcher.recipe.schema import Recipe, validate

GiB = 2**30
CPU = Hardware(cpu_count=8)
H100 = Gpu(0, "NVIDIA H100 80GB HBM3", (9, 0), 80 * GiB)
V100 = Gpu(0, "Tesla V100-SXM2-32GB", (7, 0), 32 * GiB)
T4 = Gpu(0, "Tesla T4", (7, 5), 16 * GiB)
A100 = Gpu(1, "NVIDIA A100-SXM4-80GB", (8, 0), 80 * GiB)
H100x8 = Hardware(
    gpus=tuple(Gpu(i, H100.name, H100.capability, H100.memory_bytes) for i in range(8)), cpu_count=64
)
V100x4 = Hardware(
    gpus=tuple(Gpu(i, V100.name, V100.capability, V100.memory_bytes) for i in range(4)), cpu_count=32
)
MIXED = Hardware(gpus=(T4, A100), cpu_count=16)


def make(**sections: object) -> Recipe:
    raw: dict = {"name": "t", "model": {"name": "tiny-mlp"}, "train": {"micro_batch_size": 4}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return validate(raw, "test")


# --------------------------------------------------------------------------- batch triple


@pytest.mark.parametrize(
    ("micro", "global_", "accum", "world", "expected"),
    [
        (4, None, None, 1, (4, 1, 4)),
        (4, None, 3, 2, (4, 3, 24)),
        (4, 64, None, 2, (4, 8, 64)),
        (None, 64, None, 4, (16, 1, 64)),
        (None, 64, 2, 4, (8, 2, 64)),
        (4, 32, 2, 4, (4, 2, 32)),
    ],
)
def test_batch_triple_is_derived_from_any_two(
    micro: int | None, global_: int | None, accum: int | None, world: int, expected: tuple[int, int, int]
) -> None:
    r = make(train={"micro_batch_size": micro, "global_batch_size": global_, "grad_accum": accum})
    problems: list[str] = []
    batch = resolve_batch(r, world, problems)
    assert problems == []
    assert batch is not None
    assert (batch.micro_batch_size, batch.grad_accum, batch.global_batch_size) == expected
    assert batch.global_batch_size == batch.micro_batch_size * batch.grad_accum * world


@pytest.mark.parametrize(
    ("micro", "global_", "accum", "world", "message"),
    [
        (
            4,
            30,
            None,
            2,
            "train.global_batch_size: 30 is not divisible by micro_batch_size 4 x world_size 2 (= 8)",
        ),
        (None, 30, 4, 2, "train.global_batch_size: 30 is not divisible by grad_accum 4 x world_size 2 (= 8)"),
        (
            None,
            6,
            None,
            4,
            "train.global_batch_size: 6 is not divisible by grad_accum 1 x world_size 4 (= 4)",
        ),
        (
            4,
            64,
            4,
            2,
            "train.global_batch_size: 64 != micro_batch_size 4 x grad_accum 4 x world_size 2 (= 32); set only two",
        ),
        (None, None, 2, 1, "train.micro_batch_size: set it (or train.global_batch_size) to size the batch"),
    ],
)
def test_batch_triple_must_divide_and_says_the_equation(
    micro: int | None, global_: int | None, accum: int | None, world: int, message: str
) -> None:
    r = make(train={"micro_batch_size": micro, "global_batch_size": global_, "grad_accum": accum})
    problems: list[str] = []
    assert resolve_batch(r, world, problems) is None
    (line,) = problems
    assert line.startswith(message)


def test_plan_prints_the_batch_equation() -> None:
    p = resolve(make(train={"micro_batch_size": 2, "global_batch_size": 64}), H100x8)
    assert p.batch.equation(p.nnodes, p.nproc_per_node) == (
        "global_batch_size 64 = micro_batch_size 2 x grad_accum 4 x world_size 8 (1 node x 8 procs)"
    )
    assert (
        "batch      global_batch_size 64 = micro_batch_size 2 x grad_accum 4 x world_size 8" in p.describe()
    )


def test_batch_problem_stops_resolve() -> None:
    with pytest.raises(UserError, match="is not divisible by micro_batch_size 4 x world_size 8"):
        resolve(make(train={"micro_batch_size": 4, "global_batch_size": 36}), H100x8)


# --------------------------------------------------------------------------- auto resolution


@pytest.mark.parametrize(
    ("hw", "device", "nproc", "dtype", "dist"),
    [
        (CPU, "cpu", 1, "fp32", "gloo"),  # no native bf16 said
        (Hardware(cpu_count=8, cpu_bf16=True), "cpu", 1, "bf16", "gloo"),
        (H100x8, "cuda", 8, "bf16", "nccl"),
        (Hardware(gpus=(A100,)), "cuda", 1, "bf16", "nccl"),
        (V100x4, "cuda", 4, "fp16", "nccl"),
        (MIXED, "cuda", 2, "fp16", "nccl"),  # one pre-Ampere GPU decides for all
    ],
)
def test_auto_resolves_against_the_inventory(
    hw: Hardware, device: str, nproc: int, dtype: str, dist: str
) -> None:
    p = resolve(make(), hw)
    assert (p.device, p.nproc_per_node, p.precision.dtype, p.dist_backend) == (device, nproc, dtype, dist)
    assert p.precision.reason.startswith("auto")


def test_explicit_settings_win_over_auto() -> None:
    r = make(launch={"device": "cpu", "nproc_per_node": 2}, precision={"dtype": "fp32"})
    p = resolve(r, H100x8)
    assert (p.device, p.nproc_per_node, p.precision.dtype, p.dist_backend) == ("cpu", 2, "fp32", "gloo")


def test_gpu_flags() -> None:
    assert H100.supports_bf16
    assert H100.has_tensor_cores
    assert not V100.supports_bf16
    assert V100.has_tensor_cores
    assert not Gpu(0, "GTX 1080", (6, 1), GiB).has_tensor_cores


@pytest.mark.parametrize(
    ("recipe", "hw", "message"),
    [
        (make(launch={"device": "cuda"}), CPU, "launch.device: cuda requested but no GPU is visible"),
        (
            make(launch={"nproc_per_node": 16}),
            H100x8,
            "launch.nproc_per_node: 16 processes but only 8 GPU(s) visible",
        ),
        (
            make(precision={"dtype": "bf16"}),
            V100x4,
            "precision.dtype: bf16 needs an Ampere or newer GPU, but GPU 0",
        ),
        (
            make(precision={"dtype": "fp16"}),
            CPU,
            "precision.dtype: fp16 is not supported by DeepSpeed on CPU",
        ),
        (make(launch={"nnodes": 2}), H100x8, "launch.nnodes: 2 nodes need --slurm"),
    ],
)
def test_what_the_machine_or_backend_would_reject(recipe: Recipe, hw: Hardware, message: str) -> None:
    with pytest.raises(UserError) as info:
        resolve(recipe, hw)
    assert any(line.startswith(message) for line in info.value.lines), info.value.lines


def test_cuda_requested_names_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(UserError, match="CUDA_VISIBLE_DEVICES=''"):
        resolve(make(launch={"device": "cuda"}), CPU)


def test_static_fp16_scale_is_fine_with_accelerate() -> None:
    # The accelerate backend's scaler follows DeepSpeed's rules, static scale included.
    p = resolve(
        make(backend="accelerate", precision={"dtype": "fp16", "loss_scale": {"dynamic": False}}), H100x8
    )
    assert p.backend_config["loss_scale"]["dynamic"] is False


def test_fp16_on_cpu_is_fine_with_accelerate() -> None:
    p = resolve(make(backend="accelerate", precision={"dtype": "fp16"}), CPU)
    assert p.precision.dtype == "fp16"
    assert p.problems == ()


def test_machine_problems_can_be_kept_in_the_plan_for_a_dry_run() -> None:
    p = resolve(make(precision={"dtype": "fp16"}), CPU, keep_machine_problems=True)
    assert p.problems
    assert p.problems[0].startswith("precision.dtype: fp16 is not supported by DeepSpeed on CPU")
    assert p.backend_config["fp16"]["enabled"] is True


def test_recipe_problems_are_never_kept() -> None:
    r = make(train={"micro_batch_size": 4, "global_batch_size": 6})
    with pytest.raises(UserError):
        resolve(r, CPU, keep_machine_problems=True)


def test_slurm_launch_allows_several_nodes() -> None:
    p = resolve(make(launch={"nnodes": 2}), H100x8, nnodes_allowed=True)
    assert p.world_size == 16
    assert p.batch.world_size == 16


# --------------------------------------------------------------------------- CUDA_VISIBLE_DEVICES and nvidia-smi

SMI = """\
0, NVIDIA A100-SXM4-80GB, 8.0, 81920, GPU-aaaa1111-0000
1, Tesla V100-SXM2-32GB, 7.0, 32768, GPU-bbbb2222-0000
2, NVIDIA H100 80GB HBM3, 9.0, 81559, GPU-cccc3333-0000
"""


@pytest.fixture
def smi_gpus() -> list[Gpu]:
    return hardware.parse_nvidia_smi(SMI)


def test_nvidia_smi_output_is_parsed(smi_gpus: list[Gpu]) -> None:
    assert [(g.index, g.name, g.capability) for g in smi_gpus] == [
        (0, "NVIDIA A100-SXM4-80GB", (8, 0)),
        (1, "Tesla V100-SXM2-32GB", (7, 0)),
        (2, "NVIDIA H100 80GB HBM3", (9, 0)),
    ]
    assert smi_gpus[0].memory_bytes == 81920 * 2**20


def test_unreadable_nvidia_smi_lines_are_skipped() -> None:
    text = "0, Old GPU, [N/A], 4096, GPU-x\ngarbage\n1, Odd, Name, 8.6, 24576, GPU-y\n"
    assert [(g.index, g.name, g.capability) for g in hardware.parse_nvidia_smi(text)] == [
        (1, "Odd, Name", (8, 6))
    ]


@pytest.mark.parametrize(
    ("spec", "names"),
    [
        (None, ["A100", "V100", "H100"]),
        ("2,0", ["H100", "A100"]),
        (" 1 ", ["V100"]),
        ("GPU-cccc", ["H100"]),  # a UUID prefix
        ("0,7,2", ["A100"]),  # CUDA stops at the first invalid entry
        ("", []),
        ("-1", []),
    ],
)
def test_cuda_visible_devices_is_honoured(
    monkeypatch: pytest.MonkeyPatch, smi_gpus: list[Gpu], spec: str | None, names: list[str]
) -> None:
    if spec is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", spec)
    visible = hardware._visible(smi_gpus)
    assert [next(n for n in ("A100", "V100", "H100") if n in g.name) for g in visible] == names
    assert [g.index for g in visible] == list(range(len(names)))  # renumbered from 0, as CUDA does


def test_probe_reads_nvidia_smi_and_honours_the_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        assert argv[0] == "/usr/bin/nvidia-smi"
        return subprocess.CompletedProcess(argv, 0, stdout=SMI, stderr="")

    monkeypatch.setattr(hardware.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(hardware.subprocess, "run", fake_run)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    hw = Hardware.probe()
    assert [g.name for g in hw.gpus] == ["Tesla V100-SXM2-32GB"]
    assert resolve(make(), hw).precision.dtype == "fp16"


def test_probe_without_nvidia_smi_is_cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware.shutil, "which", lambda name: None)
    assert Hardware.probe().gpus == ()


def test_failing_nvidia_smi_is_cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        raise subprocess.CalledProcessError(9, argv)

    monkeypatch.setattr(hardware.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(hardware.subprocess, "run", broken)
    assert Hardware.probe().gpus == ()


# --------------------------------------------------------------------------- environment, command, handoff


def test_cpu_deepspeed_env_and_command() -> None:
    p = resolve(make(launch={"nproc_per_node": 2}), CPU)
    assert p.env["DS_ACCELERATOR"] == "cpu"
    assert p.env["OMP_NUM_THREADS"] == "4"
    assert "NCCL_DEBUG" not in p.env
    assert p.command[1:] == (
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        "--nproc-per-node=2",
        "--max-restarts=0",
        "-m",
        "launcher.worker.train",
        str(Path(p.run_dir) / "plan.json"),
    )


def test_cuda_env_and_fixed_port() -> None:
    p = resolve(make(launch={"master_port": 29600}), H100x8)
    assert "DS_ACCELERATOR" not in p.env
    assert p.env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert "--rdzv-endpoint=localhost:29600" in p.command
    assert "--standalone" not in p.command
    assert p.env["OMP_NUM_THREADS"] == "8"


def test_accelerate_on_cpu_sets_no_deepspeed_accelerator() -> None:
    assert "DS_ACCELERATOR" not in resolve(make(backend="accelerate"), CPU).env


def test_run_dir_is_logging_dir_slash_name(tmp_path: Path) -> None:
    p = resolve(make(logging={"dir": str(tmp_path)}), CPU)
    assert p.run_dir == str(tmp_path / "t")
    assert p.plan_path == tmp_path / "t" / "plan.json"


def test_plan_round_trips_through_json() -> None:
    p = resolve(make(precision={"dtype": "fp16", "loss_scale": {"window": 77}}, zero={"stage": 2}), H100x8)
    back = Plan.from_json(p.to_json())
    assert back == p
    precision = json.loads(p.to_json())["plan"]["precision"]
    # The whole policy travels: the worker reads it and never re-derives it from the recipe.
    assert {k: precision[k] for k in ("dtype", "reason", "allow_tf32", "bf16_supported", "master_dtype")} == {
        "dtype": "fp16",
        "reason": "set in the recipe",
        "allow_tf32": True,
        "bf16_supported": True,
        "master_dtype": "fp32",
    }
    assert precision["loss_scale"]["window"] == 77


@pytest.mark.parametrize(("dtype", "scaled"), [("fp16", True), ("bf16", False), ("fp32", False)])
def test_only_fp16_carries_loss_scale_settings(dtype: str, scaled: bool) -> None:
    p = resolve(make(precision={"dtype": dtype}), H100x8)
    assert (p.precision.loss_scale is not None) is scaled
    assert p.precision.autocast is (dtype != "fp32")


def test_bf16_support_is_decided_by_the_plan() -> None:
    assert resolve(make(precision={"dtype": "fp16"}), H100x8).precision.bf16_supported
    assert not resolve(make(precision={"dtype": "fp16"}), V100x4).precision.bf16_supported


def test_describe_has_every_part_of_the_dry_run() -> None:
    text = resolve(make(), CPU).describe()
    for header in (
        "== recipe (resolved) ==",
        "== plan ==",
        "== DeepSpeed config ==",
        "== environment ==",
        "== command ==",
    ):
        assert header in text
    assert "== Accelerate settings ==" in resolve(make(backend="accelerate"), CPU).describe()


# --------------------------------------------------------------------------- warnings


@pytest.mark.parametrize(
    ("recipe", "hw", "warning"),
    [
        (
            make(precision={"loss_scale": {"window": 10}}),
            H100x8,
            "precision.loss_scale.window: has no effect with bf16",
        ),
        (
            make(precision={"dtype": "fp16", "loss_scale": {"dynamic": False, "hysteresis": 4}}),
            H100x8,
            "precision.loss_scale.hysteresis: has no effect with a static loss scale",
        ),
        (make(precision={"allow_tf32": False}), CPU, "precision.allow_tf32: only affects fp32 runs"),
        (
            make(zero={"stage": 2, "offload_optimizer": True}),
            CPU,
            "zero.offload_optimizer: the run is on the CPU already",
        ),
        (
            make(backend="accelerate", zero={"stage": 1}),
            CPU,
            "zero.stage: FSDP2 has no optimizer-only mode; stage 1 runs as stage 2",
        ),
        (
            make(backend="accelerate", zero={"stage": 1}),
            H100x8,
            "zero.stage: FSDP2 has no optimizer-only mode",
        ),
        (make(train={"eval_every": 2000}), CPU, "train.eval_every: 2000 is beyond train.max_steps 1000"),
        (
            make(scheduler={"warmup_steps": 2000}),
            CPU,
            "scheduler.warmup_steps: 2000 is more than train.max_steps 1000; the learning rate never reaches",
        ),
        (make(checkpoint={"every_steps": 2000}), CPU, "checkpoint.every_steps: beyond train.max_steps"),
        (
            make(scheduler={"warmup_style": "hf", "warmup_steps": 0}),
            CPU,
            "scheduler.warmup_style: has no effect without warm-up",
        ),
    ],
)
def test_settings_without_effect_are_warned(recipe: Recipe, hw: Hardware, warning: str) -> None:
    warnings = resolve(recipe, hw).warnings
    assert any(w.startswith(warning) for w in warnings), warnings


def test_a_plain_recipe_has_no_warnings() -> None:
    assert resolve(make(), CPU).warnings == ()
    # FSDP2 shards on CPU as on GPUs: stages 2 and 3 of accelerate say nothing.
    assert resolve(make(backend="accelerate", zero={"stage": 3}), CPU).warnings == ()
    assert resolve(make(scheduler={"warmup_style": "hf", "warmup_steps": 10}), CPU).warnings == ()
    assert resolve(make(precision={"dtype": "fp16", "loss_scale": {"window": 10}}), H100x8).warnings == ()


@pytest.mark.parametrize(
    ("backend", "stage", "machine", "said"),
    [
        ("deepspeed", 2, CPU, "ZeRO stage 2"),
        ("accelerate", 0, H100x8, "DDP"),
        ("accelerate", 0, CPU, "DDP"),
        ("accelerate", 2, CPU, "FSDP2 fully_shard, no reshard after forward (zero.stage 2)"),
        ("accelerate", 1, H100x8, "FSDP2 fully_shard, no reshard after forward (zero.stage 1)"),
        ("accelerate", 3, CPU, "FSDP2 fully_shard, reshard after forward (zero.stage 3)"),
        ("accelerate", 3, H100x8, "FSDP2 fully_shard, reshard after forward (zero.stage 3)"),
    ],
)
def test_the_sharding_said_is_the_one_that_runs(
    backend: str, stage: int, machine: Hardware, said: str
) -> None:
    plan = resolve(make(backend=backend, zero={"stage": stage}, precision={"dtype": "fp32"}), machine)
    assert plan.sharding == said
    assert f"backend    {backend}, {said}\n" in plan.describe()


@pytest.mark.parametrize(
    ("machine", "device", "dtype", "reason"),
    [
        (Hardware(cpu_count=8, cpu_bf16=True), "cpu", "bf16", "native bf16"),
        (Hardware(cpu_count=8), "cpu", "fp32", "no native bf16"),
        (H100x8, "cuda", "bf16", "every visible GPU is Ampere or newer"),
        (V100x4, "cuda", "fp16", "predates Ampere"),
        (CPU, "cuda", "bf16", "no GPU is visible here, so bf16 is assumed"),
    ],
)
def test_auto_precision_follows_the_hardware(machine: Hardware, device: str, dtype: str, reason: str) -> None:
    plan = resolve(make(launch={"device": device}), machine, keep_machine_problems=True)
    assert plan.precision.dtype == dtype
    assert reason in plan.precision.reason


def test_native_cpu_bf16_is_read_from_the_cpu_flags() -> None:
    flags = "processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_tile\n"
    assert hardware.cpu_has_bf16(flags)
    assert hardware.cpu_has_bf16(flags.replace("avx512_bf16", "amx_bf16"))
    assert not hardware.cpu_has_bf16(flags.replace("avx512_bf16", "avx512bw"))
    assert not hardware.cpu_has_bf16("")
