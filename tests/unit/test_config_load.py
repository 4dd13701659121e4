"""Config files, dotted overrides and the generic dataclass builder."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, field
from typing import Literal

import pytest

from heavylift.config import ConfigError, EngineConfig, HeavyliftError, validate
from heavylift.config.load import apply_overrides, build, load_file, parse_scalar


@dataclass
class _Data:
    path: pathlib.Path = pathlib.Path("data.jsonl")
    splits: list[str] = field(default_factory=lambda: ["train"])
    weights: dict[str, float] = field(default_factory=dict)


@dataclass
class _Train:
    """A tree like the trainer's: the engine config nested one level down, plus a required field."""

    model: str
    engine: EngineConfig = field(default_factory=EngineConfig)
    data: _Data = field(default_factory=_Data)
    max_steps: int = 10
    mode: Literal["sft", "pretrain"] = "sft"


# --- load_file -----------------------------------------------------------------------------------

def test_load_yaml_reads_exponent_floats(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("optim:\n  lr: 2e-5\n  betas: [0.9, 0.95]\noffload:\n  speculate: false\n  ratio: null\n")
    tree = load_file(p)
    assert tree == {"optim": {"lr": 2e-5, "betas": [0.9, 0.95]}, "offload": {"speculate": False, "ratio": None}}
    cfg = build(EngineConfig, tree)
    assert cfg.optim.lr == 2e-5 and cfg.optim.betas == (0.9, 0.95) and cfg.offload.speculate is False


def test_load_yml_and_empty_file(tmp_path):
    p = tmp_path / "empty.yml"
    p.write_text("# nothing\n")
    assert load_file(p) == {}


def test_load_toml(tmp_path):
    p = tmp_path / "run.toml"
    p.write_text('model = "m"\n[engine.optim]\nlr = 3e-5\nbetas = [0.9, 0.95]\n[engine.offload]\nratio = 0.8\n')
    cfg = build(_Train, load_file(p))
    assert cfg.model == "m" and cfg.engine.optim.lr == 3e-5 and cfg.engine.offload.ratio == 0.8


@pytest.mark.parametrize("name,text,match", [
    ("run.json", "{}", "unknown format"),
    ("bad.yaml", "a: [1, 2\n", "not valid YAML"),
    ("bad.toml", "a = = 1\n", "not valid TOML"),
    ("list.yaml", "- 1\n- 2\n", "mapping"),
])
def test_load_file_errors(tmp_path, name, text, match):
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(HeavyliftError, match=match):
        load_file(p)


# --- apply_overrides -----------------------------------------------------------------------------

def test_overrides_both_forms_and_scalars():
    tree = {"optim": {"lr": 1e-5, "eps": 1e-8}}
    out = apply_overrides(tree, ["--optim.lr", "2e-5", "--offload.speculate=false", "--optim.betas=[0.9, 0.95]",
                                 "--offload.ratio", "null", "--batch.grad_accum", "4", "--precision.dtype=fp16"])
    assert out == {"optim": {"lr": 2e-5, "eps": 1e-8, "betas": [0.9, 0.95]},
                   "offload": {"speculate": False, "ratio": None}, "batch": {"grad_accum": 4},
                   "precision": {"dtype": "fp16"}}
    assert tree == {"optim": {"lr": 1e-5, "eps": 1e-8}}, "the input tree is not modified"
    cfg = validate(build(EngineConfig, out))
    assert cfg.optim.lr == 2e-5 and cfg.batch.grad_accum == 4 and cfg.offload.ratio is None


def test_override_bare_flag_is_true_and_negative_value_is_a_value():
    out = apply_overrides({}, ["--offload.speculate", "--optim.lr", "-1", "--activation_checkpointing"])
    assert out == {"offload": {"speculate": True}, "optim": {"lr": -1}, "activation_checkpointing": True}
    with pytest.raises(ConfigError, match="optim.lr"):
        validate(build(EngineConfig, out))


def test_parse_scalar():
    assert parse_scalar("1e-5") == 1e-5 and parse_scalar("3") == 3 and parse_scalar("true") is True
    assert parse_scalar("bf16") == "bf16" and parse_scalar("") == "" and parse_scalar("1.5E+3") == 1500.0


@pytest.mark.parametrize("args,key", [
    (["optim.lr", "1"], "optim.lr"),
    (["--", "1"], "--"),
    (["--optim..lr=1"], "optim..lr"),
])
def test_override_errors(args, key):
    with pytest.raises(ConfigError) as e:
        apply_overrides({}, args)
    assert e.value.key == key


def test_override_into_a_scalar_is_an_error():
    with pytest.raises(ConfigError, match="'optim'"):
        apply_overrides({"optim": 3}, ["--optim.lr=1"])


# --- build ---------------------------------------------------------------------------------------

def test_build_defaults_and_nested():
    assert build(EngineConfig, {}) == EngineConfig()
    assert build(EngineConfig, None) == EngineConfig()
    cfg = build(_Train, {"model": "x", "engine": {"optim": {"lr": 1}, "offload": {"bucket_params": 4e8}},
                         "data": {"path": "/d.jsonl", "splits": ["a", "b"], "weights": {"a": 1}}})
    assert cfg.engine.optim.lr == 1.0 and isinstance(cfg.engine.optim.lr, float)
    assert cfg.engine.offload.bucket_params == 400_000_000 and isinstance(cfg.engine.offload.bucket_params, int)
    assert cfg.data.path == pathlib.Path("/d.jsonl") and cfg.data.splits == ["a", "b"]
    assert cfg.data.weights == {"a": 1.0}
    assert cfg.engine.optim.no_decay == ("bias", "norm")
    assert build(EngineConfig, {"optim": {"no_decay": ["ln"]}}).optim.no_decay == ("ln",)


def test_build_unknown_key_names_full_dotted_key_and_suggests():
    with pytest.raises(ConfigError) as e:
        build(_Train, {"model": "x", "engine": {"optim": {"learning_rate": 1e-5, "lr": 1}}})
    assert e.value.key == "engine.optim.learning_rate"
    with pytest.raises(ConfigError) as e:
        build(_Train, {"model": "x", "engine": {"ofload": {}}})
    assert e.value.key == "engine.ofload" and "did you mean 'engine.offload'" in str(e.value)
    with pytest.raises(ConfigError) as e:
        build(EngineConfig, {"zzz": 1})
    assert e.value.key == "zzz" and "did you mean" not in str(e.value) and "offload" in str(e.value)


@pytest.mark.parametrize("tree,key,allowed", [
    ({"engine": {"optim": {"lr": "2e-5"}}}, "engine.optim.lr", "a number"),
    ({"engine": {"optim": {"lr": True}}}, "engine.optim.lr", "a number"),
    ({"engine": {"optim": {"betas": [0.9]}}}, "engine.optim.betas", "a list of 2 items"),
    ({"engine": {"optim": {"betas": 0.9}}}, "engine.optim.betas", "a list"),
    ({"engine": {"optim": {"betas": [0.9, "x"]}}}, "engine.optim.betas[1]", "a number"),
    ({"engine": {"optim": {"no_decay": ["ln", 3]}}}, "engine.optim.no_decay[1]", "a string"),
    ({"engine": {"offload": {"speculate": "yes please"}}}, "engine.offload.speculate", "true or false"),
    ({"engine": {"offload": {"speculate": 1}}}, "engine.offload.speculate", "true or false"),
    ({"engine": {"offload": {"ratio": "auto"}}}, "engine.offload.ratio", "a number or null"),
    ({"engine": {"offload": {"device": "disk"}}}, "engine.offload.device", "one of 'cpu', 'nvme'"),
    ({"engine": {"batch": {"grad_accum": 1.5}}}, "engine.batch.grad_accum", "an integer"),
    ({"engine": {"precision": {"dtype": "int8"}}}, "engine.precision.dtype", "'auto', 'bf16', 'fp16', 'fp32'"),
    ({"engine": {"optim": 3}}, "engine.optim", "a mapping with keys"),
    ({"engine": {"seed": None}}, "engine.seed", "an integer"),
    ({"mode": True}, "mode", "one of 'sft', 'pretrain'"),
    ({"data": {"path": 3}}, "data.path", "a path"),
    ({"data": {"splits": "train"}}, "data.splits", "a list"),
    ({"data": {"weights": {"a": "x"}}}, "data.weights.a", "a number"),
])
def test_build_type_errors_name_the_key(tree, key, allowed):
    with pytest.raises(ConfigError) as e:
        build(_Train, {"model": "m", **tree})
    assert e.value.key == key and allowed in e.value.allowed
    assert f"'{key}'" in str(e.value)


def test_build_required_field():
    with pytest.raises(ConfigError) as e:
        build(_Train, {})
    assert e.value.key == "model" and "required" in str(e.value)
