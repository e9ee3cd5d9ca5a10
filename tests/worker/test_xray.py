"""The precision x-ray's statistics against hand-computed values, and its judge on synthetic records."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from launcher.analysis.health import PrecisionHealth, underflow_share
from launcher.worker import xray
from launcher.worker.xray import Probe, Shard, grad_counts, layer_of, my_slice
from tests.plans import V100, make_plan

SUB = 2.0**-20  # fp16 subnormal (between 2^-24 and 2^-14)
TINY = 2.0**-27  # below half of fp16's smallest subnormal: rounds to zero in fp16


def counts(x: list[float]) -> dict[str, float]:
    c = grad_counts(torch.tensor(x, dtype=torch.float32)).tolist()
    return dict(zip((*xray.GRAD, "max_abs", "sumsq"), c, strict=True))


def test_grad_counts_by_hand() -> None:
    # zero, zero, rounds to 0, subnormal, subnormal (negative), normal, normal, near max (>= 4094), near max
    x = [0.0, -0.0, TINY, SUB, -SUB, 1.0, -(2.0**-14), 4094.0, -60000.0]
    c = counts(x)
    assert c == {
        "elements": 9,
        "zero": 2,
        "below_to_zero": 1,
        "below_normal": 3,  # TINY, SUB, -SUB; 2^-14 itself is fp16's smallest normal
        "near_max": 2,
        "max_abs": 60000.0,
        "sumsq": pytest.approx(sum(v * v for v in x)),
    }


def test_grad_counts_agree_with_a_cast_to_fp16() -> None:
    """What the counts call zero, subnormal and normal is what a cast to fp16 gives."""
    x = torch.logspace(-12, 5, 2001, dtype=torch.float32) * torch.tensor([1.0, -1.0]).repeat(1001)[:2001]
    h = x.half().float().abs()
    c = counts(x.tolist())
    assert c["below_to_zero"] == int((h == 0).sum())
    assert c["below_normal"] == int((h < 2.0**-14).sum())
    assert c["near_max"] == int((x.abs() >= 65504 / 16).sum())


def test_counts_in_chunks_equal_counts_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(10_001) * 1e-4
    whole = grad_counts(x, 2.0**10)
    monkeypatch.setattr(xray, "CHUNK", 97)
    chunked = grad_counts(x, 2.0**10)
    assert torch.equal(chunked[:-1], whole[:-1])
    assert chunked[-1] == pytest.approx(float(whole[-1]), rel=1e-9)  # sums in another order
    assert torch.equal(whole[:-2], grad_counts(x * 2.0**10)[:-2])  # scaled on the way = scaled before


def test_layer_names_drop_wrappers_and_the_parameter() -> None:
    assert (
        layer_of("module.bert.encoder.layer.0.attention.self.query.weight")
        == "bert.encoder.layer.0.attention.self.query"
    )
    assert layer_of("_orig_mod.lm._checkpoint_wrapped_module.head.bias") == "lm.head"
    assert layer_of("bias") == "bias"


def test_my_slice_covers_every_element_once() -> None:
    t = torch.arange(10.0)
    parts = [my_slice(t, r, 3) for r in range(3)]
    assert [p.tolist() for p in parts] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert my_slice(torch.arange(2.0), 3, 4).numel() == 0  # more ranks than elements


def test_probe_scales_unscaled_gradients_and_follows_updates() -> None:
    """An unscaled gradient g at loss scale 2^10 is judged as g * 2^10; updates are compared after the step."""
    grad = torch.tensor([0.0, 2.0**-30, 2.0**-20, 1.0])  # scaled: 0, 2^-20 (subnormal), 2^-10, 2^10
    master = torch.tensor([1.0, 1.0, 1.0, 1.0])
    probe = Probe(["a", "unused"], [Shard("a", grad, master)], "fp16", 2.0**10, held_scaled=False)
    # The step: element 1 moves by less than half of fp32's last bit at 1.0 (2^-24), element 2 by
    # less than half of fp16's (2^-11), element 3 by more; element 0 has no gradient.
    master += torch.tensor([0.5, 2.0**-26, 2.0**-13, 2.0**-8])
    seen = probe.finish(stepped=True, lr=1e-3, world=1)
    a = seen["layers"]["a"]
    assert a["elements"] == 4 and a["zero"] == 0.25
    assert a["underflow"] == pytest.approx(1 / 3) and a["to_zero"] == 0.0
    assert a["headroom_log2"] == pytest.approx(math.log2(65504 / 1024), abs=0.01)  # the largest is 2^10
    assert a["lost"] == pytest.approx(1 / 3)  # of the 3 elements with a gradient
    assert a["stale"] == pytest.approx(2 / 3)  # fp16 rounds 1 + 2^-13 back to 1
    assert seen["layers"]["unused"]["elements"] == 0 and seen["layers"]["unused"]["zero"] is None
    assert seen["loss_scale"] == 1024.0 and seen["skipped"] is False and seen["lr"] == 1e-3


def test_probe_takes_gradients_held_scaled_as_they_are() -> None:
    grad = torch.tensor([2.0**-20, 1.0], dtype=torch.float16)
    seen = Probe(["a"], [Shard("a", grad, None)], "fp16", 2.0**10, held_scaled=True).finish(True, 1e-3, 1)
    assert seen["layers"]["a"]["underflow"] == 0.5
    assert seen["layers"]["a"]["lost"] is None  # no master weight: no update columns


def test_a_skipped_step_has_no_update_columns() -> None:
    master = torch.ones(3)
    probe = Probe(["a"], [Shard("a", torch.ones(3), master)], "bf16", None, held_scaled=False)
    seen = probe.finish(stepped=False, lr=1e-3, world=1)
    assert seen["skipped"] is True and seen["layers"]["a"]["lost"] is None
    assert "underflow" not in seen["layers"]["a"]  # no loss scale, no fp16 columns


def test_bf16_stale_and_fp32_lost() -> None:
    """bf16 keeps 8 bits: 1 + 2^-10 rounds to 1 in bf16 (stale) but not in fp32 (not lost)."""
    master = torch.ones(2)
    probe = Probe(["a"], [Shard("a", torch.ones(2), master)], "bf16", None, held_scaled=False)
    master += torch.tensor([2.0**-10, 2.0**-6])
    a = probe.finish(True, 1e-3, 1)["layers"]["a"]
    assert a["stale"] == 0.5 and a["lost"] == 0.0


def test_updates_are_sampled_evenly_in_large_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(xray, "UPDATE_SAMPLE", 10)
    master = torch.ones(100)
    probe = Probe(["a"], [Shard("a", torch.ones(100), master)], "fp32", None, held_scaled=False)
    master[:50] += 1.0  # the first half moves
    a = probe.finish(True, 1e-3, 1)["layers"]["a"]
    assert a["lost"] == 0.5


def healthy_row(**over: Any) -> dict[str, Any]:
    row = {
        "elements": 100,
        "zero": 0.0,
        "underflow": 0.001,
        "to_zero": 0.0,
        "near_max": 0.0,
        "headroom_log2": 10.0,
        "lost": 0.0,
        "stale": 0.5,
    }
    return {**row, **over}


def seen(rows: dict[str, dict[str, Any]], scale: float | None = 1.0, lr: float = 1e-4, skipped: bool = False):
    return {"kind": "precision", "loss_scale": scale, "skipped": skipped, "lr": lr, "layers": rows}


def test_underflow_share_counts_an_all_zero_layer_as_flushed() -> None:
    assert underflow_share(healthy_row(zero=1.0, underflow=None)) == 1.0
    assert underflow_share(healthy_row(underflow=0.2)) == 0.2
    assert underflow_share({"elements": 0, "zero": None, "underflow": None}) is None
    assert underflow_share({"elements": 5, "zero": 0.0, "lost": 0.0}) is None  # bf16: no fp16 columns


def test_static_scale_too_low_gets_one_event_with_the_scale_that_fits() -> None:
    health = PrecisionHealth(make_plan(dynamic=False, initial=2.0**-16))
    rows = {"a": healthy_row(underflow=0.9, headroom_log2=30.2), "b": healthy_row(zero=1.0, underflow=None)}
    rows["c"] = healthy_row()
    ((event, message, fields),) = health.xray(50, seen(rows, scale=2.0**-16))
    assert event == "underflow"
    assert fields["layers"] == {"a": 0.9, "b": 1.0}
    assert "2 of 3 layers" in message and "1 of them have only zero gradients" in message
    assert "precision.loss_scale.dynamic=true" in message
    # The layer with the least headroom (c: 2^10) bounds the scale: 9 doublings keep it 2x below 65504.
    assert f"precision.loss_scale.initial to {2.0**-16 * 2.0**9:g}" in message
    assert "precision.dtype=bf16" in message  # an A100 has bf16
    assert health.xray(100, seen(rows, scale=2.0**-16)) == []  # the same layers: said once
    rows["c"] = healthy_row(underflow=0.5)
    ((_, again, fields),) = health.xray(150, seen(rows, scale=2.0**-16))
    assert "3 of 3 layers" in again


def test_no_headroom_advises_fp32_layers_and_no_bf16_without_it() -> None:
    health = PrecisionHealth(make_plan(hardware=V100))
    rows = {"deep": healthy_row(underflow=0.5, headroom_log2=8.0), "head": healthy_row(headroom_log2=0.6)}
    ((_, message, _),) = health.xray(50, seen(rows, scale=8.0))
    assert "the gradients of head are near fp16's maximum" in message and "fp32" in message
    assert "bf16" not in message  # a V100 has none


def test_healthy_skipped_and_bf16_records_raise_nothing() -> None:
    fp16 = PrecisionHealth(make_plan())
    assert fp16.xray(50, seen({"a": healthy_row(underflow=0.04)})) == []  # under 5 %
    assert fp16.xray(60, seen({"a": healthy_row(underflow=0.9)}, skipped=True)) == []
    bf16 = PrecisionHealth(make_plan("bf16"))
    rows = {"a": {"elements": 10, "zero": 1.0, "lost": 0.0, "stale": 0.9}}
    assert bf16.xray(50, seen(rows, scale=None)) == []


def test_lost_updates_are_judged_only_near_the_recipes_lr() -> None:
    health = PrecisionHealth(make_plan("bf16"))
    lr = health.peak_lr
    rows = {"norm": {"elements": 10, "zero": 0.0, "lost": 0.6, "stale": 1.0}, "dense": healthy_row(lost=0.01)}
    assert health.xray(1, seen(rows, None, lr=lr * 0.05)) == []  # warmup: the schedule's intent
    ((event, message, fields),) = health.xray(50, seen(rows, None, lr=lr))
    assert event == "lost_updates" and fields["layers"] == {"norm": 0.6}
    assert "norm 60%" in message and "optimizer.lr" in message and "bf16" in message


def test_sketches_of_shards_sum_to_the_sketch_of_the_whole() -> None:
    g = torch.randn(1001, dtype=torch.float64)
    whole = xray.sketch(g, 0)
    parts = sum(xray.sketch(my_slice(g, r, 3), xray.slice_start(1001, r, 3)) for r in range(3))
    assert torch.allclose(parts, whole, rtol=0, atol=1e-9)
    # Linear, with +-1 signs: a one-hot gradient's sketch is its element's signs.
    one = torch.zeros(10, dtype=torch.float64)
    one[7] = 2.0
    signs = xray.sketch(one, 0) / 2
    assert set(signs.tolist()) <= {-1.0, 1.0}
    assert torch.equal(xray.sketch(one[7:], 7), xray.sketch(one, 0))


def test_sketch_distance_estimates_the_relative_difference() -> None:
    torch.manual_seed(0)
    g = torch.randn(50_000, dtype=torch.float64)
    for true in (0.01, 0.5):
        other = g + true * g.norm() * torch.nn.functional.normalize(torch.randn_like(g), dim=0)
        a, b = xray.sketch(g, 0), xray.sketch(other, 0)
        estimate = float((a - b).norm() / a.norm())
        assert true / 2 < estimate < true * 2


def test_norm_and_sketch_are_of_the_unscaled_gradient() -> None:
    g = torch.tensor([3.0, 4.0])
    held = Probe(["a"], [Shard("a", g * 1024, None)], "fp16", 1024.0, held_scaled=True, sketched=True)
    plain = Probe(["a"], [Shard("a", g, None)], "fp32", None, held_scaled=False, sketched=True)
    rows = [p.finish(True, 1e-3, 1)["layers"]["a"] for p in (held, plain)]
    assert rows[0]["grad_norm"] == rows[1]["grad_norm"] == 5.0
    assert rows[0]["sketch"] == rows[1]["sketch"]
    unplaced = Probe(["a"], [Shard("a", g, None, offset=None)], "fp32", None, False, sketched=True)
    assert "sketch" not in unplaced.finish(True, 1e-3, 1)["layers"]["a"]  # where the shard starts is unknown


def test_all_zero_layers_alone_are_not_underflow_but_all_zero_everywhere_is() -> None:
    """A LoRA A matrix's gradient is exactly zero while B is zero (step 1): not fp16's doing."""
    lora_step1 = {"q.lora_A": healthy_row(zero=1.0, underflow=None), "q.lora_B": healthy_row()}
    assert PrecisionHealth(make_plan()).xray(1, seen(lora_step1)) == []
    flushed = {
        "q.lora_A": healthy_row(zero=1.0, underflow=None),
        "q.lora_B": healthy_row(zero=1.0, underflow=None),
    }
    ((event, _, fields),) = PrecisionHealth(make_plan()).xray(1, seen(flushed))
    assert event == "underflow"
    assert fields["layers"] == {"q.lora_A": 1.0, "q.lora_B": 1.0}


def test_tensorboard_gets_the_worst_layer_of_each_measure() -> None:
    from launcher.worker.trackers import precision_scalars

    fp16 = {
        "kind": "precision",
        "layers": {
            "a": {"zero": 1.0, "underflow": None, "headroom_log2": None, "lost": None, "stale": None},
            "b": {
                "zero": 0.1,
                "underflow": 0.25,
                "to_zero": 0.0,
                "near_max": 0.0,
                "headroom_log2": 3.5,
                "lost": 0.02,
                "stale": 0.5,
            },
            "c": {
                "zero": 0.0,
                "underflow": 0.75,
                "to_zero": 0.5,
                "near_max": 0.01,
                "headroom_log2": 7.0,
                "lost": 0.0,
                "stale": 0.25,
            },
        },
    }
    assert precision_scalars(fp16) == {
        "max_underflow": 0.75,
        "max_to_zero": 0.5,
        "max_near_max": 0.01,
        "min_headroom_log2": 3.5,
        "max_lost": 0.02,
        "max_stale": 0.5,
    }
    bf16 = {
        "kind": "precision",
        "layers": {"a": {"zero": 0.0, "lost": 0.1, "stale": 0.9}, "b": {"lost": None}},
    }
    assert precision_scalars(bf16) == {"max_lost": 0.1, "max_stale": 0.9}
