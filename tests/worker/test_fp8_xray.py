"""The fp8 x-ray's statistics against torchao's own casts and hand-computed values; its hooks only on
x-ray steps; its judge (the fp8_range event and its remedy) on synthetic records."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from launcher.analysis.fp8_plot import fp8_xrays, plot_fp8
from launcher.analysis.fp8_range import Fp8Judge, keep_name, out_of_range
from launcher.rundir.metrics_log import Metrics
from launcher.worker import fp8_xray
from launcher.worker.fp8 import convert, torchao_float8
from launcher.worker.fp8_xray import STATS, Fp8XRay, cast_stats, saturation_limit

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def stats(
    x: list[float] | torch.Tensor, dtype: torch.dtype = E4M3, axis: int | None = None, pow2: bool = False
) -> dict[str, float]:
    t = x if isinstance(x, torch.Tensor) else torch.tensor(x)
    return dict(zip(STATS, cast_stats(t, dtype, axis, pow2).tolist(), strict=True))


def test_a_tiny_tensor_by_hand() -> None:
    # amax 896: scale 448 / 896 = 0.5; 1 -> 0.5 (e4m3 holds it), 1e-9 -> 5e-10, far below e4m3's
    # smallest subnormal 2^-9: rounds to zero. Nothing saturates: 896 * 0.5 is exactly 448.
    assert stats([448 * 2, 1, 1e-9]) == {
        "amax": 896.0, "scale": 0.5, "elements": 3, "nonzero": 3, "saturated": 0, "underflow": 1,
    }  # fmt: skip
    # Exact zeros are not underflow; e5m2 reaches down to 2^-16, so 1e-6 at scale 57344 / 896 = 64 stays.
    assert stats([896, 0, 1e-6], E5M2) == {
        "amax": 896.0, "scale": 64.0, "elements": 3, "nonzero": 2, "saturated": 0, "underflow": 0,
    }  # fmt: skip


def test_an_infinite_amax_saturates_and_flushes_everything() -> None:
    # scale 448 / inf = 0: inf * 0 is NaN (saturated: not finite), every finite element becomes 0.
    s = stats([float("inf"), 896, 1])
    assert (s["amax"], s["scale"], s["saturated"], s["underflow"]) == (math.inf, 0.0, 1, 2)


def test_the_saturation_limit_is_where_the_cast_clamps_instead_of_rounding() -> None:
    assert saturation_limit(E4M3) == 448 + 16  # e4m3's last step below 448 is 32
    assert saturation_limit(E5M2) == 57344 + 4096  # e5m2's is 8192
    x = torch.tensor([460.0, 470.0, -1000.0])  # 460 rounds to 448 anyway; 470 and -1000 are clamped
    assert ((x.abs() > saturation_limit(E4M3)).sum()) == 2


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
@pytest.mark.parametrize(("axis", "pow2"), [(None, False), (-1, True), (0, True)])
def test_the_counts_are_what_torchaos_own_cast_does(dtype: torch.dtype, axis: int | None, pow2: bool) -> None:
    """torchao's hp_tensor_to_float8_dynamic casts the tensor; its zeros and its scale are the truth."""
    torchao_float8()
    from torchao.float8.config import ScalingGranularity
    from torchao.float8.float8_scaling_utils import hp_tensor_to_float8_dynamic
    from torchao.float8.float8_training_tensor import LinearMMConfig

    gen = torch.Generator().manual_seed(0)
    # A wide spread of magnitudes (2^-40 to 2^10) so that a good share underflows, and exact zeros.
    x = torch.randn(64, 48, generator=gen) * torch.exp2(
        torch.randint(-40, 10, (64, 48), generator=gen).float()
    )
    x[::7, ::5] = 0
    x = x.to(torch.bfloat16)
    granularity = ScalingGranularity.TENSORWISE if axis is None else ScalingGranularity.AXISWISE
    cast = hp_tensor_to_float8_dynamic(
        x, dtype, LinearMMConfig(), scaling_granularity=granularity, axiswise_dim=axis,
        round_scales_to_power_of_2=pow2,
    )  # fmt: skip
    zeros = ((cast._data.float() == 0) & (x != 0)).sum().item()
    s = stats(x, dtype, axis, pow2)
    assert s["underflow"] == zeros > 0
    assert s["nonzero"] == (x != 0).sum().item()
    assert s["scale"] == cast._scale.min().item()
    assert s["amax"] == x.abs().max().item()
    assert s["saturated"] == 0  # dynamic scaling: the amax lands on the maximum


def test_rows_are_cast_in_chunks_with_their_own_scales(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(37, 16, generator=gen) * torch.exp2(
        torch.randint(-30, 5, (37, 16), generator=gen).float()
    )
    whole = stats(x, E4M3, -1, True)
    monkeypatch.setattr(fp8_xray, "ROWS", 5)
    assert stats(x, E4M3, -1, True) == whole
    assert stats(x.reshape(37, 2, 8), E4M3, -1, True) != whole  # other rows, other scales


# ---------------------------------------------------------------- the hooks on a converted model


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inlet = nn.Sequential(nn.Linear(16, 32))
        self.block = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.inlet(x)))


def converted_net(scaling: str = "tensorwise") -> Net:
    torch.manual_seed(0)
    net = Net()
    done, kept = convert(net, {"scaling": scaling, "keep_first_last": True, "keep": []}, "cpu")
    assert done == ["block.0", "block.2"]
    assert set(kept) == {"inlet.0", "head"}
    return net


def step(net: Net, x: torch.Tensor) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(x)
    y.float().square().mean().backward()


def test_the_hooks_measure_the_last_micro_batch_of_x_ray_steps_only() -> None:
    net = converted_net()
    xr = Fp8XRay.of(net)
    assert xr is not None
    assert xr.names == ["block.0", "block.2"]
    assert xr.formats() == {"input": "e4m3", "weight": "e4m3", "grad": "e5m2"}
    step(net, torch.randn(4, 16))  # not armed: no hook, nothing kept
    assert not xr.armed
    assert not net.block[0]._forward_pre_hooks
    assert not net.block[0]._forward_hooks
    xr.arm()
    step(net, torch.randn(4, 16) * 1000)  # the first micro-batch: overwritten by the last
    last = torch.randn(4, 16)
    captured: dict[str, torch.Tensor] = {}
    net.block[0].register_forward_pre_hook(lambda m, a: captured.setdefault("input", a[0].detach()))
    step(net, last)
    record = xr.finish({"kind": "precision", "layers": {"block.0": {"elements": 1}}}, world=1)
    assert not xr.armed
    assert not net.block[2]._forward_pre_hooks
    row = record["layers"]["block.0"]
    assert row["elements"] == 1  # the x-ray's own columns are kept
    assert row["fp8_input_amax"] == captured["input"].to(torch.bfloat16).abs().max().item()
    assert row["fp8_input_scale"] == pytest.approx(448 / row["fp8_input_amax"], rel=1e-6)
    assert row["fp8_weight_amax"] == net.block[0].weight.abs().max().item()
    assert row["fp8_grad_amax"] > 0
    assert row["fp8_grad_saturated"] == 0
    assert record["fp8_formats"]["grad"] == "e5m2"
    assert set(record["layers"]) == {"block.0", "block.2"}


def test_rowwise_scaling_reports_the_worst_rows_scale() -> None:
    net = converted_net("rowwise")
    xr = Fp8XRay.of(net)
    assert xr is not None
    assert xr.formats()["grad"] == "e4m3"
    xr.arm()
    x = torch.randn(4, 16)
    step(net, x)
    row = xr.finish({"layers": {}}, world=1)["layers"]["block.0"]
    scale = row["fp8_input_scale"]
    assert math.log2(scale) == int(math.log2(scale))  # rowwise rounds scales down to powers of 2
    assert scale <= 448 / row["fp8_input_amax"]


def test_a_model_without_fp8_layers_has_no_fp8_x_ray() -> None:
    assert Fp8XRay.of(Net()) is None


# ---------------------------------------------------------------- the judge


def rows(**shares: dict[str, Any]) -> dict[str, Any]:
    base = {f"fp8_{r}_{m}": 0.0 for r in ("input", "weight", "grad") for m in ("saturated", "underflow")}
    return {"layers": {name: {**base, **row} for name, row in shares.items()}, "lr": 1e-3}


def test_healthy_shares_raise_nothing_and_each_layer_is_named_once() -> None:
    judge = Fp8Judge([], "tensorwise")
    healthy = {"fp8_input_underflow": 5e-5, "fp8_weight_underflow": 4.6e-5}
    assert judge.judge(1, rows(**{"lm.transformer.h.1.mlp.c_fc": healthy})) == []
    seen = rows(**{
        "lm.transformer.h.1.mlp.c_fc": {"fp8_input_underflow": 0.97},
        "lm.transformer.h.11.mlp.c_fc": healthy,
    })  # fmt: skip
    ((event, message, fields),) = judge.judge(5, seen)
    assert event == "fp8_range"
    assert fields["layers"] == {"lm.transformer.h.1.mlp.c_fc": {"input_underflow": 0.97}}
    assert fields["override"] == "precision.fp8.keep=[h.1.mlp.c_fc]"
    assert "'precision.fp8.keep=[h.1.mlp.c_fc]'" in message
    assert "precision.fp8.scaling=rowwise" in message
    assert "input 97% to zero in e4m3" in message
    assert judge.judge(10, seen) == []  # already named


def test_saturation_is_judged_and_the_recipes_own_keep_entries_stay_in_the_override() -> None:
    judge = Fp8Judge(["attn.c_attn"], "rowwise")
    ((_, message, fields),) = judge.judge(1, rows(**{"lm.head": {"fp8_grad_saturated": 0.001}}))
    assert fields["override"] == "precision.fp8.keep=[attn.c_attn, head]"
    assert "inf or NaN" in message
    assert "rowwise" not in message.split("Fix:")[1]


def test_keep_names_are_the_shortest_unambiguous_suffix() -> None:
    names = [
        "lm.bert.encoder.layer.0.output.dense",
        "lm.bert.encoder.layer.0.attention.output.dense",
        "lm.x.dense2",
    ]
    assert keep_name(names[0], names) == "layer.0.output.dense"  # "output.dense" also names the attention's
    assert keep_name(names[1], names) == "attention.output.dense"
    assert keep_name("block.mid", ["block.mid", "block.out"]) == "mid"
    assert out_of_range({"a": {"fp8_input_underflow": 0.0099}, "b": {"fp8_weight_underflow": 0.01}}) == {
        "b": {"weight_underflow": 0.01}
    }


# ---------------------------------------------------------------- report's heatmap


def test_the_fp8_heatmap_is_drawn_from_the_records_that_hold_fp8_columns(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    layer = {"fp8_input_underflow": 0.5, "fp8_weight_underflow": 0.0, "fp8_grad_underflow": None}
    precision = tuple(
        {
            "kind": "precision",
            "step": s,
            "layers": {"block.mid": {**layer, "fp8_grad_saturated": 0.1 * (s == 5)}},
        }
        for s in (1, 5)
    )
    plain = {"kind": "precision", "step": 1, "layers": {"embed": {"zero": 0.0}}}
    assert fp8_xrays(Metrics((), (), (), (), 0, (plain,))) == []
    event = {"kind": "event", "step": 1, "event": "fp8_range"}
    metrics = Metrics(({"kind": "train", "step": 6, "loss": 1.0},), (), (event,), (), 0, (plain, *precision))
    assert [r["step"] for r in fp8_xrays(metrics)] == [1, 5]
    path = plot_fp8(metrics, tmp_path / "fp8.png", "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
