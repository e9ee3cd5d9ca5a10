"""The recipe schema: strict validation, messages, overrides, extends chains, cross-field rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from launcher.errors import UserError
from launcher.recipe import files as recipe_files
from launcher.recipe import reference as recipe_reference
from launcher.recipe import schema as recipe_mod
from launcher.recipe.rules import check_rules
from launcher.recipe.schema import Recipe, load

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MINIMAL = {"name": "t", "model": {"name": "tiny-mlp"}, "train": {"micro_batch_size": 2, "max_steps": 10}}


def write(tmp_path: Path, body: dict | str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(body if isinstance(body, str) else yaml.safe_dump(body))
    return path


def merged(**sections: object) -> dict:
    return recipe_files.deep_merge(MINIMAL, sections)


def problems(tmp_path: Path, body: dict | str, overrides: tuple[str, ...] = ()) -> list[str]:
    path = write(tmp_path, body)
    with pytest.raises(UserError) as info:
        load(path, overrides)
    prefix = f"{path}: "
    return [line.removeprefix(prefix) for line in info.value.lines]


def test_minimal_recipe_loads_with_defaults(tmp_path: Path) -> None:
    r = load(write(tmp_path, MINIMAL))
    assert r.name == "t"
    assert r.precision.loss_scale.initial == 2.0**16
    assert (r.precision.loss_scale.window, r.precision.loss_scale.hysteresis) == (1000, 2)
    assert r.precision.loss_scale.consecutive_hysteresis is False
    assert r.precision.loss_scale.min == 1.0
    assert r.source == str(tmp_path / "r.yaml")


def test_name_defaults_to_the_file_stem(tmp_path: Path) -> None:
    body = {k: v for k, v in MINIMAL.items() if k != "name"}
    assert load(write(tmp_path, body, "my-run.yaml")).name == "my-run"


# --------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    ("body", "line"),
    [
        (
            merged(train={"micro_bach_size": 8}),
            "train.micro_bach_size: unknown key; did you mean train.micro_batch_size?",
        ),
        (merged(trian={}), "trian: unknown key; did you mean train?"),
        (
            merged(precision={"loss_scale": {"windw": 5}}),
            "precision.loss_scale.windw: unknown key; did you mean precision.loss_scale.window?",
        ),
        (merged(train={"lr": 0.1}), "train.lr: unknown key; did you mean optimizer.lr?"),
        (
            merged(zero={"zzz": 1}),
            "zero.zzz: unknown key; valid keys here: stage, offload_optimizer, offload_params",
        ),
        (merged(train={"int": 3}), "train.int: unknown key; valid keys here: "),
        (merged(**{"1": {}}), "1: unknown key; valid keys here: name, model, data"),
    ],
)
def test_unknown_key_names_full_path_and_nearest_key(tmp_path: Path, body: dict, line: str) -> None:
    (got,) = problems(tmp_path, body)
    assert got.startswith(line)


def test_non_string_keys_are_unknown_keys(tmp_path: Path) -> None:
    got = problems(tmp_path, "name: t\ntrain: {1: 2, null: 3}\n")
    assert got == [
        "train.1: unknown key (keys are names, not numbers or null)",
        "train.null: unknown key (keys are names, not numbers or null)",
    ]


def test_unknown_key_in_override_is_attributed_to_the_override(tmp_path: Path) -> None:
    got = problems(tmp_path, MINIMAL, ("train.micro_bach_size=8",))
    assert got == ["override train.micro_bach_size: unknown key; did you mean train.micro_batch_size?"]


def test_unknown_section_in_override_names_the_override(tmp_path: Path) -> None:
    assert problems(tmp_path, MINIMAL, ("trian.max_steps=3",)) == [
        "override trian.max_steps: trian: unknown key; did you mean train?"
    ]


# --------------------------------------------------------------------------- wrong types and values


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("train.micro_batch_size='8'", "train.micro_batch_size: expected an integer, got '8' (a string)"),
        ("train.max_steps=2.5", "train.max_steps: expected an integer, got 2.5"),
        ("train.max_steps=true", "train.max_steps: expected an integer, got true"),
        ("train.max_steps=0", "train.max_steps: expected a value >= 1, got 0"),
        (
            "zero.stage=yes",
            "zero.stage: expected one of 0, 1, 2, 3, got true (YAML reads yes/no/on/off as true/false)",
        ),
        ("zero.stage='3'", "zero.stage: expected one of 0, 1, 2, 3, got '3' (a string)"),
        ("zero.stage=4", "zero.stage: expected one of 0, 1, 2, 3, got 4"),
        (
            "precision.dtype=fp4",
            "precision.dtype: expected one of 'auto', 'fp32', 'fp16', 'bf16', 'fp8', got 'fp4' (a string)",
        ),
        (
            "launch.nproc_per_node='8'",
            "launch.nproc_per_node: expected one of 'auto', or an integer, got '8' (a string)",
        ),
        ("launch.nproc_per_node=0", "launch.nproc_per_node: expected one of 'auto', or a value >= 1, got 0"),
        ("optimizer.lr=abc", "optimizer.lr: expected a number, got 'abc' (a string)"),
        ("optimizer.lr=.inf", "optimizer.lr: expected a finite number, got inf"),
        (
            "precision.loss_scale.initial=.nan",
            "precision.loss_scale.initial: expected a finite number, got nan",
        ),
        ("optimizer.betas=[0.9]", "optimizer.betas: too few items (item 1 is missing)"),
        ("optimizer.betas=[0.9, 0.99, 0.9]", "optimizer.betas: expected 2 items, got a list of 3"),
        ("optimizer.betas=[0.9, 1.0]", "optimizer.betas[1]: expected a value < 1.0, got 1.0"),
        ("zero.offload_params=1", "zero.offload_params: expected true or false, got 1"),
        ("name=[a]", "name: expected a string, got a list of 1"),
        ("name=bad/name", "name: expected text matching"),
        ("launch.master_port=80", "launch.master_port: expected a value >= 1024, got 80"),
        ("model.target=nocolon", "model.target: expected text matching"),
        ("data.paths=corpus.txt", "data.paths: expected a list, got 'corpus.txt' (a string)"),
        ("slurm.extra_sbatch=[1]", "slurm.extra_sbatch[0]: expected a string, got 1"),
        ("slurm.env={A: 1}", "slurm.env.A: expected a string, got 1"),
        ("model.kwargs={1: 2}", "model.kwargs: key 1 is not a string"),
        ("train=5", "train: expected a section (mapping of keys), got 5"),
        (
            "precision.loss_scale=[1]",
            "precision.loss_scale: expected a section (mapping of keys), got a list of 1",
        ),
    ],
)
def test_wrong_type_names_path_expected_and_given(tmp_path: Path, override: str, line: str) -> None:
    (got,) = problems(tmp_path, MINIMAL, (override,))
    key = override.split("=", 1)[0]
    # the override's own key reads "override KEY: ...", a key below it "override KEY: SUBKEY: ..."
    body = (
        got.removeprefix(f"override {key}: ")
        if not line.startswith(key + ":")
        else got.removeprefix("override ")
    )
    assert body.startswith(line), got


def test_wrong_types_in_the_file_are_attributed_to_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, merged(train={"micro_batch_size": "8"}))
    with pytest.raises(UserError) as info:
        load(path)
    assert info.value.lines == [f"{path}: train.micro_batch_size: expected an integer, got '8' (a string)"]


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(UserError) as info:
        load(FIXTURES / "many_errors.yaml")
    keys = [line.split(": ")[1] for line in info.value.lines]
    assert sorted(keys) == sorted(
        [
            "model.hiden_size",
            "train.micro_bach_size",
            "train.max_steps",
            "train.grad_clip",
            "precision.dtype",
            "precision.loss_scale.windw",
            "zero.stage",
            "launch",
        ]
    )
    assert all("\n" not in line for line in info.value.lines)


def test_every_broken_rule_is_reported_at_once() -> None:
    with pytest.raises(UserError) as info:
        load(FIXTURES / "many_rules.yaml")
    keys = [line.split(": ")[1] for line in info.value.lines]
    assert keys == [
        "zero.offload_optimizer",
        "zero.offload_params",
        "data.paths",
        "precision.loss_scale.initial",
    ]


# --------------------------------------------------------------------------- YAML reading


def test_exponent_floats_are_numbers(tmp_path: Path) -> None:
    r = load(
        write(
            tmp_path,
            "name: t\nmodel: {name: tiny-mlp}\ntrain: {micro_batch_size: 1}\noptimizer: {lr: 3e-4}\n",
        )
    )
    assert r.optimizer.lr == pytest.approx(3e-4)
    assert load(write(tmp_path, MINIMAL), ["optimizer.lr=1E-3"]).optimizer.lr == pytest.approx(1e-3)


def test_times_are_not_base_60_numbers(tmp_path: Path) -> None:
    r = load(
        write(
            tmp_path,
            "name: t\nmodel: {name: tiny-mlp}\ntrain: {micro_batch_size: 1}\nslurm: {time: 12:00:00}\n",
        )
    )
    assert r.slurm.time == "12:00:00"


def test_duplicate_keys_are_refused_with_their_line(tmp_path: Path) -> None:
    (got,) = problems(tmp_path, "name: t\ntrain: {micro_batch_size: 2}\ntrain: {max_steps: 3}\n")
    assert got == "not valid YAML (duplicate key 'train' at line 3, column 1)"


def test_invalid_yaml_names_line_and_column(tmp_path: Path) -> None:
    (got,) = problems(tmp_path, "name: t\ntrain: [1, 2\n")
    assert got.startswith("not valid YAML (")
    assert "line 3" in got


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "list"), ("42\n", "int"), ("just text\n", "str")])
def test_a_recipe_must_be_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    assert problems(tmp_path, text) == [f"a recipe is a mapping of sections, got {kind}"]


def test_empty_sections_mean_defaults(tmp_path: Path) -> None:
    text = "name: t\nmodel: {name: tiny-mlp}\ntrain: {micro_batch_size: 1}\nslurm:\n  # partition: gpu\nprecision:\n  loss_scale:\n"
    r = load(write(tmp_path, text))
    assert r.slurm.partition is None
    assert r.precision.loss_scale.window == 1000


def test_missing_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="recipe file not found"):
        load(tmp_path / "nope.yaml")


# --------------------------------------------------------------------------- overrides


@pytest.mark.parametrize(
    ("override", "path", "value"),
    [
        ("precision.dtype=bf16", ("precision", "dtype"), "bf16"),
        ("zero.stage=3", ("zero", "stage"), 3),
        ("train.max_steps=20", ("train", "max_steps"), 20),
        ("train.grad_clip=0.5", ("train", "grad_clip"), 0.5),
        ("train.compile=true", ("train", "compile"), True),
        ("launch.nproc_per_node=auto", ("launch", "nproc_per_node"), "auto"),
        ("launch.master_port=null", ("launch", "master_port"), None),
        ("optimizer.betas=[0.8, 0.9]", ("optimizer", "betas"), (0.8, 0.9)),
        ("slurm.env={OMP_NUM_THREADS: '4'}", ("slurm", "env"), {"OMP_NUM_THREADS": "4"}),
        ("slurm.time='1:00:00'", ("slurm", "time"), "1:00:00"),
        ("slurm.time=1:00:00", ("slurm", "time"), "1:00:00"),  # YAML 1.1 would read 3600
        ("optimizer.eps=1e-6", ("optimizer", "eps"), 1e-6),
    ],
)
def test_overrides_use_yaml_scalar_semantics(
    tmp_path: Path, override: str, path: tuple[str, str], value: object
) -> None:
    r = load(write(tmp_path, MINIMAL), [override])
    assert getattr(getattr(r, path[0]), path[1]) == value


def test_later_override_wins_and_file_values_survive(tmp_path: Path) -> None:
    r = load(write(tmp_path, merged(train={"eval_every": 5})), ["train.max_steps=7", "train.max_steps=9"])
    assert (r.train.max_steps, r.train.eval_every, r.train.micro_batch_size) == (9, 5, 2)


def test_override_creates_missing_sections(tmp_path: Path) -> None:
    assert (
        load(write(tmp_path, MINIMAL), ["precision.loss_scale.window=50"]).precision.loss_scale.window == 50
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "train.max_steps",
            "override 'train.max_steps': expected dotted.key=value (hint: e.g. train.max_steps=20)",
        ),
        ("train..x=1", "override 'train..x=1': expected dotted.key=value"),
        ("-x=1", "override '-x=1': expected dotted.key=value"),
        ("train.max_steps=[1", "override train.max_steps: value '[1' is not valid YAML"),
        ("name.x=1", "override name.x: name is a value, not a section"),
    ],
)
def test_malformed_overrides(tmp_path: Path, override: str, message: str) -> None:
    (got,) = problems(tmp_path, MINIMAL, (override,))
    assert got.startswith(message)


# --------------------------------------------------------------------------- extends


def test_extends_deep_merges_and_rebases_relative_paths() -> None:
    r = load(FIXTURES / "nested" / "grandchild.yaml")
    assert r.name == "nested-grandchild"
    assert r.train.max_steps == 20  # grandchild
    assert r.zero.stage == 3  # child
    assert (r.precision.loss_scale.window, r.precision.loss_scale.hysteresis) == (500, 5)  # base + child
    assert r.train.micro_batch_size == 4
    assert r.data.seq_len == 32
    # the base names data/corpus.txt next to itself; from the grandchild that is base/data/corpus.txt
    assert r.data.paths == [str(Path("base") / "data" / "corpus.txt")]
    assert (Path(r.source).parent / r.data.paths[0]).is_file()


def test_lists_from_a_child_replace_the_base_list(tmp_path: Path) -> None:
    base = write(tmp_path, merged(slurm={"setup": ["a", "b"]}), "base.yaml")
    child = write(tmp_path, {"extends": base.name, "slurm": {"setup": ["c"]}}, "child.yaml")
    assert load(child).slurm.setup == ["c"]


def test_extends_cycle_is_detected() -> None:
    with pytest.raises(UserError) as info:
        load(FIXTURES / "cycle_a.yaml")
    (line,) = info.value.lines
    assert "extends cycle" in line
    assert line.count("cycle_a.yaml") == 3
    assert "cycle_b.yaml" in line


def test_extends_itself_is_a_cycle(tmp_path: Path) -> None:
    path = write(tmp_path, {"extends": "r.yaml", "name": "t"})
    with pytest.raises(UserError, match="extends cycle"):
        load(path)


@pytest.mark.parametrize(
    ("extends", "message"),
    [
        ("missing.yaml", "extends: base recipe not found"),
        (5, "extends: expected the path of a base recipe, got 5"),
    ],
)
def test_bad_extends(tmp_path: Path, extends: object, message: str) -> None:
    (got,) = problems(tmp_path, {"extends": extends, **MINIMAL})
    assert got.startswith(message)


def test_override_applies_after_the_extends_chain() -> None:
    r = load(FIXTURES / "nested" / "child.yaml", ["zero.stage=1"])
    assert r.zero.stage == 1


# --------------------------------------------------------------------------- cross-field rules


@pytest.mark.parametrize(
    ("sections", "line"),
    [
        (
            {"zero": {"stage": 0, "offload_optimizer": True}},
            "zero.offload_optimizer: needs zero.stage >= 1, got stage 0",
        ),
        (
            {"zero": {"stage": 2, "offload_params": True}},
            "zero.offload_params: needs zero.stage 3, got stage 2",
        ),
        (
            {"backend": "accelerate", "zero": {"stage": 2, "offload_optimizer": True}},
            "zero.offload_optimizer: FSDP2 under accelerate offloads parameters, gradients and optimizer "
            "state together (CPUOffloadPolicy); set zero.offload_params=true too",
        ),
        (
            {"model": {"name": None}},
            "model: set model.name to a built-in model, model.hf to a Hugging Face model, or model.target",
        ),
        ({"model": {"kwargs": {"a": 1}}}, "model.kwargs: only used with model.target"),
        (
            {"model": {"name": "bert-mlm", "num_heads": 5}},
            "model.num_heads: 5 does not divide model.hidden_size 768 (the base preset's",
        ),
        (
            {"model": {"name": "bert-mlm", "hidden_size": 100, "num_heads": 3}},
            "model.num_heads: 3 does not divide",
        ),
        (
            {"model": {"name": "bert-mlm"}, "data": {"seq_len": 1024}},
            "data.seq_len: 1024 is longer than model.max_position_embeddings 512",
        ),
        (
            {"model": {"name": "gpt2-lm", "max_position_embeddings": 64}, "data": {"seq_len": 128}},
            "data.seq_len: 128 is longer than model.max_position_embeddings 64",
        ),
        ({"data": {"paths": ["x.txt"]}}, "data.paths: only used with a data.kind other than synthetic"),
        (
            {"model": {"name": "bert-mlm"}, "data": {"kind": "jsonl"}},
            "data.paths: data.kind jsonl needs at least one file",
        ),
        (
            {"model": {"name": "bert-mlm"}, "data": {"kind": "text", "paths": ["nope.txt"]}},
            "data.paths[0]: file not found",
        ),
        ({"data": {"tokenizer": "no-such-dir"}}, "data.tokenizer: directory not found"),
        (
            {"data": {"kind": "text", "paths": ["corpus.txt"]}},
            "data.kind: the tiny-mlp model trains on synthetic data only",
        ),
        (
            {"precision": {"loss_scale": {"initial": 1000.0}}},
            "precision.loss_scale.initial: expected a power of two for a dynamic scale, got 1000",
        ),
        (
            {"precision": {"loss_scale": {"initial": 4.0, "min": 8.0}}},
            "precision.loss_scale.min: 8 is above precision.loss_scale.initial 4",
        ),
        (
            {"precision": {"loss_scale": {"min": 0.5}}},
            "precision.loss_scale.min: DeepSpeed's min_loss_scale is a whole number, got 0.5",
        ),
    ],
)
def test_each_cross_field_rule(tmp_path: Path, sections: dict, line: str) -> None:
    (tmp_path / "corpus.txt").write_text("some text\n")
    (got,) = problems(tmp_path, merged(**sections))
    assert got.startswith(line), got


@pytest.mark.parametrize(
    "sections",
    [
        {
            "precision": {"loss_scale": {"dynamic": False, "initial": 1000.0}}
        },  # a static scale is used as written
        {
            "backend": "accelerate",
            "precision": {"loss_scale": {"min": 0.5}},
        },  # only DeepSpeed needs a whole number
        {"zero": {"stage": 3, "offload_optimizer": True, "offload_params": True}},
        {"backend": "accelerate", "zero": {"stage": 3, "offload_optimizer": True, "offload_params": True}},
        {"model": {"name": None, "target": "pkg.mod:build", "kwargs": {"width": 8}}},
        {"model": {"name": "bert-mlm", "hidden_size": 96, "num_heads": 3}, "data": {"seq_len": 512}},
    ],
)
def test_valid_combinations_pass_the_rules(tmp_path: Path, sections: dict) -> None:
    load(write(tmp_path, merged(**sections)))


def test_slurm_nodes_is_gone_and_names_launch_nnodes(tmp_path: Path) -> None:
    (got,) = problems(tmp_path, merged(slurm={"nodes": 2}))
    assert "slurm.nodes: unknown key; did you mean launch.nnodes?" in got, got


def test_values_are_set_as_given_after_the_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    # A value is not read as YAML: "1:00:00" stays text, "null" stays a string.
    got = load(
        path, ["slurm.time=2:00:00", "name=user"], values={"slurm.time": "1:00:00", "data.text_field": "null"}
    )
    assert (got.slurm.time, got.data.text_field, got.name) == ("1:00:00", "null", "user")
    assert load(path, values={"checkpoint.dir": None, "logging.dir": "/x y"}).logging.dir == "/x y"
    with pytest.raises(UserError, match="train.max_steps"):
        load(path, values={"train.max_steps": "10"})  # typed: a string is not an integer


def test_check_rules_is_empty_for_defaults() -> None:
    assert check_rules(Recipe(name="x")) == []


# --------------------------------------------------------------------------- documentation and helpers


def test_every_key_has_a_description() -> None:
    rows = recipe_reference.reference_rows()
    assert [r[0] for r in rows] == recipe_mod.all_keys()
    assert all(doc.strip() for _, _, _, doc in rows), [k for k, _, _, doc in rows if not doc]
    assert "source" not in recipe_mod.all_keys()


def test_reference_types_are_readable() -> None:
    rows = {key: (type_, default) for key, type_, default, _ in recipe_reference.reference_rows()}
    assert rows["zero.stage"] == ("0 | 1 | 2 | 3", "0")
    assert rows["launch.nproc_per_node"] == ("auto | int >= 1", "auto")
    assert rows["model.hidden_size"] == ("int >= 1 | null", "null")
    assert rows["precision.loss_scale.initial"] == ("float > 0.0", "65536")


def test_explicitly_set_lists_only_written_keys(tmp_path: Path) -> None:
    r = load(write(tmp_path, MINIMAL), ["precision.loss_scale.window=4"])
    assert recipe_mod.explicitly_set(r) == {
        "name",
        "model.name",
        "train.micro_batch_size",
        "train.max_steps",
        "precision.loss_scale.window",
        "source",
    }
