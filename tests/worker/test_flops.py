"""FLOP counts, parameter counts against the real models, the peak table and MFU."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from launcher.plan.estimate import flops
from launcher.plan.precision import PrecisionPolicy
from launcher.recipe.schema import Model
from launcher.recipe.shapes import Shape, shape_of
from launcher.worker import models

BERT_TINY = Shape(
    "bert-mlm",
    hidden_size=128,
    num_layers=2,
    num_heads=2,
    intermediate_size=512,
    vocab_size=30522,
    max_position_embeddings=512,
)
GPT2_TINY = Shape(
    "gpt2-lm",
    hidden_size=128,
    num_layers=2,
    num_heads=2,
    intermediate_size=512,
    vocab_size=50257,
    max_position_embeddings=1024,
)


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("bert-mlm", "tiny"),
        ("bert-mlm", "base"),
        ("gpt2-lm", "tiny"),
        ("gpt2-lm", "base"),
        ("tiny-mlp", "tiny"),
    ],
)
def test_param_count_matches_the_built_model(name: str, size: str) -> None:
    model = Model(name=name, size=size)
    shape = shape_of(model)
    with torch.device("meta"):  # shapes without memory: BERT-base builds in a blink
        built = models.build(model, shape)
    assert flops.param_count(shape) == sum(p.numel() for p in built.parameters())
    inner = getattr(built, "lm", built)  # the transformers model inside mplaunch's fp32-loss wrapper
    assert [n for n, _ in flops.param_tensors(shape)] == [n for n, _ in inner.named_parameters()]


def test_param_count_of_tiny_bert_by_hand() -> None:
    h, inter, vocab, pos, layers = 128, 512, 30522, 512, 2
    embeddings = vocab * h + pos * h + 2 * h + 2 * h  # word, position, token type, LayerNorm
    layer = 4 * (h * h + h) + 2 * h + (h * inter + inter) + (inter * h + h) + 2 * h
    head = (h * h + h) + 2 * h + vocab  # transform dense, LayerNorm, decoder bias (weight tied)
    assert embeddings + layers * layer + head == 4_416_698
    assert flops.param_count(BERT_TINY) == 4_416_698
    assert flops.layer_param_count(BERT_TINY) == layer


def test_unknown_family_has_no_count() -> None:
    assert flops.param_count(Shape("mystery", 8, 1, 1, 8, 10, 10)) is None
    assert flops.flops_per_step(None, 128, 32) is None


def test_bert_flops_by_hand() -> None:
    # N: per layer Q, K, V, O (4 * 128*128 = 65_536) + MLP (2 * 128*512 = 131_072) = 196_608;
    # 2 layers = 393_216; head transform 128*128 = 16_384; decoder 128*30522 = 3_906_816.
    n = 393_216 + 16_384 + 3_906_816
    assert flops.matmul_params(BERT_TINY) == n == 4_316_416
    # One sequence of 64 tokens: 6*N*64 = 1_657_503_744; attention 12 * 2 layers * 64^2 * 128 = 12_582_912.
    per_sequence = 1_657_503_744 + 12_582_912
    assert flops.transformer_flops_per_sequence(BERT_TINY, 64) == per_sequence
    # A step of global batch 32.
    assert flops.flops_per_step(BERT_TINY, 64, 32) == 32 * per_sequence == 53_442_772_992


def test_gpt2_flops_by_hand() -> None:
    # N: 2 layers * (c_attn 128*384 + c_proj 128*128 + c_fc 128*512 + c_proj 512*128 = 196_608)
    # + tied lm_head 128*50257 = 6_432_896 (the matmul runs even though the weight is shared).
    n = 2 * 196_608 + 6_432_896
    assert flops.matmul_params(GPT2_TINY) == n == 6_826_112
    # 6*N*1024 = 41_939_632_128; attention over the full 1024^2: 12 * 2 * 1024^2 * 128 = 3_221_225_472.
    assert flops.flops_per_step(GPT2_TINY, 1024, 1) == 41_939_632_128 + 3_221_225_472


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 SXM5 80GB", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H100 NVL", "H100 NVL"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA H200 NVL", "H200 NVL"),
        ("NVIDIA A100-SXM4-40GB", "A100"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA A100 80GB PCIe", "A100"),
        ("Tesla V100-SXM2-32GB", "V100 SXM2"),
        ("Tesla V100-PCIE-16GB", "V100 PCIe"),
        ("Tesla V100S-PCIE-32GB", "V100S PCIe"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA L40S", None),
        ("NVIDIA GH200 480GB", None),
        ("NVIDIA GeForce RTX 4090", None),
        ("cpu", None),
        (None, None),
    ],
)
def test_match_gpu(name: str | None, key: str | None) -> None:
    assert flops.match_gpu(name) == key


def test_mfu_arithmetic_with_a_faked_device() -> None:
    # 8 H100 SXM at 989.4 TFLOP/s bf16; a step of 3.9576e15 FLOPs taking 2 s is
    # 1.9788e15 FLOP/s achieved, a quarter of 8 * 989.4e12 = 7.9152e15.
    got = flops.mfu(3.9576e15, 2.0, "NVIDIA H100 80GB HBM3", "bf16", 8)
    assert got == pytest.approx(0.25)
    # The same work on one A100 in tf32 (156 TFLOP/s): 1.56e14 FLOPs in 1 s is 100 %.
    assert flops.mfu(1.56e14, 1.0, "NVIDIA A100-SXM4-80GB", "tf32", 1) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("gpu", "dtype"),
    [("NVIDIA GeForce RTX 4090", "bf16"), ("cpu", "bf16"), (None, "fp32"), ("Tesla V100-SXM2-16GB", "bf16")],
)
def test_mfu_is_none_without_a_known_peak(gpu: str | None, dtype: str) -> None:
    assert flops.mfu(1e15, 1.0, gpu, dtype, 1) is None


def test_mfu_is_none_without_flops() -> None:
    assert flops.mfu(None, 1.0, "NVIDIA H100 PCIe", "bf16", 1) is None


def test_matmul_dtype() -> None:
    def policy(dtype: str, tf32: bool) -> PrecisionPolicy:
        return PrecisionPolicy(dtype, "test", tf32, None, True)  # type: ignore[arg-type]

    assert policy("fp32", tf32=True).matmul_dtype == "tf32"
    assert policy("fp32", tf32=False).matmul_dtype == "fp32"
    assert policy("bf16", tf32=True).matmul_dtype == "bf16"


def test_every_table_entry_is_dense_and_ordered() -> None:
    # Dense tensor-core peaks are at least the fp32 peak; a sparsity figure slipping in
    # would show as bf16 > 2x tf32 on the parts that have both.
    for key, row in flops.PEAK_TFLOPS.items():
        assert all(v >= row["fp32"] for v in row.values()), key
        if "bf16" in row and row["tf32"] > row["fp32"]:
            assert row["bf16"] == pytest.approx(2 * row["tf32"], rel=0.01), key
