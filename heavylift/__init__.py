"""heavylift: full-parameter fine-tuning of Hugging Face LLMs bigger than GPU memory.

FSDP2 keeps the bf16 weights sharded on the GPUs; the fp32 master weights and Adam moments live in
host memory, and the CPU optimizer steps each bucket while the GPU is still in backward.
"""

from heavylift.config.schema import EngineConfig

__version__ = "0.1.0"
__all__ = ["Engine", "EngineConfig", "initialize", "__version__"]


def __getattr__(name: str):
    """``Engine`` and ``initialize`` import torch on first use, not with the package: the command line
    (cli.main) sets the CUDA allocator's environment before torch is imported (cuda_allocator.py)."""
    if name in ("Engine", "initialize"):
        from heavylift import engine
        return getattr(engine, name)
    raise AttributeError(f"module 'heavylift' has no attribute {name!r}")
