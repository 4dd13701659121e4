"""Sharded, verified, resumable checkpoints and HF export.

    save(engine, dir, tag, extra)  -> dir/tag          (collective; atomic; keep the last K)
    load(engine, dir, "latest")    -> extra            (collective; any world size; verified first)
    resume_auto(engine, dir)       -> extra | None     (newest checkpoint that verifies)
    export(ckpt, out_dir, "bf16")                      (HF safetensors, one tensor in memory at a time)
"""

from heavylift.checkpoint.export import export
from heavylift.checkpoint.load import CorruptCheckpointError, load, resume_auto, verify
from heavylift.checkpoint.preempt import Preemption
from heavylift.checkpoint.save import save

__all__ = ["CorruptCheckpointError", "Preemption", "export", "load", "resume_auto", "save", "verify"]
