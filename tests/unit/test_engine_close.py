"""A closed engine lets go: nothing of it stays reachable from the model or its parameters' hooks, so its
weights and GPU-tail state are freed (session 9: a closed engine on a GPU held its 15.6 MiB for the life of
the process, through the post-accumulate-grad hooks that torch keeps from C++)."""

from __future__ import annotations

import gc
import weakref

import torch

import heavylift
from heavylift.config import EngineConfig
from support.equivalence import tiny_model


def _closed_engine(model):
    ec = EngineConfig()
    ec.precision.dtype = "fp32"
    engine = heavylift.initialize(model=model, config=ec)[0]
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    engine.close()
    return weakref.ref(engine), weakref.ref(engine.pipeline)


def test_a_closed_engine_is_collected():
    engine, pipeline = _closed_engine(tiny_model())
    gc.collect()
    assert engine() is None and pipeline() is None


def test_the_model_outlives_its_closed_engine_without_calling_into_it():
    model = tiny_model()
    engine, _ = _closed_engine(model)
    gc.collect()
    assert engine() is None
    ids = torch.randint(0, 64, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()  # no hook of the closed engine fires
