"""The memory planner: ZeRO formulas, offload, activations, suggestions and `mplaunch plan`."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest

from launcher import cli
from launcher.plan.estimate import activations, memory, state_bytes
from launcher.plan.estimate.memory import Config, Setting
from launcher.plan.estimate.state_bytes import Params, model_state_bytes
from launcher.plan.hardware import Gpu, Hardware
from launcher.plan.resolve import resolve
from launcher.recipe.schema import load
from launcher.recipe.shapes import Shape
from tests.conftest import RECIPES, ROOT

GiB = 2**30

PSI = 800_000_000  # parameters
N = 8  # ranks: PSI / N = 1e8 exactly
BERT_TINY = Shape("bert-mlm", 128, 2, 2, 512, 30522, 512)
BERT_BASE = Shape("bert-mlm", 768, 12, 12, 3072, 30522, 512)


def _state(stage: int, dtype: str = "bf16", **kw: object) -> state_bytes.ModelState:
    return model_state_bytes(PSI, dtype, "deepspeed", stage, N, **kw)  # type: ignore[arg-type]


def test_zero_paper_formulas_for_mixed_precision_adam() -> None:
    # ZeRO paper, 16 bytes per parameter: stage 0 16Psi, stage 2 2Psi + 14Psi/N, stage 3 16Psi/N.
    assert _state(0).device_state == 16 * PSI
    assert _state(2).device_state == 2 * PSI + 14 * PSI // N == 3_000_000_000
    assert _state(3).device_state == 16 * PSI // N == 1_600_000_000
    # Stage 1 keeps every 16-bit grad between micro-batches (4Psi + 12Psi/N); its reduced
    # partition takes their place at the boundary (tests/e2e/test_train_cpu.py measures the grads
    # row); at grad_accum 1 only the partition is held, as in stage 2.
    assert _state(1, grad_accum=4).device_state == 4 * PSI + 12 * PSI // N
    assert _state(1, grad_accum=1).device_state == _state(2).device_state


def test_each_row_of_stage_2_by_hand() -> None:
    s = _state(2)
    assert (s.params, s.grads) == (1_600_000_000, 200_000_000)
    assert (s.master, s.optimizer) == (400_000_000, 800_000_000)
    # Two reduce buckets of 5e8 bf16 elements (overlap_comm); the step's fp32 grad partition.
    assert s.comm_buffers == 2 * 500_000_000 * 2
    assert s.step_buffers == 4 * PSI // N
    assert s.cpu == 0


def test_fp32_deepspeed() -> None:
    # Plain torch AdamW at stage 0: 4 + 4 + 8 bytes, no master copy, no step copy.
    s0 = _state(0, "fp32")
    assert (s0.params, s0.grads, s0.master, s0.optimizer) == (4 * PSI, 4 * PSI, 0, 8 * PSI)
    assert s0.step_buffers == 0
    # Stages 1-3 clone an fp32 master partition even in fp32 (stage 3: measured on a live
    # 2-rank run, tests/e2e/test_train_cpu.py, separate storage from the parameter partition).
    assert _state(2, "fp32").master == 4 * PSI // N
    assert _state(3, "fp32").master == 4 * PSI // N
    assert _state(3, "fp32").device_state == (4 + 4 + 4 + 8) * PSI // N


def test_stage_3_bytes_match_a_real_deepspeed_run() -> None:
    # Recorded from DeepSpeed 0.19.8, 2 CPU ranks, BertForMaskedLM tiny in bf16 (the tensors the
    # contract names): every tensor but the word embedding is below the persistence threshold,
    # so it is held whole besides its partition.
    s = model_state_bytes(BERT_TINY, "bf16", "deepspeed", 3, 2)
    assert (s.params, s.grads, s.master, s.optimizer) == (5_436_462, 4_416_698, 8_833_396, 17_666_792)
    # Stages 1-2: the same run held 8_833_400 bytes of master (DeepSpeed pads the flat group by 2).
    s2 = model_state_bytes(BERT_TINY, "bf16", "deepspeed", 2, 2)
    assert (s2.params, s2.grads) == (8_833_396, 4_416_698)
    assert s2.master == pytest.approx(8_833_400, abs=16)
    assert s2.optimizer == pytest.approx(17_666_800, abs=32)


def test_offload_optimizer_moves_master_and_moments_to_the_cpu() -> None:
    for stage in (1, 2, 3):
        plain, off = _state(stage), _state(stage, offload_optimizer=True)
        assert (off.master, off.optimizer, off.step_buffers) == (0, 0, 0)
        assert off.cpu >= plain.master + plain.optimizer
        assert off.device_state < plain.device_state
        assert off.params == plain.params


def test_offload_params_keeps_only_persistent_params_on_the_gpu() -> None:
    tensors = (4_000_000, 1_000, 1_000)  # one large tensor, two below the persistence threshold
    p = Params(sum(tensors), tensors)
    plain = model_state_bytes(p, "bf16", "deepspeed", 3, 2)
    off = model_state_bytes(p, "bf16", "deepspeed", 3, 2, offload_params=True, offload_optimizer=True)
    # On the GPU: the small tensors whole (2 * 2_000 bytes) and their partitions (2 * 1_000).
    assert off.params == 2 * 2_000 + 2 * 1_000
    assert off.cpu >= plain.params - off.params
    assert off.grads == 0


def test_accelerate_ddp_keeps_fp32_params_and_its_buckets() -> None:
    ddp = model_state_bytes(PSI, "bf16", "accelerate", 0, N)
    assert (ddp.params, ddp.grads, ddp.master, ddp.optimizer) == (4 * PSI, 4 * PSI, 0, 8 * PSI)
    assert ddp.comm_buffers == 4 * PSI  # DDP's gradient buckets
    assert model_state_bytes(PSI, "bf16", "accelerate", 0, 1).comm_buffers == 0


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_fsdp2_shards_fp32_params_grads_and_adam_state(dtype: str) -> None:
    # The fp32 DTensor shards are the master weights: 4 + 4 + 8 bytes per parameter over N, in any dtype.
    for stage in (1, 2, 3):
        s = model_state_bytes(PSI, dtype, "accelerate", stage, N)
        assert (s.params, s.grads, s.master, s.optimizer) == (4 * PSI // N, 4 * PSI // N, 0, 8 * PSI // N)
        assert s.cpu == 0
    # FSDP2 has no optimizer-only sharding: stage 1 runs as stage 2.
    assert model_state_bytes(PSI, dtype, "accelerate", 1, N) == model_state_bytes(
        PSI, dtype, "accelerate", 2, N
    )
    # CPUOffloadPolicy: shards, gradients and Adam state on the host, the unsharded copies on the device.
    off = model_state_bytes(PSI, dtype, "accelerate", 3, N, offload_params=True)
    assert off.device_state == 0
    assert off.cpu == 16 * PSI // N
    assert off.comm_buffers == model_state_bytes(PSI, dtype, "accelerate", 3, N).comm_buffers > 0


def test_fsdp2_splits_each_tensor_on_dim_0_as_torch_chunk() -> None:
    # An odd vocabulary of 1001 rows x 64, a 64-element norm and 2 token-type rows, over 8 ranks:
    # the first ranks take ceil(rows / 8) rows of each tensor, the last ones fewer (or none).
    p = Params(1001 * 64 + 64 + 2 * 64, (1001 * 64, 64, 2 * 64), dim0=(1001, 64, 2))
    assert p.shard(8) == 126 * 64 + 8 + 1 * 64
    assert p.partition(8) == 8008 + 8 + 16  # DeepSpeed's flat partition: numel / 8, rounded up
    s = model_state_bytes(p, "bf16", "accelerate", 3, 8)
    # Adam keeps a 4-byte `step` per tensor besides its two fp32 moments.
    assert (s.params, s.grads, s.optimizer) == (4 * p.shard(8), 4 * p.shard(8), 8 * p.shard(8) + 3 * 4)


def test_fsdp2_bytes_match_fully_shard_on_two_cpu_ranks() -> None:
    # Recorded from torch 2.13's fully_shard (per block, then the root) on 2 gloo ranks, BertForMaskedLM
    # tiny with a 1001-token vocabulary, after 2 micro-batches' backward and the step: rank 0's local
    # DTensor bytes (rank 1 holds 516 bytes fewer: half a vocabulary row of the embedding and the bias).
    # tests/worker/test_memory_fsdp2.py measures them live.
    tiny = Shape("bert-mlm", 128, 2, 2, 512, 1001, 512)
    for dtype, stage in [("bf16", 3), ("bf16", 2), ("fp32", 3)]:
        s = model_state_bytes(tiny, dtype, "accelerate", stage, 2)
        assert (s.params, s.grads, s.master, s.optimizer) == (1_217_236, 1_217_236, 0, 2_434_640)
    adapters = state_bytes.lora_params(tiny, 4)  # query and value, rank 4
    assert adapters is not None
    lora = model_state_bytes(adapters, "bf16", "accelerate", 3, 2, frozen=Params.of(tiny))
    assert (lora.params, lora.grads, lora.optimizer) == (1_225_428, 8_192, 16_416)


def test_fsdp2_gathers_the_root_and_two_blocks_at_stage_3_and_everything_at_stage_2() -> None:
    p = Params.of(BERT_BASE)
    layer, root = p.layer, p.total - 12 * p.layer
    assert root > layer  # BERT's root unit (embeddings, head) outweighs a block
    assert state_bytes.fsdp2_gathered(p, 3) == root + 2 * layer
    assert state_bytes.fsdp2_gathered(p, 2) == state_bytes.fsdp2_gathered(p, 1) == p.total
    # Plus the largest unit's unsharded gradients (compute dtype) and their fp32 reduce-scatter input.
    z3, z2 = (model_state_bytes(p, "bf16", "accelerate", stage, N) for stage in (3, 2))
    assert z3.comm_buffers == 2 * (root + 2 * layer) + (2 + 4) * root
    assert z2.comm_buffers == 2 * p.total + (2 + 4) * root
    # fp32 (no MixedPrecisionPolicy): the all-gathers and gradients are fp32.
    assert model_state_bytes(p, "fp32", "accelerate", 3, N).comm_buffers == 4 * (root + 2 * layer) + 8 * root
    # Without a block size the model is one unit, gathered whole.
    assert model_state_bytes(PSI, "bf16", "accelerate", 3, N).comm_buffers == 2 * PSI + 6 * PSI


def test_fsdp2_accumulates_whole_fp32_gradients_between_micro_batches() -> None:
    # grad_accum > 1: only the last micro-batch reduce-scatters; before it every rank holds the trained
    # parameters' whole gradients, upcast to fp32 (measured: 4 x 608,489 bytes per rank, 2 CPU ranks).
    one, four = (model_state_bytes(PSI, "bf16", "accelerate", 3, N, grad_accum=a) for a in (1, 4))
    assert four.comm_buffers == one.comm_buffers + 4 * PSI
    assert (four.params, four.grads, four.optimizer) == (one.params, one.grads, one.optimizer)
    # LoRA: the adapters' gradients only.
    adapters, base = Params(4_000_000), Params(PSI)
    lora = [
        model_state_bytes(adapters, "bf16", "accelerate", 3, N, grad_accum=a, frozen=base) for a in (1, 4)
    ]
    assert lora[1].comm_buffers == lora[0].comm_buffers + 4 * 4_000_000


@pytest.mark.parametrize("family", ["bert-mlm", "gpt2-lm", "tiny-mlp"])
@pytest.mark.parametrize(
    ("dtype", "backend"), [("bf16", "deepspeed"), ("fp32", "deepspeed"), ("bf16", "accelerate")]
)
def test_activations_grow_linearly_in_micro_batch(family: str, dtype: str, backend: str) -> None:
    shape = Shape(family, 256, 4, 4, 1024, 30522, 512)
    one = activations.activation_bytes(shape, 128, 1, dtype, backend, 0.1)
    assert one > 0
    for b in (2, 7, 32):
        assert activations.activation_bytes(shape, 128, b, dtype, backend, 0.1) == b * one


def test_layer_activations_are_korthikanti_with_sdpa() -> None:
    # 16-bit, I = 4h, dropout on: 34*s*b*h bytes per layer; SDPA replaces the 5*a*s^2*b
    # score terms with a 4-byte log-sum-exp per head and position.
    s, b, h, a = 128, 8, 768, 12
    got = activations._layer_activation_bytes(BERT_BASE, s, b, e=2, e_ln=2, mask=1)
    assert got == 34 * s * b * h + 4 * a * s * b


def test_activations_of_bert_base_by_hand() -> None:
    s, b, h, vocab, layers = 128, 32, 768, 30522, 12
    per_layer = 34 * s * b * h + 4 * 12 * s * b
    embeddings_and_head = s * b * h * (2 + 1 + 3 * 2 + 2)
    loss_tail = 3 * 4 * s * b * vocab  # fp32 log-softmax, its gradient, the logits' gradient (LMLoss)
    expected = layers * per_layer + embeddings_and_head + loss_tail
    assert activations.activation_bytes(BERT_BASE, s, b, "bf16", "deepspeed", 0.1) == expected


def _setting(params: Params, shape: Shape | None = None, micro: int = 8, world: int = 1) -> Setting:
    return Setting(params, shape, "bf16", "deepspeed", world, micro, micro * world, 1, 128, 0.1)


def test_suggestion_fits_without_offload() -> None:
    line = memory.suggest(_setting(Params.of(BERT_BASE), BERT_BASE), 76 * memory.GiB)
    assert line.startswith("suggestion: zero.stage=0 fits")
    assert "largest micro_batch_size for it:" in line


def test_largest_micro_batch_fits_and_one_more_does_not() -> None:
    setting = _setting(Params.of(BERT_BASE), BERT_BASE)
    est = memory.estimate(setting, Config(2))
    usable = 20 * memory.GiB
    most = est.max_micro_batch(usable)
    assert most is not None
    assert most > 8
    assert est.total(most) <= usable < est.total(most + 1)


def test_suggestion_needs_offload() -> None:
    # 2e9 parameters on one 24 GiB GPU: 32 GB of model state without offload.
    line = memory.suggest(_setting(Params(2_000_000_000)), int(24 * memory.GiB * memory.HEADROOM))
    assert line.startswith("suggestion: zero.stage=1 zero.offload_optimizer=true fits")
    assert "activations are unknown" in line


def test_suggestion_with_a_smaller_micro_batch() -> None:
    large = Shape("bert-mlm", 1024, 24, 16, 4096, 30522, 512)
    line = memory.suggest(_setting(Params.of(large), large, micro=32), int(4 * memory.GiB))
    assert line.startswith("suggestion: nothing fits at micro_batch_size 32;")
    assert "fits with a smaller micro-batch; largest micro_batch_size for it:" in line


def test_nothing_fits_says_what_to_do() -> None:
    line = memory.suggest(_setting(Params(2_000_000_000)), memory.GiB)
    assert line.startswith("nothing fits in 1.00 GiB")
    assert "use more GPUs" in line


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("80GB", 80 * 10**9),
        ("80GiB", 80 * 2**30),
        ("24G", 24 * 2**30),
        ("24g", 24 * 2**30),
        ("512MiB", 512 * 2**20),
        ("1.5TB", 1_500_000_000_000),
        (" 40 GiB ", 40 * 2**30),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert cli.parse_size(text) == size


@pytest.mark.parametrize("bad", ["80", "lots", "0GB", "-4G", "80 GX", ""])
def test_bad_gpu_memory_is_one_line_and_exit_2(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["plan", str(RECIPES / "bert.yaml"), f"--gpu-memory={bad}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("error: --gpu-memory: expected a size such as 80GB, 80GiB or 24G")


def _no_gpu(monkeypatch: pytest.MonkeyPatch, hardware: Hardware | None = None) -> None:
    seen = hardware or Hardware(cpu_count=2)
    monkeypatch.setattr(Hardware, "probe", classmethod(lambda cls: seen))


def test_plan_prints_the_table_without_a_gpu(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _no_gpu(monkeypatch)
    assert cli.main(["plan", str(RECIPES / "bert.yaml")]) == 0
    out = capsys.readouterr().out
    assert "assumed: no GPU is visible and --gpu-memory was not given" in out
    header = next(line for line in out.splitlines() if line.startswith("GiB per GPU"))
    assert header.split()[3:] == ["stage", "0", "stage", "1", "stage", "2*", "stage", "3"]
    rows = ("params", "grads", "master (fp32)", "optimizer", "activations", "CUDA context", "total", "fits")
    for row in rows:
        assert any(line.startswith(row) for line in out.splitlines()), row
    assert "CPU (offload)" in out
    assert "suggestion: zero.stage=0 fits" in out


def test_plan_targets_the_visible_gpu(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _no_gpu(monkeypatch, Hardware((Gpu(0, "NVIDIA L4", (8, 9), 24 * 2**30),), cpu_count=2))
    assert cli.main(["plan", "bert", "model.size=large", "train.micro_batch_size=256"]) == 0
    out = capsys.readouterr().out
    assert "target: 24.00 GiB per GPU (NVIDIA L4)" in out
    assert "nothing fits at micro_batch_size 256" in out


def test_plan_for_a_user_model_needs_num_params(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _no_gpu(monkeypatch)
    user = ["plan", "bert", "model.name=null", "model.target=mypkg.models:build"]
    assert cli.main(user) == 2
    assert "pass --num-params" in capsys.readouterr().err
    assert cli.main([*user, "--num-params", "350M", "--gpu-memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    assert "350.0M parameters" in out
    assert "activations: unknown" in out


def test_plan_for_the_tiny_mlp(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _no_gpu(monkeypatch)
    assert cli.main(["plan", "bert_tiny", "model.name=tiny-mlp", "data.kind=synthetic", "data.paths=[]"]) == 0
    assert "suggestion:" in capsys.readouterr().out


def test_describe_for_the_dry_run() -> None:
    plan = resolve(load(RECIPES / "bert.yaml"), Hardware(cpu_count=2), keep_machine_problems=True)
    text = memory.describe(plan, gpu_memory_bytes=80 * memory.GiB)
    title, line = text.splitlines()
    assert title.startswith("== memory")
    assert line.startswith("ZeRO stage 2: ")
    assert line.endswith("fits in 80.00 GiB")
    assert "activations" in line


@pytest.mark.parametrize(
    ("stage", "name"),
    [
        (0, "DDP (zero.stage 0)"),
        (1, "FSDP2 reshard_after_forward=False (zero.stage 1)"),
        (2, "FSDP2 reshard_after_forward=False (zero.stage 2)"),
        (3, "FSDP2 reshard_after_forward=True (zero.stage 3)"),
    ],
)
def test_describe_names_fsdp2_on_cpu(stage: int, name: str) -> None:
    # FSDP2 runs on CPU too (gloo): a CPU plan's estimate is sharded, not DDP's whole copy.
    plan = resolve(
        load(RECIPES / "bert_tiny.yaml", ["backend=accelerate", f"zero.stage={stage}"]), Hardware(cpu_count=2)
    )
    assert plan.device == "cpu"
    line = memory.describe(plan).splitlines()[1]
    assert line.startswith(f"{name}: ")
    setting = memory.setting_of(plan)
    ddp, est = (memory.estimate(setting, Config(s)).state for s in (0, stage))
    if stage:
        assert est.params == pytest.approx(ddp.params / 2, rel=1e-3)
        assert est.optimizer == pytest.approx(ddp.optimizer / 2, rel=1e-3)
        # The unsharded blocks and a unit's gradients (DDP's buckets: the gradients' size).
        assert 0 < est.comm_buffers != ddp.comm_buffers


def test_plan_for_accelerate_names_fsdp2_and_offloads_nothing_on_cpu(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _no_gpu(monkeypatch, Hardware(cpu_count=2, memory_bytes=24 * GiB))
    tiny = str(RECIPES / "bert_tiny.yaml")
    assert cli.main(["plan", tiny, "backend=accelerate", "zero.stage=3", "model.size=base"]) == 0
    out = capsys.readouterr().out
    assert "GiB per process" in out
    assert "stage 3 = FSDP2 reshard_after_forward=True" in out
    # 2 processes: stages 1-3 hold half of what DDP (stage 0) holds whole, stage 1 as stage 2.
    params = [
        float(x) for x in next(line for line in out.splitlines() if line.startswith("params")).split()[1:]
    ]
    assert params[1] == params[2] == params[3] == pytest.approx(params[0] / 2, abs=0.01)
    # A CPU process holds everything in host memory: offload is never the suggestion there.
    huge = Setting(Params(2_000_000_000), None, "bf16", "accelerate", 1, 8, 8, 1, 128, 0.1, device="cpu")
    assert "offload" not in memory.suggest(huge, 24 * GiB)
    assert "offload_params=true" in memory.suggest(replace(huge, device="cuda"), 24 * GiB)


def test_offload_moves_nothing_in_a_cpu_plan() -> None:
    offload = [
        "backend=accelerate",
        "zero.stage=3",
        "zero.offload_params=true",
        "zero.offload_optimizer=true",
    ]
    plan = resolve(load(RECIPES / "bert_tiny.yaml", offload), Hardware(cpu_count=2))
    assert memory.recipe_config(plan, 3) == Config(3, True, True)  # planned for GPUs
    assert memory.recipe_config(plan, 3, "cpu") == Config(3)
    line = memory.describe(plan).splitlines()[1]
    assert line.startswith("FSDP2 reshard_after_forward=True (zero.stage 3): ")
    assert "on the CPU" not in line


def test_planner_imports_no_torch() -> None:
    code = (
        "import sys, launcher.plan.estimate.flops, launcher.cli as c;"
        f" c.main(['plan', {str(RECIPES / 'bert.yaml')!r}, '--gpu-memory', '80GiB']);"
        " print(sorted(x for x in ('torch', 'deepspeed', 'accelerate', 'transformers') if x in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip().splitlines()[-1] == "[]"


# --------------------------------------------------------------------------- LoRA


def test_lora_adapters_of_the_built_in_models() -> None:
    # rank * (in + out) per adapted layer, peft's default targets (checked against peft in test_lora.py).
    bert = state_bytes.lora_params(BERT_BASE, 8)
    assert bert is not None
    assert bert.total == 12 * 2 * 8 * (768 + 768)
    assert len(bert.tensors) == 12 * 2 * 2  # A and B of query and value in every layer
    assert bert.layer == 2 * 8 * (768 + 768)
    gpt2 = state_bytes.lora_params(Shape("gpt2-lm", 768, 12, 12, 3072, 50257, 1024), 4)
    assert gpt2 is not None
    assert gpt2.total == 12 * 4 * (768 + 3 * 768)  # c_attn: 768 -> 2304
    named = state_bytes.lora_params(BERT_BASE, 8, ["dense"])  # 3 per layer + the head transform
    assert named is not None
    assert named.total == 12 * 8 * ((768 + 768) + (768 + 3072) + (3072 + 768)) + 8 * (768 + 768)


def test_lora_moves_grads_master_and_optimizer_to_the_adapters() -> None:
    base, adapters = Params.of(BERT_BASE), state_bytes.lora_params(BERT_BASE, 8)
    assert adapters is not None
    for stage in (0, 1, 2, 3):
        full = model_state_bytes(base, "bf16", "deepspeed", stage, N)
        lora = model_state_bytes(adapters, "bf16", "deepspeed", stage, N, frozen=base)
        assert lora.grads + lora.master + lora.optimizer < (full.grads + full.master + full.optimizer) / 100
        assert lora.params >= full.params  # the frozen base, plus the adapters
        assert lora.device_state < full.device_state
    # ZeRO-3: the adapters are small tensors, kept whole on every rank besides their partition.
    z3 = model_state_bytes(adapters, "bf16", "deepspeed", 3, N, frozen=base)
    plain = model_state_bytes(base, "bf16", "deepspeed", 3, N)
    assert z3.params == plain.params + 2 * (adapters.total + adapters.partition(N))


def test_no_lora_leaves_every_row_as_it_was() -> None:
    for backend, stage in [
        ("deepspeed", 0),
        ("deepspeed", 2),
        ("deepspeed", 3),
        ("accelerate", 0),
        ("accelerate", 3),
    ]:
        p = Params.of(BERT_BASE)
        assert model_state_bytes(p, "bf16", backend, stage, N, frozen=Params(0)) == model_state_bytes(
            p, "bf16", backend, stage, N
        )


def test_lora_activations_drop_the_frozen_layers_inputs() -> None:
    adapters = state_bytes.lora_params(BERT_BASE, 8)
    assert adapters is not None
    s, b, h, inter, e = 128, 32, 768, 3072, 2
    no_dropout = state_bytes.LoraSetting(8, 0.0, adapters)
    # Per layer: the MLP's two inputs go; query/value's shared input stays (the adapters read it);
    # each adapter keeps its rank-8 intermediate. Embeddings keep nothing; the head's two linear inputs go.
    per_layer = -s * b * (h + inter) * e + 2 * s * b * 8 * e
    expected = 12 * per_layer - s * b * h * (e + 1) - 2 * s * b * h * e
    assert (
        activations.lora_activation_delta(BERT_BASE, s, b, "bf16", "deepspeed", 0.1, no_dropout) == expected
    )
    # With LoRA dropout the shared input goes too, and each adapter keeps its dropped-out copy and mask.
    dropout = state_bytes.LoraSetting(8, 0.05, adapters)
    extra = 12 * (-s * b * h * e + 2 * s * b * h * (e + 1))
    assert (
        activations.lora_activation_delta(BERT_BASE, s, b, "bf16", "deepspeed", 0.1, dropout)
        == expected + extra
    )


def test_plan_table_with_lora(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _no_gpu(monkeypatch)

    def rows(*overrides: str) -> dict[str, list[str]]:
        assert cli.main(["plan", str(RECIPES / "bert.yaml"), "--gpu-memory", "24GiB", *overrides]) == 0
        out = capsys.readouterr().out
        table = {line[:16].strip(): line[16:].split() for line in out.splitlines() if line[:16].strip()}
        table["_out"] = [out]
        return table

    full, lora = rows(), rows("model.lora.rank=8")
    assert "LoRA rank 8: 294,912 of " in lora["_out"][0]
    assert lora["params"] == full["params"]  # 0.16 GiB of bf16 base either way (adapters: 0.6 MB)
    for row in ("grads", "master (fp32)", "optimizer", "step buffers"):
        assert set(lora[row]) == {"0.00"}, row
        assert set(full[row]) != {"0.00"}, row
    assert [float(x) for x in lora["total"]] < [float(x) for x in full["total"]]


def test_planner_with_lora_imports_no_torch() -> None:
    code = (
        "import sys, launcher.cli as c;"
        f" c.main(['plan', {str(RECIPES / 'bert.yaml')!r}, 'model.lora.rank=8', '--gpu-memory', '80GiB']);"
        " print(sorted(x for x in ('torch', 'deepspeed', 'accelerate', 'transformers', 'peft') if x in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert "LoRA rank 8" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_a_hugging_face_model_is_counted_from_its_safetensors_headers(tiny_models) -> None:
    plan = resolve(load(RECIPES / "bert_finetune_tiny.yaml"), Hardware(cpu_count=2))
    assert plan.num_params is not None
    assert plan.num_params > 0
    setting = memory.setting_of(plan)  # no --num-params needed
    assert setting.num_params == plan.num_params
    assert memory.setting_of(plan, num_params=1000).num_params == 1000  # --num-params still wins


def test_a_cpu_plan_is_per_process_in_host_memory(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _no_gpu(monkeypatch, Hardware(cpu_count=2, memory_bytes=24 * GiB))
    assert cli.main(["plan", str(RECIPES / "bert_tiny.yaml")]) == 0
    out = capsys.readouterr().out
    assert "target: 12.00 GiB per process (this machine's 24.00 GiB over 2 processes;" in out
    assert any(line.startswith("GiB per process") for line in out.splitlines())
    assert "CUDA context" not in out
    assert "total = params + grads + master + optimizer\n" in out
    # Without overlap_comm (off on CPU) DeepSpeed allocates one reduce bucket, not two.
    comm = next(line for line in out.splitlines() if line.startswith("comm buffers")).split()[2:]
    assert comm[1] == f"{5e8 * 4 / GiB:.2f}"
    # Asked for GPUs, the same plan is per GPU again, with a CUDA context.
    assert cli.main(["plan", str(RECIPES / "bert_tiny.yaml"), "--gpu-memory", "24GB"]) == 0
    out = capsys.readouterr().out
    assert any(line.startswith("GiB per GPU") for line in out.splitlines())
    assert "CUDA context" in out
    dry = resolve(load(RECIPES / "bert_tiny.yaml"), Hardware(cpu_count=2))
    assert memory.describe(dry).startswith("== memory (estimate per process;")
