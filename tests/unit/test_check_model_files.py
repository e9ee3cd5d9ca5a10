"""What `check` knows of model.hf before any worker starts: the tokenizer's [MASK] for masked-lm,
LoRA target modules against the model's layers, a local folder that is not there (the shipped tiny
ones are saved on first use), and a Hub id on a machine that cannot reach the Hub."""

from __future__ import annotations

import http.server
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from launcher import cli
from launcher.plan import hf_dir, model
from launcher.plan.hardware import Hardware
from launcher.plan.resolve import plan_file
from tests.runs import ROOT

CPU = Hardware(cpu_count=2)
DATA = ROOT / "recipes" / "data"
HUB_ANSWER = model.hub_answer  # the real one, should a fixture stand in for the Hub


@pytest.fixture(autouse=True)
def _cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Hardware, "probe", classmethod(lambda cls: CPU))


def _recipe(tmp: Path, hf: str, task: str = "causal-lm", **sections: dict[str, object]) -> Path:
    body: dict[str, object] = {
        "name": "m",
        "model": {"hf": hf, **sections.pop("model", {})},
        "data": {"task": task, "kind": "text", "paths": [str(DATA / "corpus.txt")], "seq_len": 32},
        "train": {"micro_batch_size": 4, "max_steps": 2},
        "precision": {"dtype": "fp32"},
        "launch": {"device": "cpu", "nproc_per_node": 1},
        "logging": {"dir": str(tmp / "runs")},
        **sections,
    }
    path = tmp / "m.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def _check(capsys: pytest.CaptureFixture[str], path: Path, *overrides: str) -> tuple[int, str, list[str]]:
    code = cli.main(["check", str(path), *overrides])
    out, err = capsys.readouterr()
    return code, out, err.splitlines()


# --------------------------------------------------------------------------- the tokenizer's [MASK]


def test_masked_lm_on_a_tokenizer_without_mask_is_one_line_at_check(
    tmp_path: Path, tiny_models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gpt2 = tiny_models / "tiny-gpt2"
    assert _check(capsys, _recipe(tmp_path, str(gpt2), "masked-lm"))[::2] == (
        2,
        [
            f"error: model.hf: data.task masked-lm masks tokens with [MASK], and the tokenizer in {gpt2} has "
            "none; a causal LM trains with data.task=causal-lm"
        ],
    )
    assert _check(capsys, _recipe(tmp_path, str(gpt2), "causal-lm"))[0] == 0
    assert _check(capsys, _recipe(tmp_path, str(tiny_models / "tiny-bert"), "masked-lm"))[0] == 0


def test_a_mask_token_the_masking_does_not_read_is_named(
    tmp_path: Path, tiny_models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A RoBERTa-style tokenizer: its mask token is <mask>; the workers' masking reads [MASK].
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "vocab.txt").write_text("[PAD]\n[UNK]\n<mask>\nhello\n")
    (tok / "special_tokens_map.json").write_text(json.dumps({"mask_token": {"content": "<mask>"}}))
    path = _recipe(tmp_path, str(tiny_models / "tiny-bert"), "masked-lm", data={
        "task": "masked-lm", "kind": "text", "paths": [str(DATA / "corpus.txt")], "seq_len": 32, "tokenizer": "tok"
    })  # fmt: skip
    code, _, err = _check(capsys, path)
    assert (code, err) == (
        2,
        [
            f"error: data.tokenizer: data.task masked-lm masks tokens with [MASK], and the tokenizer in {tok} "
            "has none (its mask token '<mask>' is not one mplaunch's masking reads); a causal LM trains with "
            "data.task=causal-lm"
        ],
    )


def test_a_launch_is_refused_the_same_way_before_any_worker(
    tmp_path: Path, tiny_models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _recipe(tmp_path, str(tiny_models / "tiny-gpt2"), "masked-lm")
    assert cli.main([str(path)]) == 2
    assert "masks tokens with [MASK]" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- LoRA target modules


def test_lora_targets_that_match_no_linear_layer_are_named_at_check(
    tmp_path: Path, tiny_models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    llama = tiny_models / "tiny-llama"
    path = _recipe(
        tmp_path, str(llama), model={"lora": {"rank": 4, "target_modules": ["q_proj", "nope", "mlp"]}}
    )
    code, _, err = _check(capsys, path)
    layers = "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"
    assert (code, err) == (
        2,
        [
            f"error: model.lora.target_modules: 'nope' matches no linear layer of {llama}; "
            f"its linear layers are named {layers}",
            f"error: model.lora.target_modules: 'mlp' matches no linear layer of {llama}; "
            f"its linear layers are named {layers}",
        ],
    )
    assert _check(capsys, path, "model.lora.target_modules=[q_proj,v_proj]")[0] == 0


def test_a_tied_output_head_is_a_target_though_its_weights_are_not_saved(
    tmp_path: Path, tiny_models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gpt2 = tiny_models / "tiny-gpt2"
    assert "lm_head.weight" not in (hf_dir.weight_shapes(gpt2) or {})  # tied to the embeddings
    path = _recipe(tmp_path, str(gpt2), model={"lora": {"rank": 4, "target_modules": ["c_attn", "lm_head"]}})
    assert _check(capsys, path)[0] == 0


def test_a_target_that_also_matches_a_module_holding_linear_layers_is_refused() -> None:
    source = hf_dir.HfModel("/m", True, {"model_type": "x"}, True, None)
    names = ["block.proj", "block.attn.proj.inner"]  # `proj` is a linear layer here, a container there
    assert hf_dir.lora_problems(source, ["proj"], names) == [
        "model.lora.target_modules: 'proj' also matches block.attn.proj, which is not a linear layer; "
        "name the linear layers in it"
    ]
    assert hf_dir.lora_problems(source, ["block.proj", "inner"], names) == []


@pytest.mark.slow
def test_a_folder_without_weights_is_read_by_a_build_on_the_meta_device(
    tmp_path: Path, tiny_models: Path
) -> None:
    config_only = tmp_path / "llama-config"
    config_only.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_models / "tiny-llama" / name, config_only / name)
    lora = {"weights": "random", "lora": {"rank": 4, "target_modules": ["nope"]}}
    path = _recipe(tmp_path, str(config_only), model=lora)
    # In a fresh interpreter: the build runs in a subprocess, so check itself still imports no torch.
    code = "import sys; from launcher import cli; rc = cli.main(['check', sys.argv[1]]); print('torch' in sys.modules)"
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=ROOT)
    took = time.perf_counter() - started
    assert done.stdout.splitlines() == [
        f"mplaunch: model.lora: reading the layer names of {config_only} (a build on the meta device)",
        "False",
    ]
    assert done.stderr.startswith(
        f"error: model.lora.target_modules: 'nope' matches no linear layer of {config_only}; its linear layers "
        "are named down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"
    ), done.stderr
    assert took < 120, took


# --------------------------------------------------------------------------- a local folder that is not there


def test_a_tiny_model_folder_that_is_not_there_says_how_to_make_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A shipped fine-tune recipe copied elsewhere names models/tiny-llama beside itself: a folder, not a hub id.
    path = _recipe(tmp_path, "models/tiny-llama")
    code, out, err = _check(capsys, path)
    missing = tmp_path / "models" / "tiny-llama"
    assert (code, out) == (2, "")
    assert err == [
        f"error: model.hf: directory not found: {missing} (make it with: python "
        f"{hf_dir.MAKE_TINY.relative_to(Path.cwd()) if hf_dir.MAKE_TINY.is_relative_to(Path.cwd()) else hf_dir.MAKE_TINY}"
        f" {missing.parent})"
    ]


@pytest.mark.parametrize(
    ("name", "local"),
    [
        ("models/tiny-llama", True),  # a shipped tiny model's name, folder or not
        ("mine/model", True),  # mine/ is a folder beside the recipe
        ("./x", True),
        ("org/some-model", False),
        ("gpt2", False),
    ],
)
def test_which_names_are_folders_and_which_hub_ids(tmp_path: Path, name: str, local: bool) -> None:
    (tmp_path / "mine").mkdir()
    assert hf_dir.locate(name, str(tmp_path / "r.yaml"))[1] is local


@pytest.fixture
def shipped(tmp_path: Path, tiny_models: Path) -> Path:
    """A clone's recipes/models without the tiny models: make_tiny.py there copies the real ones in."""
    models = tmp_path / "recipes" / "models"
    models.mkdir(parents=True)
    script = models / "make_tiny.py"
    script.write_text(
        "import shutil, sys\n"
        f"assert sys.argv[1:] == ['--missing'], sys.argv\n"
        f"for name in ('tiny-bert', 'tiny-llama', 'tiny-gpt2'):\n"
        f"    shutil.copytree({str(tiny_models)!r} + '/' + name, {str(models)!r} + '/' + name)\n"
    )
    return models


def test_the_shipped_tiny_models_are_saved_on_first_use(
    shipped: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _recipe(shipped.parent, "models/tiny-llama", "sft", data={
        "task": "sft", "kind": "jsonl", "paths": [str(DATA / "questions.jsonl")], "seq_len": 48
    })  # fmt: skip
    code, out, err = _check(capsys, path)
    assert (code, err) == (0, [])
    lines = out.splitlines()
    assert lines[0] == f"mplaunch: saving the tiny models of {shipped} (first use: make_tiny.py, no download)"
    assert lines[1].startswith("mplaunch: saved tiny-bert, tiny-llama, tiny-gpt2 in ")
    assert lines[2].startswith(f"ok: {path} ")
    assert (shipped / "tiny-llama" / "config.json").is_file()
    assert _check(capsys, path)[1].startswith("ok: ")  # there now: nothing more is saved


def test_a_first_use_that_fails_is_one_line(shipped: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (shipped / "make_tiny.py").write_text("raise SystemExit('No module named torch')\n")
    code, _, err = _check(capsys, _recipe(shipped.parent, "models/tiny-gpt2"))
    assert code == 2
    assert err == [
        f"error: model.hf: directory not found: {shipped / 'tiny-gpt2'} (make it with: python "
        f"{shipped / 'make_tiny.py'}); saving it failed: No module named torch"
    ]


# --------------------------------------------------------------------------- a Hub id


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "no-token"))
    return cache


def _cached(cache: Path, name: str) -> None:
    snapshot = cache / f"models--{name.replace('/', '--')}" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")


def _hub_answers(monkeypatch: pytest.MonkeyPatch, answer: tuple[int | None, str]) -> list[str]:
    asked: list[str] = []
    monkeypatch.setattr(model, "hub_answer", lambda endpoint, name: asked.append(name) or answer)
    return asked


def test_offline_mode_with_an_id_the_cache_lacks_is_one_line(
    tmp_path: Path, hub_cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    asked = _hub_answers(monkeypatch, (200, ""))
    code, _, err = _check(capsys, _recipe(tmp_path, "org/some-model"))
    assert (code, asked) == (2, [])  # offline: the Hub is not asked
    assert err == [
        "error: model.hf: org/some-model is a Hub id (no folder of that name beside the recipe), HF_HUB_OFFLINE "
        f"is set and the Hugging Face cache ({hub_cache}) has no copy; download it where the Hub answers "
        "(hf download org/some-model) or set model.hf to a local folder"
    ]
    _cached(hub_cache, "org/some-model")
    assert _check(capsys, _recipe(tmp_path, "org/some-model"))[0] == 0


def test_a_hub_that_does_not_answer_is_one_line_unless_the_cache_has_the_model(
    tmp_path: Path, hub_cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    asked = _hub_answers(monkeypatch, (None, "timed out"))
    code, _, err = _check(capsys, _recipe(tmp_path, "org/some-model"))
    assert (code, asked) == (2, ["org/some-model"])
    assert err == [
        "error: model.hf: org/some-model is a Hub id (no folder of that name beside the recipe), the Hub "
        f"(https://huggingface.co) does not answer (timed out) and the Hugging Face cache ({hub_cache}) has no "
        "copy; download it where the Hub answers (hf download org/some-model) or set model.hf to a local folder"
    ]
    _cached(hub_cache, "org/some-model")
    plan = plan_file(_recipe(tmp_path, "org/some-model"), [], CPU)
    assert plan.env["HF_HUB_OFFLINE"] == "1"  # the workers read the cache instead of retrying the Hub
    assert (
        "model.hf: the Hub (https://huggingface.co) does not answer (timed out); the workers read "
        "org/some-model from the cache"
    ) in plan.warnings


def test_a_dry_run_without_the_hub_shows_the_plan_and_says_this_machine_cannot_run_it(
    tmp_path: Path, hub_cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Which machine reaches the Hub is the machine's business: the plan may be meant for another one.
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    code = cli.main([str(_recipe(tmp_path, "org/some-model")), "--dry-run"])
    out, err = capsys.readouterr()
    assert code == 2
    assert "== command ==" in out
    assert err.splitlines()[-1].startswith(
        "error: this machine cannot run the plan above: model.hf: org/some-model is a Hub id (no folder of "
        "that name beside the recipe), TRANSFORMERS_OFFLINE is set and the Hugging Face cache"
    )


def test_an_id_the_hub_does_not_have_is_one_line(
    tmp_path: Path, hub_cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _hub_answers(monkeypatch, (404, ""))
    assert _check(capsys, _recipe(tmp_path, "org/no-such-model"))[::2] == (
        2,
        [
            "error: model.hf: the Hub has no model org/no-such-model "
            "(https://huggingface.co/org/no-such-model: HTTP 404); check the id"
        ],
    )
    _hub_answers(monkeypatch, (200, ""))
    plan = plan_file(_recipe(tmp_path, "org/some-model"), [], CPU)
    assert "HF_HUB_OFFLINE" not in plan.env
    assert plan.hf_dir == "org/some-model"


class _Hub(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/api/models/org/there" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def local_hub() -> Iterator[str]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_the_hub_is_asked_once_and_briefly(local_hub: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert HUB_ANSWER(local_hub, "org/there") == (200, "")
    assert HUB_ANSWER(local_hub, "org/gone") == (404, "")
    free = http.server.HTTPServer(("127.0.0.1", 0), _Hub)
    port = free.server_address[1]
    free.server_close()  # nothing listens there now
    started = time.perf_counter()
    status, reason = HUB_ANSWER(f"http://127.0.0.1:{port}", "org/there")
    assert (status, bool(reason)) == (None, True)
    assert time.perf_counter() - started < model.HUB_TIMEOUT_S + 1
