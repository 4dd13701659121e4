"""Save/resume on one rank (CPU): bit-identical continuation, verification, retention, `latest`."""

import json

import pytest
import torch

from heavylift.checkpoint import CorruptCheckpointError, load, resume_auto, save
from heavylift.checkpoint.paths import read_latest
from heavylift.config.errors import HeavyliftError
from support.checkpointing import local_state, new_engine, train
from support.equivalence import Case

N = 3


@pytest.fixture(scope="module")
def straight():
    """The uninterrupted run: 2N steps."""
    engine = new_engine()
    train(engine, range(2 * N))
    out = local_state(engine), engine.global_step, engine.micro_step, [g["lr"] for g in engine.optimizer.param_groups]
    engine.close()
    return out


@pytest.fixture(scope="module")
def halfway(tmp_path_factory):
    """N steps then a checkpoint; returns its directory, the state saved and a draw of the RNG after it."""
    directory = tmp_path_factory.mktemp("ckpt")
    engine = new_engine()
    train(engine, range(N))
    save(engine, directory, f"step-{N}", extra={"loader": {"epoch": 0, "batch": 7, "seed": 0}})
    saved = local_state(engine)
    draw = torch.rand(4)
    engine.close()
    return directory, saved, draw


def test_continuation_is_bit_identical(straight, halfway):
    directory, _, draw = halfway
    engine = new_engine(seed=5)  # other initial weights: everything must come from the checkpoint
    extra = load(engine, directory, "latest")
    assert extra["loader"] == {"epoch": 0, "batch": 7, "seed": 0} and extra["tag"] == f"step-{N}"
    assert torch.equal(torch.rand(4), draw), "RNG state not restored"
    train(engine, range(N, 2 * N))
    ref, global_step, micro_step, lrs = straight
    got = local_state(engine)
    assert len(got) == len(ref)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert torch.equal(a, b), f"state tensor {i} differs"  # masters, moments, steps, device shards
    assert (engine.global_step, engine.micro_step) == (global_step, micro_step)
    assert [g["lr"] for g in engine.optimizer.param_groups] == lrs
    engine.close()


def _data_file(root):
    """The largest DCP data file of a checkpoint (a parameter's master or moment)."""
    return max((root / "state").glob("*.distcp"), key=lambda p: p.stat().st_size)


def _flip_byte(path, offset=-100):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip", "truncate", "meta", "manifest", "delete"])
def test_damaged_checkpoint_is_refused_before_any_change(tmp_path, damage):
    engine = new_engine()
    train(engine, range(1))
    root = save(engine, tmp_path, "step-1")
    train(engine, range(1, 2))
    before = local_state(engine)
    data = _data_file(root)
    if damage == "flip":
        _flip_byte(data)
    elif damage == "truncate":
        data.write_bytes(data.read_bytes()[:-10])
    elif damage == "meta":
        meta = json.loads((root / "meta.json").read_text())
        meta["global_step"] = 99
        (root / "meta.json").write_text(json.dumps(meta, indent=1))
    elif damage == "manifest":
        (root / "manifest.json").write_text("{")
    else:
        (root / "rank-0.pt").unlink()
    expected = {"flip": data.name, "truncate": "truncated", "meta": "meta.json", "manifest": "manifest.json",
                "delete": "rank-0.pt"}[damage]
    with pytest.raises(HeavyliftError, match=expected):
        load(engine, tmp_path, "step-1")
    after = local_state(engine)
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "a refused load must change nothing"
    assert engine.global_step == 2
    engine.close()


def test_keep_last_k_latest_and_auto_resume_skips_corrupted(tmp_path):
    engine = new_engine()
    for step in range(1, 5):
        train(engine, range(step - 1, step))
        save(engine, tmp_path, f"step-{step}", keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-3", "step-4"]
    assert read_latest(tmp_path) == "step-4"
    _flip_byte(_data_file(tmp_path / "step-4"))
    with pytest.raises(CorruptCheckpointError):
        load(engine, tmp_path, "latest")
    assert resume_auto(engine, tmp_path)["tag"] == "step-3"
    assert engine.global_step == 3
    assert resume_auto(engine, tmp_path / "empty") is None
    engine.close()


def test_user_mistakes_are_clear(tmp_path):
    engine = new_engine()
    with pytest.raises(HeavyliftError, match="no complete checkpoint"):
        load(engine, tmp_path, "latest")
    with pytest.raises(HeavyliftError, match="tag"):
        save(engine, tmp_path, "../escape")
    save(engine, tmp_path, "start")
    with pytest.raises(HeavyliftError, match="no checkpoint"):
        load(engine, tmp_path, "step-9")
    other = new_engine(case=Case("other", unused_param=True))  # a model with more parameters
    with pytest.raises(HeavyliftError, match="unused"):
        load(other, tmp_path, "start")
    other.close()
    engine.close()


def test_saving_the_same_tag_again_replaces_it(tmp_path):
    engine = new_engine()
    save(engine, tmp_path, "last")
    train(engine, range(1))
    save(engine, tmp_path, "last")
    fresh = new_engine(seed=3)
    load(fresh, tmp_path, "last")
    assert fresh.global_step == 1
    assert all(torch.equal(a, b) for a, b in zip(local_state(fresh), local_state(engine)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last", "latest"]
    fresh.close()
    engine.close()


def test_resume_keeps_the_placement_the_run_had(tmp_path):
    """After the automatic placement moved buckets to the GPU tail (stepped by another kernel than the
    host buckets), a resume must step the same buckets the same way: continuation stays bit-identical."""
    def grown():
        engine = new_engine()
        train(engine, range(1))
        engine.grow_tail(2)  # what the placement does after its first steps
        return engine

    straight = grown()
    train(straight, range(1, 2 * N))
    ref = local_state(straight)
    straight.close()
    engine = grown()
    train(engine, range(1, N))
    save(engine, tmp_path, f"step-{N}")
    tail = len(engine.buckets) - engine.first_tail
    engine.close()
    resumed = new_engine(seed=5)
    assert len(resumed.buckets) - resumed.first_tail < tail
    load(resumed, tmp_path, "latest")
    assert len(resumed.buckets) - resumed.first_tail == tail
    train(resumed, range(N, 2 * N))
    got = local_state(resumed)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert torch.equal(a, b), f"state tensor {i} differs"
    resumed.close()


def test_saving_settles_the_placement(tmp_path):
    """A run resumed from a checkpoint cannot replay the measurements that would move the placement later,
    so the saving run stops adapting too (the placement itself needs a GPU: a stand-in records the call)."""
    engine = new_engine()
    train(engine, range(1))
    settled = []
    engine.placement = type("Adapting", (), {"settle": lambda self: settled.append(engine.global_step)})()
    save(engine, tmp_path, "step-1")
    assert settled == [1]
    engine.placement = None
    engine.close()
