"""How far heavylift's trajectory drifts from torch.optim.AdamW's (fused) on the clip_mixed equivalence case,
per learning rate: the native kernel's few-ulp differences grow with lr (tests/support/tolerance.py).

    PYTHONPATH=.:tests python benchmarks/equivalence_lr_sweep.py      (one JSON line per lr)
"""

from __future__ import annotations

import json

from support.equivalence import Case, run_case
from support.tolerance import REL

for lr in (1e-2, 5e-3, 3e-3):
    case = Case("clip_mixed", max_norm=2.0, lr=lr)
    r = run_case(case)
    print(json.dumps({"lr": lr, "steps_clipped": sum(theirs > case.max_norm for _, theirs in r["norms"]),
                      "steps": case.steps, "max_param_diff": r["max_param_diff"], "bound": case.steps * lr * REL,
                      "max_avg_sq_rel": r["max_avg_sq_rel"],
                      "max_norm_rel_diff": max(abs(m - t) / t for m, t in r["norms"])}), flush=True)
