"""Checkpoints of the compact formats (one rank, CPU): the compact state is stored as it is (codes and
scales, bf16 master and compensation), resume within a format is bit-identical, another format is
refused with what to change, and export adds a bf16 master's compensation."""

import dataclasses

import pytest
import torch
import torch.distributed.checkpoint as dcp

from heavylift.checkpoint import load, save
from heavylift.checkpoint.export import export
from heavylift.config.errors import HeavyliftError
from support.checkpointing import CASE, local_state, new_engine, train

N = 2
COMPACT = ("bf16-moments", "int8-moments", "bf16-master", "bf16-master-int8")


def _case(fmt: str, **kw):
    return dataclasses.replace(CASE, name=fmt, state_format=fmt, **kw)


@pytest.mark.parametrize("fmt,ratio", [(f, r) for f in COMPACT for r in (1.0, 0.5)
                                        if (f, r) != ("bf16-master-int8", 1.0)])  # time: half_tail has host buckets
def test_resume_is_bit_identical(tmp_path, fmt, ratio):
    """bf16-master-int8 resumes with the run's rounding seed (engine.seed 3) although the new engine's is 0."""
    case = _case(fmt, ratio=ratio)
    engine = new_engine(case=case, engine_seed=3)
    train(engine, range(N), case)
    save(engine, tmp_path, f"step-{N}")
    train(engine, range(N, 2 * N), case)
    straight = local_state(engine)
    engine.close()

    resumed = new_engine(seed=5, case=case)  # other initial weights: everything comes from the checkpoint
    load(resumed, tmp_path, "latest")
    train(resumed, range(N, 2 * N), case)
    got = local_state(resumed)
    resumed.close()
    assert len(got) == len(straight)
    for i, (a, b) in enumerate(zip(got, straight)):
        assert a.dtype == b.dtype and torch.equal(a, b), f"state tensor {i} differs"


def test_compact_state_is_stored_as_is(tmp_path):
    case = _case("int8-moments")
    engine = new_engine(case=case)
    train(engine, range(1), case)
    root = save(engine, tmp_path, "s")
    engine.close()
    stored = dcp.FileSystemReader(root / "state").read_metadata().state_dict_metadata
    name = "model.layers.0.mlp.down_proj.weight"  # [32, 64]: rows of 64, one ragged block each
    assert stored[f"exp_avg.{name}"].properties.dtype == torch.int8
    assert stored[f"exp_avg_sq.{name}"].properties.dtype == torch.uint8
    assert tuple(stored[f"exp_avg_scale.{name}"].size) == (32, 1)
    assert stored[f"master.{name}"].properties.dtype == torch.float32


@pytest.mark.parametrize("saved,wanted", [("int8-moments", "fp32"), ("fp32", "bf16-master"),
                                          ("bf16-master", "bf16-moments")])
def test_another_format_is_refused_naming_the_setting(tmp_path, saved, wanted):
    engine = new_engine(case=_case(saved))
    save(engine, tmp_path, "s")
    engine.close()
    other = new_engine(case=_case(wanted))
    before = local_state(other)
    with pytest.raises(HeavyliftError, match=f"offload.state_format: {saved}"):
        load(other, tmp_path, "s")
    assert all(torch.equal(a, b) for a, b in zip(before, local_state(other)))
    other.close()


def test_export_of_a_bf16_master_adds_its_compensation(tmp_path):
    from safetensors.torch import load_file

    case = _case("bf16-master")
    engine = new_engine(case=case)
    train(engine, range(N), case)
    save(engine, tmp_path, "s")
    master = engine.master_weights()
    engine.close()
    export(tmp_path / "s", tmp_path / "hf", dtype="fp32")
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    name = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(exported[name], master[name])
    assert not torch.equal(exported[name], exported[name].bfloat16().float())  # more than the bf16 part
