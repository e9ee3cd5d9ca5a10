"""Model FLOPs per optimizer step, parameter counts of the built-in models, and MFU.

Pure arithmetic on `launcher.recipe.shapes.Shape` (no torch): the metrics writer,
the memory planner and the benchmarks all count the same way.

Training FLOPs of a built-in transformer, per sequence of `s` tokens:

    flops = 6 * N * s  +  12 * L * s^2 * h

* `N` counts the weights of every matrix multiply a token goes through: the
  per-layer Q, K, V, output and both MLP projections (4h^2 + 2hI per layer),
  BERT's head transform (h^2), and the vocabulary projection (hV). The LM head
  counts even when its weight is tied to the word embedding, because the matmul
  runs. Embedding lookups (word, position, token type), biases and LayerNorm
  weights are left out: they cost O(N) elementwise work, not 2 FLOPs per weight
  per token. 6 = 2 (multiply-add) x 3 (forward, and backward for the input and
  for the weight gradient).
* The attention term: QK^T and AV each take 2*s^2*h FLOPs per layer in the
  forward pass (2*2*s^2*h together), times 3 for forward plus backward. The
  full s^2 is counted for causal GPT-2 as well (PaLM's convention), so MFU is
  comparable across attention kernels.

A step's FLOPs are that times the samples per optimizer step (global batch).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from launcher.recipe.families import FAMILIES
from launcher.recipe.shapes import Shape

# --------------------------------------------------------------------------- parameters


def param_tensors(shape: Shape) -> list[tuple[str, int]] | None:
    """The model's parameter tensors as (name, numel) (its family's `tensors`), or None for a model
    that is not a built-in family."""
    family = FAMILIES.get(shape.family)
    return family.tensors(shape) if family else None


def param_count(shape: Shape) -> int | None:
    """Equals `sum(p.numel() for p in model.parameters())` of the built model, or None if unknown."""
    tensors = param_tensors(shape)
    return None if tensors is None else sum(n for _, n in tensors)


def layer_param_count(shape: Shape) -> int:
    """Parameters of one transformer block (BERT and GPT-2 have the same count): 4h^2 + 2hI + 9h + I."""
    h, inter = shape.hidden_size, shape.intermediate_size
    return 4 * h * h + 2 * h * inter + 9 * h + inter


# --------------------------------------------------------------------------- FLOPs


def matmul_params(shape: Shape) -> int:
    """`N` of the 6*N*tokens rule for BERT and GPT-2: every matmul weight, LM head included (module doc)."""
    h, inter = shape.hidden_size, shape.intermediate_size
    per_layer = 4 * h * h + 2 * h * inter
    head_transform = h * h if FAMILIES[shape.family].head_transform else 0
    return shape.num_layers * per_layer + head_transform + h * shape.vocab_size


def transformer_flops_per_sequence(shape: Shape, seq_len: int) -> float:
    """Training FLOPs (forward + backward) of one sequence: 6*N*s + 12*L*s^2*h."""
    return 6.0 * matmul_params(shape) * seq_len + 12.0 * shape.num_layers * seq_len**2 * shape.hidden_size


def tiny_mlp_flops_per_sequence(shape: Shape, seq_len: int) -> float:
    """6*N*s with N = 2hI (MLP) + hV (head); the model has no attention."""
    h = shape.hidden_size
    return 6.0 * (2 * h * shape.intermediate_size + h * shape.vocab_size) * seq_len


# The per-model hook for FLOPs: family -> training FLOPs of one sequence of seq_len tokens.
FLOPS_PER_SEQUENCE: dict[str, Callable[[Shape, int], float]] = {
    name: transformer_flops_per_sequence if family.transformer else tiny_mlp_flops_per_sequence
    for name, family in FAMILIES.items()
}


def flops_per_step(shape: Shape | None, seq_len: int, samples_per_step: int) -> float | None:
    """Model FLOPs of one optimizer step (all ranks, all micro-batches).

    Args:
        shape: the built-in model's shape; None for a user's model (no formula).
        seq_len: tokens per sample.
        samples_per_step: samples per optimizer step, i.e. the global batch size.

    Returns:
        FLOPs, or None when no formula is registered for the model.
    """
    if shape is None:
        return None
    fn = FLOPS_PER_SEQUENCE.get(shape.family)
    return None if fn is None else fn(shape, seq_len) * samples_per_step


# --------------------------------------------------------------------------- peak throughput and MFU

# Dense peak TFLOP/s per GPU from NVIDIA's datasheets (the sparsity figures
# halved). "tf32" is an fp32 matmul on tensor cores (precision.allow_tf32);
# Volta has no TF32 or bf16: its tf32 entry is plain fp32 and bf16 is absent. fp8 (Ada and
# Hopper: L4, H100, H200) is twice bf16; older GPUs have no fp8 entry.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 SXM": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.8},
    "H100 PCIe": {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0, "fp8": 1512.0},
    "H100 NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5, "fp8": 1671.0},
    "H200": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.8},
    "H200 NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5, "fp8": 1671.0},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0},
    "V100 SXM2": {"fp32": 15.7, "tf32": 15.7, "fp16": 125.0},
    "V100 PCIe": {"fp32": 14.0, "tf32": 14.0, "fp16": 112.0},
    "V100S PCIe": {"fp32": 16.4, "tf32": 16.4, "fp16": 130.0},
    "L4": {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0, "fp8": 242.0},
}

# First match wins; the name is as nvidia-smi / torch.cuda.get_device_name print it,
# e.g. "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-40GB",
# "Tesla V100-SXM2-16GB". Word boundaries keep "L40S" from matching L4 and
# "GH200" from matching H200 (neither is in the table).
_GPU_PATTERNS: list[tuple[str, str]] = [
    (r"\bh200\b.*\bnvl\b", "H200 NVL"),
    (r"\bh200\b", "H200"),
    (r"\bh100\b.*\bnvl\b", "H100 NVL"),
    (r"\bh100\b.*\bpcie\b", "H100 PCIe"),
    (r"\bh100\b", "H100 SXM"),
    (r"\ba100\b", "A100"),  # SXM4 40/80GB and PCIe share the same peaks
    (r"\bv100s\b", "V100S PCIe"),
    (r"\bv100\b.*\bpcie\b", "V100 PCIe"),
    (r"\bv100\b", "V100 SXM2"),
    (r"\bl4\b", "L4"),
]


def match_gpu(name: str | None) -> str | None:
    """The PEAK_TFLOPS key for a device name as torch or nvidia-smi reports it, or None if unknown."""
    if not name:
        return None
    text = name.lower().replace("-", " ").replace("_", " ")
    return next((key for pattern, key in _GPU_PATTERNS if re.search(pattern, text)), None)


def peak_flops(gpu_name: str | None, dtype: str) -> float | None:
    """Dense peak FLOP/s of one GPU for dtype (fp32, tf32, bf16, fp16, fp8); None if unknown or unsupported."""
    key = match_gpu(gpu_name)
    tflops = PEAK_TFLOPS[key].get(dtype) if key else None
    return None if tflops is None else tflops * 1e12


def mfu(
    flops_per_step: float | None, step_time_s: float, gpu_name: str | None, dtype: str, num_gpus: int
) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the peak of all GPUs in the run.

    Args:
        flops_per_step: model FLOPs of one optimizer step across all ranks.
        step_time_s: wall time of one optimizer step.
        gpu_name: device name (None or "cpu" on CPU).
        dtype: the PEAK_TFLOPS column (the precision policy's `matmul_dtype`).
        num_gpus: GPUs the step ran on (the world size).

    Returns:
        A fraction (0.45 is 45 %), or None for CPU, an unknown GPU, or a dtype the GPU lacks.
    """
    peak = peak_flops(gpu_name, dtype)
    if peak is None or flops_per_step is None or step_time_s <= 0 or num_gpus < 1:
        return None
    return flops_per_step / step_time_s / (peak * num_gpus)
