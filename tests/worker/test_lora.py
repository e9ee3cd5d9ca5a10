"""LoRA through peft (launcher.worker.lora) and the memory planner's view of it (launcher.plan.estimate.state_bytes).

These tests build tiny transformers models from a config (nothing is downloaded), apply
adapters, run forward and backward, and merge; the planner's light mirror of the adapted
layers and their parameter count is held against what peft actually builds. The planner's own
arithmetic, without torch, is in tests/unit/test_lora.py.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from torch import nn  # noqa: E402

from launcher.plan import hf_dir  # noqa: E402
from launcher.plan.estimate import activations, state_bytes  # noqa: E402
from launcher.plan.estimate.state_bytes import LoraSetting  # noqa: E402
from launcher.recipe.schema import Lora, Model  # noqa: E402
from launcher.recipe.shapes import Shape, linear_layers  # noqa: E402
from launcher.worker import lora, models  # noqa: E402
from launcher.worker.backends import param_groups  # noqa: E402
from launcher.worker.models import ModelError  # noqa: E402

VOCAB = 500
FAMILIES = ("bert-mlm", "gpt2-lm", "tiny-mlp")


def _shape(family: str) -> Shape:
    return Shape(family, 64, 2, 2, 256, VOCAB, 64)


def _built(family: str, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return models.build(Model(name=family, size="tiny", dropout=dropout), _shape(family))  # type: ignore[arg-type]


def _llama() -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def _hf(name: str) -> nn.Module:
    """A bare transformers PreTrainedModel (no LMLoss wrapper)."""
    if name == "llama":
        return _llama()
    return _built({"bert": "bert-mlm", "gpt2": "gpt2-lm"}[name]).lm  # type: ignore[return-value]


def _batch(seed: int = 1) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 16), generator=g)
    return {"input_ids": ids, "labels": ids}


def _loss(model: nn.Module, batch: dict[str, Any]) -> Any:
    return models.loss_of(model(**batch))


def _randomize_b(model: nn.Module) -> None:
    """peft starts every B at zero (the adapted model equals the base); give B values so merging matters."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))


# --------------------------------------------------------------------------- apply


def test_rank_0_returns_the_module_unchanged() -> None:
    model = _built("bert-mlm")
    out, trainable = lora.apply(model, Lora())
    assert out is model
    assert all(p.requires_grad for p in model.parameters())
    count = sum(p.numel() for p in model.parameters())
    assert (trainable.num_trainable, trainable.num_params, trainable.target_modules) == (count, count, ())


@pytest.mark.parametrize("family", FAMILIES)
def test_only_adapters_train_and_get_gradients(family: str) -> None:
    model, trainable = lora.apply(_built(family), Lora(rank=4, dropout=0.0))
    train = {n for n, p in model.named_parameters() if p.requires_grad}
    assert train, "no parameter trains"
    assert all(".lora_A." in n or ".lora_B." in n for n in train), sorted(train)[:5]
    assert trainable.num_trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    _loss(model, _batch()).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == train
    # B starts at zero, so A's first gradient is zero too; B's is not.
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_the_optimizer_gets_the_trainable_parameters_only() -> None:
    model, trainable = lora.apply(_built("bert-mlm"), Lora(rank=4))
    groups = param_groups(model, weight_decay=0.01)
    grouped = [p for g in groups for p in g["params"]]
    assert sum(p.numel() for p in grouped) == trainable.num_trainable
    assert all(p.requires_grad for p in grouped)


def test_a_loss_wrapper_stays_and_wraps_its_lm() -> None:
    built = _built("gpt2-lm")
    with warnings.catch_warnings():
        # Every rank would print peft's warnings: GPT-2's Conv1D (weights stored (in, out)) must be
        # announced with fan_in_fan_out, and transformers' deprecation notice is silenced.
        warnings.simplefilter("error")
        model, trainable = lora.apply(built, Lora(rank=8))
    assert model is built  # LMLoss keeps its place: its forward computes the fp32 loss
    assert isinstance(model, models.LMLoss)
    assert lora.peft_model(model) is model.lm
    assert trainable.target_modules == ("c_attn",)
    assert lora.peft_model(model).peft_config["default"].fan_in_fan_out is True


@pytest.mark.parametrize(
    ("name", "targets"),
    [("bert", ("query", "value")), ("gpt2", ("c_attn",)), ("llama", ("q_proj", "v_proj"))],
)
def test_peft_defaults_for_known_model_types(name: str, targets: tuple[str, ...]) -> None:
    model, trainable = lora.apply(_hf(name), Lora(rank=8))
    assert trainable.target_modules == targets
    assert type(model).__name__ == "PeftModel"
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == set(targets)


def test_a_plain_module_gets_every_linear_layer_but_the_vocabulary_head() -> None:
    model, trainable = lora.apply(_built("tiny-mlp"), Lora(rank=4))
    assert trainable.target_modules == ("mlp.0", "mlp.3")
    adapted = {n for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"base_model.model.mlp.0", "base_model.model.mlp.3"}


def test_rank_alpha_and_dropout_reach_peft() -> None:
    model, _ = lora.apply(_built("bert-mlm"), Lora(rank=4, alpha=32.0, dropout=0.2))
    layer = next(m for m in model.modules() if hasattr(m, "lora_A"))
    assert layer.r["default"] == 4
    assert layer.scaling["default"] == pytest.approx(32.0 / 4)
    assert layer.lora_dropout["default"].p == pytest.approx(0.2)
    assert layer.lora_A["default"].weight.shape == (4, 64)


def test_named_targets_are_used() -> None:
    model, trainable = lora.apply(
        _llama(), Lora(rank=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    )
    assert trainable.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    # q, o: 64 -> 64; k, v: 64 -> 32 (2 kv heads of 16): 2 * (64 + 64) * 2 + 2 * (64 + 32) * 2 per layer
    assert trainable.num_trainable == 2 * (2 * 2 * 128 + 2 * 2 * 96)


def test_a_target_matching_nothing_names_the_linear_layers() -> None:
    with pytest.raises(ModelError) as err:
        lora.apply(_built("bert-mlm"), Lora(rank=4, target_modules=["query", "q_proj"]))
    text = str(err.value)
    assert "\n" not in text
    assert "'q_proj' matches no linear layer of BertForMaskedLM" in text
    assert "query, key, value, dense, decoder" in text


def test_a_target_matching_a_container_is_refused() -> None:
    # "attention.output" is BertSelfOutput, which holds the linear attention.output.dense.
    with pytest.raises(ModelError, match=r"'attention\.output' matches no linear layer"):
        lora.apply(_built("bert-mlm"), Lora(rank=4, target_modules=["attention.output"]))
    with pytest.raises(ModelError, match="'mlp' matches no linear layer of TinyMLP; .* mlp.0, mlp.3, head"):
        lora.apply(_built("tiny-mlp"), Lora(rank=4, target_modules=["mlp.0", "mlp"]))
    # A name that is a linear layer in one place and a container in another: peft would fail on the container.
    mixed = nn.ModuleDict(
        {"a": nn.ModuleDict({"proj": nn.Linear(4, 4)}), "proj": nn.Sequential(nn.Linear(4, 4))}
    )
    with pytest.raises(ModelError, match="'proj' also matches proj, which is not a linear layer"):
        lora.apply(mixed, Lora(rank=2, target_modules=["proj"]))


def test_a_sequence_classifier_trains_its_head_in_full() -> None:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_labels=3,
    )  # fmt: skip
    model, trainable = lora.apply(transformers.BertForSequenceClassification(config), Lora(rank=4))
    assert trainable.full_modules == ("classifier",)
    train = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("classifier" in n and "lora" not in n for n in train)
    head = 64 * 3 + 3
    assert trainable.num_trainable == head + 2 * 2 * 4 * (64 + 64)
    assert "(classifier in full)" in lora.describe(trainable)


def test_describe_is_one_line() -> None:
    t = lora.Trainable(8, 294_912, 124_734_720, ("q_proj", "v_proj"))
    assert (
        lora.describe(t) == "LoRA rank 8 on q_proj, v_proj: 294,912 of 124,734,720 parameters train (0.24 %)"
    )


# --------------------------------------------------------------------------- merge and export


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_equals_the_adapted_forward(family: str) -> None:
    plain_keys = set(_built(family).state_dict())
    model, _ = lora.apply(_built(family), Lora(rank=4, alpha=8.0))
    _randomize_b(model)
    model.eval()
    batch = _batch()
    with torch.no_grad():
        adapted = _loss(model, batch)
        base_state = {k: v.clone() for k, v in model.state_dict().items()}
        state = lora.merged_state(model)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in base_state.items())  # a copy merged
        merged = lora.merge(model)
        assert lora.peft_model(merged) is None
        assert not any("lora" in n for n, _ in merged.named_parameters())
        assert set(merged.state_dict()) == plain_keys == set(state)
        assert torch.allclose(_loss(merged, batch), adapted, atol=1e-5)
    # The merge changed the adapted weights (and only those): without their delta the loss differs.
    fresh = _built(family).eval()
    changed = {k for k, v in fresh.state_dict().items() if not torch.equal(v, state[k])}
    assert changed
    assert all(k.endswith(".weight") for k in changed)
    with torch.no_grad():
        assert not torch.allclose(_loss(fresh, batch), adapted, atol=1e-4)
        fresh.load_state_dict(state)
        assert torch.allclose(_loss(fresh, batch), adapted, atol=1e-5)


# peft's from_pretrained reads an attribute transformers 5 deprecates (launcher.worker.lora.apply silences it).
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_adapter_directory_loads_onto_the_base(tmp_path: Path) -> None:
    from peft import PeftModel

    model, _ = lora.apply(_hf("gpt2"), Lora(rank=4))
    _randomize_b(model)
    state = lora.adapter_state(model)
    assert state
    assert all("lora_" in k for k in state)
    written = lora.save_adapter(model, tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(written)
    loaded = PeftModel.from_pretrained(_hf("gpt2"), str(tmp_path)).eval()
    model.eval()
    ids = _batch()["input_ids"]
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6)


def test_merge_of_a_model_without_adapters_is_the_model() -> None:
    model = _built("tiny-mlp")
    assert lora.merge(model) is model
    with pytest.raises(ValueError, match="no LoRA adapters"):
        lora.adapter_state(model)


# --------------------------------------------------------------------------- the planner's mirror


def test_the_planners_default_targets_are_peft_s() -> None:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT

    mirrored = state_bytes.PEFT_DEFAULT_TARGETS
    assert (mirrored["bert-mlm"], mirrored["gpt2-lm"]) == (tuple(PEFT["bert"]), tuple(PEFT["gpt2"]))
    assert set(mirrored) == {"bert-mlm", "gpt2-lm"}


@pytest.mark.parametrize("family", FAMILIES)
def test_linear_layers_are_the_built_models(family: str) -> None:
    built = _built(family)
    root = built.lm if isinstance(built, models.LMLoss) else built
    found = []
    for name, m in root.named_modules():
        if isinstance(m, nn.Linear):
            found.append((name, m.in_features, m.out_features))
        elif type(m).__name__ == "Conv1D":
            found.append((name, m.weight.shape[0], m.nf))
    assert linear_layers(_shape(family)) == found


@pytest.mark.parametrize(
    ("family", "targets"),
    [
        ("bert-mlm", []),
        ("bert-mlm", ["query", "key", "value", "dense"]),
        ("bert-mlm", ["attention.output.dense", "decoder"]),
        ("gpt2-lm", []),
        ("gpt2-lm", ["c_attn", "c_proj", "c_fc"]),
        ("tiny-mlp", []),
        ("tiny-mlp", ["mlp.3", "head"]),
    ],
)
def test_the_planner_counts_the_adapters_peft_adds(family: str, targets: list[str]) -> None:
    _, trainable = lora.apply(_built(family), Lora(rank=6, target_modules=targets))
    params = state_bytes.lora_params(_shape(family), 6, targets)
    assert params is not None
    assert params.total == trainable.num_trainable


@pytest.mark.parametrize(
    ("model", "auto", "targets", "num_labels"),
    [
        ("tiny-llama", "AutoModelForCausalLM", ["q_proj", "k_proj", "v_proj", "o_proj"], None),
        ("tiny-llama", "AutoModelForCausalLM", [], None),
        ("tiny-llama", "AutoModelForSequenceClassification", [], 3),
        ("tiny-bert", "AutoModelForSequenceClassification", [], 3),
        ("tiny-bert", "AutoModelForMaskedLM", ["dense"], None),
        ("tiny-gpt2", "AutoModelForCausalLM", [], None),
    ],
)
def test_the_planner_counts_the_adapters_peft_adds_to_a_model_directory(
    tiny_models: Path, model: str, auto: str, targets: list[str], num_labels: int | None
) -> None:
    import transformers

    directory = tiny_models / model
    kwargs = {"num_labels": num_labels} if num_labels else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        built = getattr(transformers, auto).from_pretrained(directory, **kwargs)
    _, trainable = lora.apply(built, Lora(rank=4, target_modules=targets))
    hf = hf_dir.read(str(directory), "", {})[0]
    assert hf is not None
    assert hf_dir.lora_params(hf, 4, targets, num_labels) == trainable.num_trainable


def test_the_planners_model_type_targets_are_peft_s() -> None:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT

    assert {k: tuple(PEFT[k]) for k in hf_dir.PEFT_TARGETS} == hf_dir.PEFT_TARGETS


def _saved_bytes(model: nn.Module) -> int:
    """Bytes autograd keeps for backward: distinct storages saved, parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    sizes: dict[int, int] = {}

    def pack(t: Any) -> Any:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            sizes[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _loss(model, _batch())
    return sum(sizes.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_activation_delta_matches_autograd(family: str) -> None:
    # Without dropout (CPU dropout keeps fp32 masks, CUDA bool ones); fp32, as the CPU runs.
    rank, s, b = 8, 16, 2
    full = _saved_bytes(_built(family))
    adapted = _saved_bytes(lora.apply(_built(family), Lora(rank=rank, dropout=0.0))[0])
    shape = _shape(family)
    params = state_bytes.lora_params(shape, rank)
    assert params is not None
    setting = LoraSetting(rank, 0.0, params)
    predicted = activations.lora_activation_delta(shape, s, b, "fp32", "deepspeed", 0.0, setting)
    measured = adapted - full
    assert predicted < 0
    # Embedding index tensors (a few int64 rows) are not modelled.
    assert predicted == pytest.approx(measured, rel=0.02)


# --------------------------------------------------------------------------- the planner's rows


# The name model_setup calls; transformers 5 renames it activation_checkpointing_enable.
@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing_enable.*:FutureWarning")
def test_adapters_train_under_activation_checkpointing() -> None:
    # launcher.worker.model_setup turns on non-reentrant checkpointing before LoRA: the frozen embeddings
    # need no gradient, and the adapters inside the recomputed layers still get theirs.
    built = _built("bert-mlm")
    built.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model, _ = lora.apply(built, Lora(rank=4, dropout=0.0))
    _randomize_b(model)
    _loss(model, _batch()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
