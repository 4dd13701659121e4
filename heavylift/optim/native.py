"""heavylift's native CPU kernels, compiled on first use (torch.utils.cpp_extension, cached).

``load()`` returns the module or None when no compiler is available (then the engine uses torch's
fused kernel with a snapshot copy for speculation: same results, more memory traffic).
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger("heavylift")
_lock = threading.Lock()
_module = None
_failed: str | None = None


def load():
    global _module, _failed
    with _lock:
        if _module is not None or _failed is not None:
            return _module
        try:
            from torch.utils.cpp_extension import load as build

            csrc = os.path.join(os.path.dirname(__file__), "csrc")
            src = [os.path.join(csrc, f) for f in ("adamw_cpu.cpp", "adamw_int8.cpp", "adamw_bf16_master.cpp",
                                                       "adamw_bf16_master_int8.cpp")]
            _module = build(
                name="heavylift_adamw_cpu", sources=src, extra_include_paths=[csrc],
                extra_cflags=["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"],
                verbose=False,
            )
        except Exception as exc:  # no compiler or ninja: fall back, say why once
            _failed = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log.warning("heavylift native CPU kernel unavailable (%s); using torch's fused AdamW", _failed)
        return _module


def failure() -> str | None:
    return _failed
