"""Activation bytes of one micro-batch of a built-in model, and what LoRA changes in them: the formulas.

Activations per transformer layer: Korthikanti et al. 2022 count s*b*h*(34 +
5*a*s/h) bytes in 16-bit (I = 4h); the built-in models use SDPA, which keeps Q, K,
V, its output and an fp32 log-sum-exp instead of the s^2 score, softmax and mask
tensors (term by term in `_layer_activation_bytes`). Plus embeddings, head, and
the loss tail 3*s*b*V*e_ls at the head's backward (checked tensor by tensor
against autograd's saved tensors on CPU). Not modelled: backward temporaries of
one layer, allocator fragmentation (we keep 5 % headroom). The CUDA context
(driver, cuBLAS workspace) is taken as 500 MiB; torch.cuda.max_memory_allocated
does not see it.
"""

from __future__ import annotations

from launcher.plan.estimate.state_bytes import LoraSetting, lora_layers
from launcher.plan.precision import DTYPE_BYTES as _BYTES
from launcher.recipe.families import FAMILIES
from launcher.recipe.shapes import Shape


def activation_bytes(
    shape: Shape, seq_len: int, micro_batch_size: int, dtype: str, backend: str, dropout: float
) -> int:
    """Activation bytes of one micro-batch at the backward peak (the head's loss backward)."""
    s, b, h = seq_len, micro_batch_size, shape.hidden_size
    e = _BYTES[dtype]
    # Autocast keeps LayerNorm inputs (the residual stream) in fp32; DeepSpeed casts the whole model.
    e_ln = 4 if backend == "accelerate" else e
    mask = 1 if dropout > 0 else 0  # CUDA dropout keeps a bool mask
    # Loss tail: the saved log-softmax, its gradient and the logits' gradient, all s*b*V, in fp32:
    # every built-in model computes its loss from logits upcast to fp32 (launcher.worker.models.LMLoss).
    tail = 3 * 4 * s * b * shape.vocab_size
    family = FAMILIES[shape.family]
    if not family.transformer:  # tiny-mlp
        inter = shape.intermediate_size
        return s * b * (2 * h * e + 2 * inter * e + inter * mask) + tail
    layers = shape.num_layers * _layer_activation_bytes(shape, s, b, e, e_ln, mask)
    if family.head_transform:  # BERT
        # Embedding LayerNorm input and dropout; head: dense, GELU, LayerNorm and decoder inputs.
        return layers + s * b * h * (e_ln + mask + 3 * e + e_ln) + tail
    # GPT-2: embedding dropout; ln_f input and lm_head input.
    return layers + s * b * h * (mask + e_ln + e) + tail


def lora_activation_delta(
    shape: Shape,
    seq_len: int,
    micro_batch_size: int,
    dtype: str,
    backend: str,
    dropout: float,
    lora: LoraSetting,
) -> int:
    """What LoRA changes in `activation_bytes` (usually less: negative), for a built-in model.

    Autograd keeps a linear layer's input only to compute its weight's gradient, so a frozen layer
    keeps none; an adapter keeps its own input (the output of its dropout, with the dropout's mask,
    when model.lora.dropout > 0; else the layer's input itself) and its rank-r intermediate.
    Nothing before the first adapter needs a gradient: the embeddings keep nothing (their
    LayerNorm input and dropout mask; GPT-2's first ln_1 input too). Inputs that another operation
    keeps anyway (the attention output projection's: SDPA keeps its output) stay counted. Checked
    against autograd's saved tensors on CPU (tests/e2e/test_lora.py).
    """
    layers = lora_layers(shape, lora.target_modules)
    if not layers:
        return 0
    sb, e, r = seq_len * micro_batch_size, _BYTES[dtype], lora.rank
    e_ln = 4 if backend == "accelerate" else e
    mask = 1 if dropout > 0 else 0
    adapted = {name for name, _, _ in layers}
    delta = 0
    for readers, width in _weight_only_inputs(shape):
        # The base layers keep this input no longer; an adapter without dropout reads (keeps) it.
        if lora.dropout > 0 or not adapted.intersection(readers):
            delta -= sb * width * e
    lora_mask = 1 if lora.dropout > 0 else 0
    for _, fan_in, _ in layers:
        delta += sb * r * e + (sb * fan_in * (e + lora_mask) if lora.dropout > 0 else 0)
    h, family = shape.hidden_size, FAMILIES[shape.family]
    if family.head_transform:  # BERT
        delta -= sb * h * (e_ln + mask)  # embedding LayerNorm input and dropout mask
    elif family.transformer:  # GPT-2
        delta -= sb * h * (mask + e_ln)  # embedding dropout mask, the first block's ln_1 input
    return delta


def _weight_only_inputs(shape: Shape) -> list[tuple[tuple[str, ...], int]]:
    """(linear layers reading it, width) of each input kept only for those layers' weight gradients."""
    h, inter, family = shape.hidden_size, shape.intermediate_size, FAMILIES[shape.family]
    if not family.transformer:  # tiny-mlp
        return [(("mlp.0",), h), (("mlp.3",), inter), (("head",), h)]
    out: list[tuple[tuple[str, ...], int]] = []
    for i in range(shape.num_layers):
        p = f"{family.layer_prefix}{i}."
        if family.head_transform:  # BERT
            qkv = tuple(p + f"attention.self.{n}" for n in ("query", "key", "value"))
            out += [(qkv, h), ((p + "intermediate.dense",), h), ((p + "output.dense",), inter)]
        else:  # GPT-2
            out += [((p + "attn.c_attn",), h), ((p + "mlp.c_fc",), h), ((p + "mlp.c_proj",), inter)]
    if family.head_transform:
        return [*out, (("cls.predictions.transform.dense",), h), (("cls.predictions.decoder",), h)]
    return [*out, (("lm_head",), h)]


def _layer_activation_bytes(shape: Shape, s: int, b: int, e: int, e_ln: int, mask: int) -> int:
    """Korthikanti et al.'s 34*s*b*h (16-bit, I = 4h), with SDPA in place of the 5*a*s^2*b terms."""
    h, a, inter = shape.hidden_size, shape.num_heads, shape.intermediate_size
    gelu_extra = FAMILIES[shape.family].gelu_saved
    sbh = s * b * h
    attention = (
        sbh * e  # QKV projection input
        + 3 * sbh * e  # Q, K, V, kept by SDPA
        + sbh * e  # SDPA output = output projection input (a view)
        + a * s * b * 4  # SDPA's fp32 log-sum-exp; no s^2 scores, softmax or dropout mask
        + sbh * mask  # dropout after the projection
        + sbh * e_ln  # residual sum into LayerNorm
    )
    mlp = (
        sbh * e  # first linear input
        + s * b * inter * e * (2 + gelu_extra)  # GELU input, second linear input
        + sbh * mask
        + sbh * e_ln  # residual sum into LayerNorm
    )
    return attention + mlp
