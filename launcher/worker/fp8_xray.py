"""fp8 x-ray: per converted layer, how its fp8 casts fit the values they cast.

On fp8 runs (precision.dtype fp8, launcher.worker.fp8), at the precision x-ray's steps
(launcher.worker.xray.mode: step 1 and every logging.precision_every steps), each layer torchao
computes in fp8 is measured on the step's last micro-batch, for each of the three tensors its
matrix products cast: the input (e4m3), the weight (e4m3) and the output gradient (e5m2; e4m3
with rowwise scaling, torchao's rowwise recipe). For each: the amax and the scale torchao's cast
uses (`scale = fp8 max / amax`, its own `tensor_to_scale`), the share of elements the cast
saturates and the share of nonzero elements it flushes to zero (torchao's own `to_fp8_saturated`
on `x * scale`, the zeros counted). With rowwise scaling every row has its own scale: the amax
is the worst row's (the tensor's) and the scale the smallest. Rowwise also casts the input and
the output gradient along the other axis for the weight gradient; those casts are not measured.

Saturated: |x| * scale beyond the format's largest finite value by more than half its last digit
(448 + 16 for e4m3, 57344 + 4096 for e5m2: below that the cast rounds to the maximum anyway), or
not finite. With dynamic scaling the largest element lands exactly on the maximum, so nothing
saturates unless the amax itself is inf or NaN (then the scale is 0 or NaN and every element is
lost): a saturation share above zero means a non-finite tensor. Underflow is what dynamic scaling
cannot prevent: one outlier sets the scale, and elements more than about 2^17 (e4m3) below it
round to zero.

The hooks (a forward pre-hook for the input and weight, a forward hook that puts a hook on the
output's gradient) exist only between `arm` and `finish`, on x-ray steps: other steps pay
nothing. `finish` sums the counts of all ranks in one all_gather (amax: the largest, scale: the
smallest) and adds `fp8_<role>_<measure>` columns to the x-ray record's layer rows (`columns`).
With FSDP2's fp8 all-gather the weight arrives already cast: its scale is read from it and its
shares are not measured. launcher.analysis.fp8_range judges these columns (the `fp8_range` event).
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import nn

from launcher.worker import xray

ROLES = ("input", "weight", "grad")  # the grad is the layer's output gradient
STATS = ("amax", "scale", "elements", "nonzero", "saturated", "underflow")
_AMAX, _SCALE, _ELEMENTS, _NONZERO, _SATURATED, _UNDERFLOW = range(len(STATS))
ROWS = 1 << 14  # rows cast at once (bounds the float32 temporary)
FORMATS = {torch.float8_e4m3fn: "e4m3", torch.float8_e5m2: "e5m2"}


def saturation_limit(dtype: torch.dtype) -> float:
    """The smallest |x * scale| the cast clamps rather than rounds: the format's largest finite
    value plus half its last digit (464 for e4m3, 61440 for e5m2)."""
    info = torch.finfo(dtype)
    return info.max + 2.0 ** math.floor(math.log2(info.max)) * info.eps / 2


def cast_stats(x: torch.Tensor, dtype: torch.dtype, axis: int | None, pow2: bool) -> torch.Tensor:
    """STATS of casting `x` to fp8 as torchao's dynamic scaling does (float64, on x's device).

    Args:
        x: the high-precision tensor the layer casts (in the dtype it casts it from).
        dtype: the fp8 dtype (torch.float8_e4m3fn or torch.float8_e5m2).
        axis: the dimension reduced for rowwise (axiswise) scales; None: one scale per tensor.
        pow2: the scales are rounded down to powers of 2 (torchao's round_scales_to_power_of_2).
    """
    from torchao.float8.config import ScalingGranularity
    from torchao.float8.float8_utils import tensor_to_scale, to_fp8_saturated

    x = x.detach()
    granularity = ScalingGranularity.TENSORWISE if axis is None else ScalingGranularity.AXISWISE
    scale = tensor_to_scale(
        x, dtype, scaling_granularity=granularity, axiswise_dim=axis, round_scales_to_power_of_2=pow2
    )
    out = torch.zeros(len(STATS), dtype=torch.float64, device=x.device)
    out[_ELEMENTS] = x.numel()
    if not x.numel():
        return out
    out[_AMAX] = x.abs().max().double()
    out[_SCALE] = scale.min().double()
    limit = saturation_limit(dtype)
    rows, scales = _as_rows(x, scale, axis)
    for start in range(0, rows.shape[0], ROWS):
        part = rows[start : start + ROWS]
        s = scales[start : start + ROWS] if scales.shape[0] > 1 else scales
        scaled = part.to(torch.float32) * s
        bits = to_fp8_saturated(scaled, dtype).to(torch.float32)
        nonzero = part != 0
        out[_NONZERO:] += torch.stack(
            [nonzero.sum(), (~(scaled.abs() <= limit)).sum(), ((bits == 0) & nonzero).sum()]
        ).double()
    return out


def _as_rows(x: torch.Tensor, scale: torch.Tensor, axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` as 2-D rows and its scale shaped to broadcast over them: (1, 1) for one scale, (rows, 1)
    for a scale per row (axis -1), (1, columns) for a scale per column of a 2-D tensor (axis 0)."""
    if x.dim() < 2:
        return x.reshape(1, -1), scale.reshape(1, -1) if axis is not None else scale.reshape(1, 1)
    rows = x.reshape(-1, x.shape[-1])
    if axis is None:
        return rows, scale.reshape(1, 1)
    if axis in (-1, x.dim() - 1):
        return rows, scale.reshape(-1, 1)
    assert x.dim() == 2, x.shape
    assert axis == 0, axis
    return rows, scale.reshape(1, -1)


def converted(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers of `model` that compute in fp8 (torchao's Float8Linear and its subclasses), named
    as the precision x-ray names layers (launcher.worker.xray.layer_of)."""
    from torchao.float8.float8_linear import Float8Linear

    return [
        (xray.layer_of(f"{name}.weight"), m)
        for name, m in model.named_modules()
        if isinstance(m, Float8Linear)
    ]


def _weight_t(module: nn.Module) -> torch.Tensor:
    """The weight as the layer's matrix product takes it, (in, out)."""
    laid_out: Any = getattr(module, "weight_t", None)
    return laid_out() if callable(laid_out) else cast(torch.Tensor, module.weight).t()


class Fp8XRay:
    """The fp8 x-ray of one rank's model (see the module docstring).

    Args:
        layers: the converted layers, (name, module) in module order, the same on every rank.
    """

    def __init__(self, layers: list[tuple[str, nn.Module]]) -> None:
        self.names = [name for name, _ in layers]
        self.modules = [m for _, m in layers]
        config = self.modules[0].config if self.modules else None
        self.casts = [_cast_of(config, role) for role in ROLES] if config is not None else []
        self.counts: torch.Tensor | None = None
        self.handles: list[Any] = []

    @classmethod
    def of(cls, model: nn.Module) -> Fp8XRay | None:
        """The x-ray of `model`'s fp8 layers; None when it has none."""
        layers = converted(model)
        return cls(layers) if layers else None

    @property
    def armed(self) -> bool:
        return self.counts is not None

    def formats(self) -> dict[str, str]:
        """Each role's fp8 format name (e4m3, e5m2); roles torchao does not cast are left out."""
        return {role: FORMATS.get(c[0], str(c[0])) for role, c in zip(ROLES, self.casts, strict=True) if c}

    def arm(self) -> None:
        """Put the hooks on for this step (call before its first micro-batch)."""
        device = cast(torch.Tensor, self.modules[0].weight).device
        self.counts = torch.zeros(len(self.names), len(ROLES), len(STATS), dtype=torch.float64, device=device)
        self.counts[:, :, _SCALE] = math.inf  # "not measured", and the minimum's identity
        for i, module in enumerate(self.modules):
            self.handles.append(module.register_forward_pre_hook(self._before(i)))
            self.handles.append(module.register_forward_hook(self._after(i)))

    def _measure(self, i: int, role: int, x: torch.Tensor) -> None:
        cast = self.casts[role]
        if cast is None or self.counts is None:
            return
        dtype, axis, pow2 = cast
        with torch.no_grad():
            self.counts[i, role] = cast_stats(x, dtype, axis, pow2).to(self.counts.device)

    def _before(self, i: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            kind = x.device.type
            if torch.is_autocast_enabled(kind):  # the layer casts its input to autocast's dtype first
                x = x.to(torch.get_autocast_dtype(kind))
            self._measure(i, 0, x)
            self._weight(i, _weight_t(module))

        return hook

    def _weight(self, i: int, w: torch.Tensor) -> None:
        from torchao.float8.distributed_utils import tensor_already_casted_to_fp8

        if not tensor_already_casted_to_fp8(w):
            self._measure(i, 1, w)
            return
        # FSDP2's fp8 all-gather cast it on the shards: its scale is known, not the values before.
        assert self.counts is not None
        fp8: Any = w  # torchao's tensor has no typed accessor for its scale and data
        scale = float(fp8._scale.min())
        self.counts[i, 1] = 0.0
        self.counts[i, 1, _SCALE] = scale
        self.counts[i, 1, _AMAX] = torch.finfo(fp8._data.dtype).max / scale if scale else math.inf

    def _after(self, i: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(lambda g: self._measure(i, 2, g))

        return hook

    def finish(self, record: dict[str, Any], world: int, group: Any = None) -> dict[str, Any]:
        """Take the hooks off; the precision x-ray's `record` with every rank's fp8 counts combined
        in its layer rows (`columns`) and the casts' formats beside them (`fp8_formats`).

        A collective: every rank calls it at the same step.
        """
        for handle in self.handles:
            handle.remove()
        self.handles = []
        counts, self.counts = self.counts, None
        assert counts is not None, "finish without arm"
        return merge(record, columns(self.names, gather(counts, world, group)), self.formats())


def _cast_of(config: Any, role: str) -> tuple[torch.dtype, int | None, bool] | None:
    """(fp8 dtype, rowwise axis, power-of-2 scales) of a role's cast in the matrix product that
    uses it first (the output's for input and weight, grad_input's for the gradient); None when
    torchao does not cast it."""
    from torchao.float8.config import ScalingGranularity, ScalingType

    cast = {"input": config.cast_config_input, "weight": config.cast_config_weight}.get(
        role, config.cast_config_grad_output
    )
    if cast.scaling_type is ScalingType.DISABLED:
        return None
    rowwise = cast.scaling_granularity is ScalingGranularity.AXISWISE
    axis = (0 if role == "weight" else -1) if rowwise else None  # torchao's axiswise dims
    return cast.target_dtype, axis, bool(config.round_scales_to_power_of_2)


def gather(counts: torch.Tensor, world: int, group: Any = None) -> torch.Tensor:
    """All ranks' counts in one all_gather: summed, the amax the largest, the scale the smallest."""
    if world == 1:
        return counts.cpu()
    import torch.distributed as dist

    parts = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(parts, counts, group=group)
    stacked = torch.stack(parts)
    total = stacked.sum(0)
    total[..., _AMAX] = stacked[..., _AMAX].max(0).values
    total[..., _SCALE] = stacked[..., _SCALE].min(0).values
    return total.cpu()


def columns(names: list[str], counts: torch.Tensor) -> dict[str, dict[str, Any]]:
    """Per layer, `fp8_<role>_amax`, `_scale`, `_saturated` (share of elements) and `_underflow`
    (share of nonzero elements); None where not measured (or not finite)."""
    out: dict[str, dict[str, Any]] = {}
    for name, layer in zip(names, counts.tolist(), strict=True):
        row: dict[str, Any] = {}
        for role, c in zip(ROLES, layer, strict=True):
            measured = c[_SCALE] != math.inf
            row[f"fp8_{role}_amax"] = _finite(c[_AMAX]) if measured else None
            row[f"fp8_{role}_scale"] = _finite(c[_SCALE]) if measured else None
            row[f"fp8_{role}_saturated"] = _share(c[_SATURATED], c[_ELEMENTS])
            row[f"fp8_{role}_underflow"] = _share(c[_UNDERFLOW], c[_NONZERO])
        out[name] = row
    return out


def merge(record: dict[str, Any], fp8: dict[str, dict[str, Any]], formats: dict[str, str]) -> dict[str, Any]:
    """The x-ray record with the fp8 columns in its layer rows and the casts' formats beside them."""
    layers = {name: dict(row) for name, row in record["layers"].items()}
    for name, row in fp8.items():
        layers.setdefault(name, {}).update(row)
    return {**record, "layers": layers, "fp8_formats": formats}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _share(part: float, whole: float) -> float | None:
    return round(part / whole, 6) if whole > 0 else None
