"""precision.dtype fp8 on the light side: the recipe keys, the layers the plan converts, its refusals,
plan.json, the dry run's section, the backend settings, the peak FLOPs and the memory estimate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launcher import cli
from launcher.errors import UserError
from launcher.plan import extras, fp8
from launcher.plan.estimate import flops, memory
from launcher.plan.estimate.setting import setting_of
from launcher.plan.fp8_layers import choose
from launcher.plan.hardware import Gpu, Hardware
from launcher.plan.resolve import Plan, resolve
from launcher.recipe import schema
from launcher.recipe.schema import validate
from launcher.recipe.shapes import linear_layers, shape_of
from tests.runs import ROOT

GiB = 2**30
CPU = Hardware(cpu_count=8)
H100 = Hardware(gpus=(Gpu(0, "NVIDIA H100 80GB HBM3", (9, 0), 80 * GiB),), cpu_count=16)
A100 = Hardware(gpus=(Gpu(0, "NVIDIA A100-SXM4-80GB", (8, 0), 80 * GiB),), cpu_count=16)
FIRST = "first layer (precision.fp8.keep_first_last)"
LAST = "last layer, the output head (precision.fp8.keep_first_last)"


def make(**sections: object) -> schema.Recipe:
    raw: dict = {
        "name": "t",
        "model": {"name": "gpt2-lm", "size": "tiny"},
        "data": {"kind": "synthetic", "seq_len": 32},
        "train": {"micro_batch_size": 4},
        "precision": {"dtype": "fp8"},
        "launch": {"device": "cpu", "nproc_per_node": 1},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return validate(raw, "test")


def layers(name: str, **model: object) -> list[tuple[str, int, int]]:
    found = linear_layers(shape_of(make(model={"name": name, "size": "tiny", **model}).model, 1024))
    assert found is not None
    return found


# --------------------------------------------------------------------------- the rule


def test_gpt2_keeps_block_0_attention_and_the_head() -> None:
    converted, kept = choose(layers("gpt2-lm", num_layers=3), True, [])
    assert kept == {
        "transformer.h.0.attn.c_attn": FIRST,
        "transformer.h.0.attn.c_proj": FIRST,
        "lm_head": LAST,
    }
    assert converted == [
        "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj",
        *(f"transformer.h.{i}.{n}" for i in (1, 2) for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")),
    ]  # fmt: skip


def test_bert_keeps_block_0_self_attention_and_the_decoder() -> None:
    converted, kept = choose(layers("bert-mlm", num_layers=2), True, [])
    first = "bert.encoder.layer.0.attention.self."
    assert kept == {first + "query": FIRST, first + "key": FIRST, first + "value": FIRST,
                    "cls.predictions.decoder": LAST}  # fmt: skip
    assert "bert.encoder.layer.0.attention.output.dense" in converted
    assert converted[-1] == "cls.predictions.transform.dense"
    assert len(converted) + len(kept) == len(layers("bert-mlm", num_layers=2))


def test_dimensions_not_multiples_of_16_stay_bf16_even_without_keep_first_last() -> None:
    converted, kept = choose([("a", 64, 64), ("b", 64, 40), ("c", 24, 64), ("d", 64, 64)], False, [])
    assert converted == ["a", "d"]
    assert kept == {"b": "in 64 x out 40: not multiples of 16", "c": "in 24 x out 64: not multiples of 16"}


def test_keep_matches_names_and_dotted_suffixes_only() -> None:
    rows = layers("gpt2-lm", num_layers=2)
    converted, kept = choose(rows, False, ["mlp.c_proj", "h.1.attn.c_attn", "proj"])
    assert {n for n, r in kept.items() if r == "precision.fp8.keep"} == {
        "transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj", "transformer.h.1.attn.c_attn",
    }  # fmt: skip
    assert "transformer.h.0.attn.c_proj" in converted  # "proj" is no dotted suffix of c_proj


def test_the_tiny_mlp_keeps_its_first_module_whole() -> None:
    # mlp.0 and mlp.3 are both in `mlp`, the first module that holds linear layers.
    assert choose(layers("tiny-mlp"), True, []) == ([], {"mlp.0": FIRST, "mlp.3": FIRST, "head": LAST})
    assert choose(layers("tiny-mlp"), False, [])[0] == ["mlp.0", "mlp.3", "head"]


# --------------------------------------------------------------------------- model.hf folders


# The worker's view, in a subprocess (unit tests import no torch): the model built on the meta device,
# its nn.Linear and Conv1D layers in module order.
_BUILT = """
import json, sys, torch, transformers
found = {}
for folder, auto in json.loads(sys.argv[1]):
    config = transformers.AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = getattr(transformers, auto).from_config(config)
    out = found[folder + " " + auto] = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            out.append((name, m.in_features, m.out_features))
        elif isinstance(m, transformers.pytorch_utils.Conv1D):
            out.append((name, m.weight.shape[0], m.nf))
print(json.dumps(found))
"""
FOLDERS = [
    ("tiny-gpt2", "causal-lm", "AutoModelForCausalLM"),
    ("tiny-llama", "causal-lm", "AutoModelForCausalLM"),
    ("tiny-bert", "masked-lm", "AutoModelForMaskedLM"),
    ("tiny-bert", "sequence-classification", "AutoModelForSequenceClassification"),
]


@pytest.fixture(scope="module")
def built_layers(tiny_models: Path) -> dict[str, list[tuple[str, int, int]]]:
    wanted = json.dumps([(str(tiny_models / folder), auto) for folder, _, auto in FOLDERS])
    done = subprocess.run([sys.executable, "-c", _BUILT, wanted], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.splitlines()[-1])
    return {key: [tuple(row) for row in rows] for key, rows in found.items()}


@pytest.mark.parametrize(("folder", "task", "auto"), FOLDERS)
def test_a_folder_s_layers_from_its_headers_are_the_built_model_s(
    tiny_models: Path, built_layers: dict[str, list[tuple[str, int, int]]], folder: str, task: str, auto: str
) -> None:
    path = tiny_models / folder
    config = json.loads((path / "config.json").read_text())
    r = make(model={"name": None, "size": "base", "hf": str(path)})
    hf = fp8.hf_dir.read(str(path), "", {})[0]
    found = fp8.layers_of(r, hf, task, 2, config["vocab_size"])
    assert found == built_layers[f"{path} {auto}"]


def _user_model(**precision: object) -> schema.Recipe:
    raw = make().model_dump()
    raw["model"] = {"name": None, "target": "mymodel:build"}
    raw["precision"]["fp8"].update(precision)
    return validate(raw, "test")


def test_a_user_model_s_layers_are_decided_in_the_worker() -> None:
    r = _user_model()
    assert fp8.layers_of(r, None, "causal-lm", None, 100) is None
    f = fp8.settings(r, "cpu", None)
    assert f["converted"] is None
    assert f["kept"] == {}
    policy = resolve(make(), CPU).precision
    text = fp8.describe(type(policy)(**{**policy.__dict__, "fp8": f}))
    assert "converted  decided in the worker" in text


# --------------------------------------------------------------------------- the policy and plan.json


def test_auto_never_picks_fp8_and_fp8_computes_in_bf16() -> None:
    assert (
        resolve(make(precision={"dtype": "auto"}, launch={"device": "cuda"}), H100).precision.dtype == "bf16"
    )
    policy = resolve(make(launch={"device": "cuda"}), H100).precision
    assert (policy.dtype, policy.compute_dtype, policy.autocast, policy.loss_scale) == (
        "fp8",
        "bf16",
        True,
        None,
    )
    assert policy.matmul_dtype == "fp8"


def test_plan_json_round_trips_the_fp8_dict() -> None:
    plan = resolve(make(precision={"fp8": {"scaling": "rowwise", "keep": ["c_fc"]}}), CPU)
    saved = json.loads(plan.to_json())["plan"]["precision"]["fp8"]
    assert saved == {
        "scaling": "rowwise", "keep_first_last": True, "keep": ["c_fc"], "converted": plan.precision.fp8["converted"],
        "kept": plan.precision.fp8["kept"], "emulated": True, "all_gather": False,
    }  # fmt: skip
    assert saved["kept"]["transformer.h.1.mlp.c_fc"] == "precision.fp8.keep"
    assert Plan.from_json(plan.to_json()).precision == plan.precision
    assert resolve(make(precision={"dtype": "bf16"}), CPU).precision.fp8 is None


@pytest.mark.parametrize(
    ("backend", "stage", "scaling", "device", "hardware", "gather"),
    [
        ("accelerate", 3, "tensorwise", "cuda", H100, True),
        ("accelerate", 2, "tensorwise", "cuda", H100, True),
        ("accelerate", 0, "tensorwise", "cuda", H100, False),
        ("accelerate", 3, "rowwise", "cuda", H100, False),
        ("accelerate", 3, "tensorwise", "cpu", CPU, False),
        ("deepspeed", 3, "tensorwise", "cuda", H100, False),
    ],
)
def test_fp8_all_gather_needs_fsdp2_tensorwise_on_gpus(
    backend: str, stage: int, scaling: str, device: str, hardware: Hardware, gather: bool
) -> None:
    r = make(
        backend=backend,
        zero={"stage": stage},
        precision={"fp8": {"scaling": scaling}},
        launch={"device": device},
    )
    f = resolve(r, hardware).precision.fp8
    assert f is not None
    assert f["all_gather"] is gather
    assert f["emulated"] is (device == "cpu")


def test_the_backends_compute_bf16_around_the_fp8_matmuls() -> None:
    ds = resolve(make(zero={"stage": 2}), CPU).backend_config
    assert ds["bf16"] == {"enabled": True}
    assert ds["fp16"] == {"enabled": False}
    acc = resolve(make(backend="accelerate", zero={"stage": 3}), CPU).backend_config
    assert acc["autocast"] == "bf16"
    assert acc["fsdp2"]["param_dtype"] == "bf16"
    assert acc["loss_scale"] is None


def test_fp8_peaks_are_twice_bf16_on_gpus_with_fp8_only() -> None:
    assert flops.peak_flops("NVIDIA H100 80GB HBM3", "fp8") == 2 * flops.peak_flops(
        "NVIDIA H100 80GB HBM3", "bf16"
    )
    assert flops.peak_flops("NVIDIA H200", "fp8") == 2 * flops.peak_flops("NVIDIA H200", "bf16")
    assert flops.peak_flops("NVIDIA A100-SXM4-80GB", "fp8") is None
    assert flops.peak_flops("cpu", "fp8") is None


# --------------------------------------------------------------------------- refusals and warnings


def _lines(recipe: schema.Recipe, hardware: Hardware = CPU) -> list[str]:
    with pytest.raises(UserError) as err:
        resolve(recipe, hardware)
    return err.value.lines


def test_a_gpu_below_compute_capability_8_9_is_refused() -> None:
    assert _lines(make(launch={"device": "cuda"}), A100) == [
        "precision.dtype: fp8 matmuls need compute capability 8.9+ (Ada, Hopper): GPU 0 (NVIDIA A100-SXM4-80GB) "
        "is 8.0; use precision.dtype=bf16"
    ]


def test_a_keep_entry_that_matches_no_layer_is_refused_with_the_nearest_name() -> None:
    assert _lines(make(precision={"fp8": {"keep": ["mlp.c_fcc", "c_attn"]}})) == [
        "precision.fp8.keep: 'mlp.c_fcc' matches no linear layer (did you mean 'mlp.c_fc'?)"
    ]


def test_a_keep_entry_is_not_checked_when_the_layers_are_unknown() -> None:
    r = _user_model(keep=["anything"])
    assert fp8.problems(r, None) == []


def test_a_deepspeed_stage_outside_fp8_deepspeed_stages_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fp8, "FP8_DEEPSPEED_STAGES", frozenset({0, 1, 2}))
    assert _lines(make(zero={"stage": 3})) == [
        "precision.dtype: fp8 is not supported by DeepSpeed ZeRO-3 (mplaunch trains fp8 there at stages 0, 1, 2); "
        "backend=accelerate (FSDP2) trains it"
    ]
    assert resolve(make(zero={"stage": 3}, backend="accelerate"), CPU).precision.fp8 is not None


def test_lora_with_fp8_is_refused_in_one_line() -> None:
    with pytest.raises(UserError) as err:
        make(model={"lora": {"rank": 4}})
    assert err.value.lines == [
        "test: precision.dtype: fp8 with LoRA (model.lora.rank > 0) is not supported: the adapters are not "
        "converted; use precision.dtype=bf16"
    ]


def test_fp8_keys_without_fp8_warn_that_they_have_no_effect() -> None:
    plan = resolve(make(precision={"dtype": "bf16", "fp8": {"scaling": "rowwise"}}), CPU)
    assert (
        "precision.fp8.scaling: has no effect with bf16 (only precision.dtype fp8 reads it)" in plan.warnings
    )
    assert not [w for w in resolve(make(), CPU).warnings if w.startswith("precision.fp8")]


def test_a_missing_torchao_is_named_with_the_fp8_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(extras, "installed", lambda module: module != "torchao")
    (line,) = extras.problems(make())
    assert line.startswith(
        "missing package of the fp8 extra: torchao (precision.dtype fp8); install it with: pip"
    )
    assert "[fp8]" in line
    assert extras.problems(make(precision={"dtype": "bf16"})) == []
    assert extras.export_problems(make()) == []  # an fp8 run exports a plain model


# --------------------------------------------------------------------------- what the user sees


def test_compact_names_group_blocks_and_siblings() -> None:
    names = [f"h.{i}.mlp.c_fc" for i in (1, 2, 3, 5)] + ["a.self.query", "a.self.key", "lm_head"]
    assert fp8.compact(names) == "h.{1..3,5}.mlp.c_fc, a.self.{query,key}, lm_head"
    assert fp8.compact(["h.1.x", "h.2.x"]) == "h.{1,2}.x"


def _dry_run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(Hardware, "probe", classmethod(lambda cls: Hardware(cpu_count=2)))
    assert cli.main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    return out[out.index("== fp8") : out.index("== memory")]


def test_the_dry_run_shows_the_fp8_section_for_gpt2_tiny(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    section = _dry_run(monkeypatch, capsys, "recipes/gpt2_tiny.yaml", "precision.dtype=fp8")
    assert section.splitlines() == [
        "== fp8 (torchao float8) ==",
        "scaling    tensorwise: one dynamic scale per tensor (amax of the whole tensor)",
        "formats    e4m3 inputs and weights, e5m2 output gradients; bf16 elsewhere; fp32 masters and reduce",
        "converted  6 of 9 linear layers: transformer.h.{0,1}.mlp.{c_fc,c_proj}, transformer.h.1.attn.{c_attn,c_proj}",
        "kept bf16  transformer.h.0.attn.{c_attn,c_proj}: first layer (precision.fp8.keep_first_last)",
        "           lm_head: in 128 x out 840: not multiples of 16",
        "emulated   yes: on the CPU torchao emulates fp8 (slow; the numerics only, no speed-up)",
        "all-gather off (needs backend=accelerate, zero.stage >= 1, tensorwise scaling, a GPU)",
    ]


def test_check_says_fp8_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(Hardware, "probe", classmethod(lambda cls: Hardware(cpu_count=2)))
    assert cli.main(["check", "recipes/bert_tiny.yaml", "precision.dtype=fp8"]) == 0
    assert (
        "fp8: tensorwise scaling, 10 linear layers converted, 4 kept in bf16; emulated on the CPU (slow, no "
        "speed-up) (--dry-run lists them)"
    ) in capsys.readouterr().out.splitlines()


# --------------------------------------------------------------------------- memory


def test_the_estimate_counts_one_layer_s_fp8_casts() -> None:
    plan = resolve(make(model={"name": "gpt2-lm", "size": "tiny", "num_layers": 2}), CPU)
    s = setting_of(plan)
    assert s.fp8 is not None
    h, inter = plan.shape.hidden_size, plan.shape.intermediate_size
    assert s.fp8.largest in ((h, inter), (inter, h))  # c_fc and c_proj are the largest converted ones
    est = memory.estimate(s, memory.Config(0))
    tokens = 4 * 32
    # The weight's cast and its transposed copy, the input and gradient casts, three fp32 scales.
    assert est.fp8_casts(4) == 2 * h * inter + tokens * (h + inter) + 12
    assert ("fp8 casts", est.fp8_casts(4)) in est.rows(4)
    bf16 = memory.estimate(setting_of(resolve(make(precision={"dtype": "bf16"}), CPU)), memory.Config(0))
    assert est.total(4) - bf16.total(4) == est.fp8_casts(4)


def test_fp8_all_gather_gathers_the_converted_weights_in_one_byte() -> None:
    on = make(backend="accelerate", zero={"stage": 2}, launch={"device": "cuda"})
    off = make(
        backend="accelerate",
        zero={"stage": 2},
        launch={"device": "cuda"},
        precision={"fp8": {"scaling": "rowwise"}},
    )
    s_on, s_off = setting_of(resolve(on, H100)), setting_of(resolve(off, H100))
    assert s_on.fp8 is not None
    assert s_on.fp8.all_gather
    assert s_off.fp8 is not None
    saved = (
        memory.estimate(s_off, memory.Config(2)).state.comm_buffers
        - memory.estimate(s_on, memory.Config(2)).state.comm_buffers
    )
    assert (
        saved == s_on.fp8.converted
    )  # stage 2 holds every weight unsharded: 1 byte less for each converted one


def test_the_shipped_tiny_recipes_plan_fp8(tmp_path: Path) -> None:
    for name in ("gpt2_tiny", "bert_tiny"):
        r = schema.load(ROOT / "recipes" / f"{name}.yaml", ["precision.dtype=fp8", f"logging.dir={tmp_path}"])
        assert yaml.safe_dump(schema.to_dict(r))  # the resolved recipe prints
        assert resolve(r, CPU).precision.fp8["converted"]
