"""The memory and step-time planner behind ``heavylift estimate`` and the ``train`` preflight.

Pure arithmetic: nothing here allocates a tensor on a real device (the model shape is read from a
``meta``-device model, which holds no storage). Every figure is per rank unless it says "node".

GPU, per rank (bf16 compute dtype, 2 B/param; fp32 4 B):
- weights: the FSDP2 shards, 2 P / world.
- GPU-tail state: 16 B/param (fp32 master, exp_avg, exp_avg_sq, gradient slot; the tail format's bytes
  for compact state, heavylift/optim/formats.py) for the tail buckets,
  chosen exactly as the engine does (whole buckets, last-arriving first; auto = the root unit if its
  state fits a tenth of the card; after the first step the engine grows the tail into the measured
  headroom, which this plan does not count as required).
- the peak is the larger of two phases of one micro-step:
  * loss phase: the root unit gathered (embeddings/head, bf16), every checkpointed block input
    (layers x tokens x hidden x 2 B with activation checkpointing; every block's activations without),
    the final norm, and the loss: in backward, cross-entropy holds three fp32 [tokens, vocab] tensors at
    once (the saved log-softmax, the nll gradient, the log-softmax gradient: 12 B/token/vocab; HF upcasts
    the logits to fp32 before the loss).
  * block phase: the root unit's gathered weights and unsharded gradient (kept until its reduce-scatter,
    last), block inputs, one block recomputed with its backward working set, the gathered block
    (bf16 weights, the prefetched next block, its bf16 gradient and the fp32 reduce-scatter input),
    and the fp32 staging of one bucket each way (non-blocking dtype-converting copies convert on the GPU).
  Calibrated on qwen3-4b's shape (Llama, head_dim 80: 3.67 B params), seq 4096, micro-batch 4, AC, 1 GPU:
  measured 44.42 GiB (root unit in the tail) and 64.81 GiB (offload.ratio 0.5); see tests/unit/test_memory.py.

Host, per rank, in the state format's bytes (``STATE_FORMATS`` in constants.py, from the store's layout):
pinned master + gradient slot (exact: the store page-locks its own buffers instead of using PyTorch's
pinned caching allocator, which rounds each block up to a power of two), pageable moments (and a
compensation term), the speculation's second buffer set (dropped by the engine when it does not fit),
what loading holds (a meta model, as ``heavylift train`` builds it: the largest unit drawn in fp32; a
model loaded whole: all of it, on every rank, until sharded) and a fixed runtime overhead (CUDA/torch
libraries). ``estimate`` plans every format alike and picks the first, most exact first, whose host state
fits in RAM alone, else (offload.device nvme) the first that fits with part of it on NVMe (formats.py).

NVMe (offload.device nvme), per rank: the host buckets the engine puts on NVMe are chosen by the engine's
own pure rule (offload/preflight.py ``nvme_split``: offload.nvme_ratio of the host parameters in whole
buckets, or, auto, the fewest that let the rest fit 85% of MemAvailable as the engine will see it). Their
state (master, moments, scales) is the rank's state file (4 KiB-aligned regions, offload/nvme.py) and
leaves the host rows; their gradient slot stays in RAM, pinned; the ring adds offload.nvme_buffers sets of
the largest NVMe bucket's state (its master pinned). The verdict is the node's files plus the engine's
1 GiB margin against the free space of offload.nvme_path (or ``--nvme-free-gib``).

Step-time floor (hardware.md's model), per optimizer step, T = tokens per step over all ranks:
- T_gpu  = k P T / (N F), k = 8 with activation recompute, 6 without; F = bf16 matmul rate per GPU.
- T_cpu  = P_host_node / R; R = fused CPU AdamW rate of the whole host in params/s (28 B/param of memory
  traffic per parameter: M = 28 R); the ranks of a node share it.
- T_link = link traffic per rank / bandwidth. In the current engine a host-stepped parameter costs 4 B
  down (the bf16 gradient is converted to fp32 on the GPU, then copied into the pinned fp32 slot) and
  4 B up (the fp32 master is copied up and converted to bf16 on the GPU): 8 B/param of host shard per
  step (6 with a bf16 master, uploaded as it is). The two directions run on separate streams at once;
  the H100 box moves 84.8 GB/s both ways together against 55 GB/s one way, so
  T_link = 8 P_host_rank / (DUPLEX x W), DUPLEX = 1.55.
- T_nvme = 2 x state file bytes x ranks per node / disk GB/s: NVMe buckets never speculate, so their state
  is read once and written once per step, by every rank of the node on the one disk; the rate is a 256 MiB
  write + read through StateFile in nvme_path (O_DIRECT), or stated (``--nvme-gbs``).
- floor = max of the four (they overlap); the serial sum is what an offload that does not overlap pays.
"""

from __future__ import annotations

from heavylift.memory.constants import (AUTO_TAIL_CARD_FRACTION, CUDA_CONTEXT_BYTES, DEFAULT_GPU_TFLOPS, DEFAULT_LINK_GBS, DEFAULT_NVME_GBS, GPU_UNCERTAINTY, GiB, HOST_RUNTIME_BYTES, HOST_UNCERTAINTY, LINK_DUPLEX, STATE_FORMATS, TAIL_BYTES, StateFormat)  # noqa: F401
from heavylift.memory.model import (ModelShape, _default_model_config, model_shape, resolve_config, shape_of_model)  # noqa: F401
from heavylift.memory.checks import check_setup, nvme_need, verdict, verdicts  # noqa: F401
from heavylift.memory.plan import (Machine, Plan, Rates, Setup, _buckets, _pow2, _rank_units, _tail_ratio, block_activation_bytes_per_token, floor_times, nvme_file_bytes, plan)  # noqa: F401
from heavylift.memory.estimate import estimate, suggest  # noqa: F401
from heavylift.memory.render import format_line, render  # noqa: F401
from heavylift.memory.machine import (_probe_adamw, _probe_link, _probe_matmul, disk_free, mem_available, memlock_limit, probe_nvme, probe_rates, this_machine)  # noqa: F401
from heavylift.memory.preflight import (check_train, setup_for_train)  # noqa: F401
from heavylift.memory.formats import (FormatOption, choose, format_options)  # noqa: F401
