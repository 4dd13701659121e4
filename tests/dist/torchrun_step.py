"""Run by tests/dist/test_torchrun.py under torchrun: init_dist, the core planner over the real group,
a tiny heavylift.initialize and one optimizer step; writes OUT_DIR/rank<r>.json."""

import copy
import hashlib
import json
import os
import sys

tests_dir, out_dir = sys.argv[1], sys.argv[2]
sys.path.insert(0, tests_dir)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import heavylift  # noqa: E402
from heavylift.config.errors import HeavyliftError  # noqa: E402
from heavylift.dist import cores  # noqa: E402
from heavylift.dist.env import init_dist  # noqa: E402
from support.equivalence import Case, batches, engine_config, reference_optimizer, tiny_model  # noqa: E402

env = init_dist()  # binds this rank's cores (the default with several ranks) unless HEAVYLIFT_BIND_CORES=off
rank, world = env.rank, env.world_size
report = {"rank": rank, "world": world, "local_rank": env.local_rank, "cpu_threads": env.cpu_threads,
          "bound_how": env.cores.how, "affinity": sorted(os.sched_getaffinity(0)),
          "torchrun_env": {k: os.environ.get(k) for k in ("LOCAL_WORLD_SIZE", "GROUP_RANK", "OMP_NUM_THREADS")}}

# The planner over the real group, whatever init_dist did.
infos = [None] * world
dist.all_gather_object(infos, cores.local_info(rank, env.local_rank))
try:
    plans = cores.plan_cores(infos)
    report["plan"] = {"cpus": list(plans[rank].cpus), "worker_threads": plans[rank].worker_threads}
except HeavyliftError as e:
    report["plan_error"] = str(e)

# One step of the tiny Llama: rank r trains on batch r, the reference on all of them.
case = Case("torchrun", steps=1, max_norm=1.0, kernel="torch")
ec = engine_config(case)
model = tiny_model()
ref = copy.deepcopy(model)
engine, _, _, _ = heavylift.initialize(model=model, config=ec)
bs = batches(0, 0, world)
out = engine(input_ids=bs[rank], labels=bs[rank])
engine.backward(out.loss)
engine.step()
losses = [torch.zeros(1) for _ in range(world)]
dist.all_gather(losses, out.loss.detach().float().reshape(1))
master = engine.master_weights()
digest = hashlib.sha256(b"".join(master[k].contiguous().numpy().tobytes() for k in sorted(master))).hexdigest()
report.update(losses=[float(x) for x in losses], master_sha256=digest, grad_norm=engine.last_step.grad_norm)

if rank == 0:  # the unsharded reference: torch AdamW on the mean of the ranks' losses
    ropt, _ = reference_optimizer(ref, case, ec, fused=True)
    with torch.no_grad():
        ref_losses = [float(ref(input_ids=b, labels=b).loss) for b in bs]
    (sum(ref(input_ids=b, labels=b).loss for b in bs) / world).backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), case.max_norm)
    ropt.step()
    report["ref_losses"] = ref_losses
    report["max_param_diff"] = max((master[n] - p.detach()).abs().max().item() for n, p in ref.named_parameters())
    report["lr"] = case.lr

engine.close()
from heavylift.dist.env import shutdown  # noqa: E402

shutdown()
with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
    json.dump(report, f)
