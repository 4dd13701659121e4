"""heavylift: full-parameter fine-tuning of Hugging Face LLMs bigger than GPU memory.

FSDP2 keeps the bf16 weights sharded on the GPUs; the fp32 master weights and Adam moments live in
host memory, and the CPU optimizer steps each bucket while the GPU is still in backward.
"""

from heavylift.config.schema import EngineConfig
from heavylift.engine import Engine, initialize

__version__ = "0.1.0"
__all__ = ["Engine", "EngineConfig", "initialize", "__version__"]
