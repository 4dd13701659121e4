"""``export``: a checkpoint's master weights as a Hugging Face model directory (safetensors).

Streams one tensor at a time out of the DCP files (a partial ``dcp.load`` of one key into a full-size
tensor, ``no_dist``: resharding from any saved world size) and writes shard files of at most
``max_shard_bytes``. Peak memory is bounded by one output shard being assembled, plus the tensor being
read in fp32, plus DCP's read buffers for it (the bytes and the unpickled chunk):

    peak ~= max_shard_bytes + 3 * 4 bytes * (numel of the largest parameter)

never the whole model (unlike ``zero_to_fp32``). Tied weights are written once, under the name
``named_parameters`` gives them (the input embedding), as ``save_pretrained`` does; ``from_pretrained``
re-ties them from ``tie_word_embeddings`` in the config.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import warnings

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file

from heavylift.checkpoint import paths
from heavylift.checkpoint.load import resolve, verify
from heavylift.config.errors import HeavyliftError

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
_HF_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def checkpoint_root(path: str | os.PathLike) -> pathlib.Path:
    """A checkpoint directory itself, or a directory of checkpoints (its ``latest``)."""
    path = pathlib.Path(path)
    if (path / paths.MANIFEST).is_file() or (path / paths.META).is_file():
        return path
    return resolve(path, paths.LATEST)


def plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Group names (in order) into files of at most ``max_shard_bytes`` (a bigger tensor gets its own)."""
    files: list[list[str]] = []
    current, total = [], 0
    for name, nbytes in sizes:
        if current and total + nbytes > max_shard_bytes:
            files.append(current)
            current, total = [], 0
        current.append(name)
        total += nbytes
    if current:
        files.append(current)
    return files


def export(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "bf16",
           max_shard_bytes: int = 5 * 2**30, check: bool = True) -> list[pathlib.Path]:
    """Write ``out_dir`` loadable by ``AutoModelForCausalLM.from_pretrained``; returns the files written.

    ``dtype``: bf16, fp16 or fp32 (rounded from the fp32 masters; a bf16 master plus its compensation).
    ``check``: verify the checkpoint's checksums first (reads every file once).
    """
    if dtype not in DTYPES:
        raise HeavyliftError(f"export dtype {dtype!r} is not allowed: use one of bf16, fp16, fp32")
    to = DTYPES[dtype]
    root = checkpoint_root(checkpoint)
    if check:
        verify(root)
    meta = json.loads((root / paths.META).read_text())
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reader = dcp.FileSystemReader(root / paths.STATE)
    stored = reader.read_metadata().state_dict_metadata
    params = meta["params"]
    sizes = [(n, _numel(p["shape"]) * to.itemsize) for n, p in params.items()]
    groups = plan_shards(sizes, max_shard_bytes)
    names = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    written, weight_map = [], {}
    for fname, group in zip(names, groups):
        tensors = {}
        for name in group:
            key = params[name]["key"]
            t = _read_one(reader, stored, key)
            comp = key.replace("master.", "master_comp.", 1)
            if key.startswith("master.") and comp in stored:  # bf16 master: add its Kahan compensation
                t = t.float() + _read_one(reader, stored, comp).float()
            tensors[name] = t.reshape(params[name]["shape"]).to(to).contiguous()
            del t
            weight_map[name] = fname
        save_file(tensors, out / fname, metadata={"format": "pt"})
        written.append(out / fname)
        del tensors
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(s for _, s in sizes)}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        written.append(out / "model.safetensors.index.json")
    written += _copy_hf_files(root / paths.HF, out, to)
    return written


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _read_one(reader: dcp.FileSystemReader, stored: dict, key: str) -> torch.Tensor:
    if key not in stored:
        raise HeavyliftError(f"checkpoint has no tensor {key!r}: written by another heavylift version?")
    md = stored[key]
    t = torch.empty(md.size, dtype=md.properties.dtype)
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({key: t}, storage_reader=reader, no_dist=True)
    return t


def _copy_hf_files(src: pathlib.Path, out: pathlib.Path, dtype: torch.dtype) -> list[pathlib.Path]:
    if not src.is_dir():
        raise HeavyliftError(f"checkpoint has no {src.name}/ (no model config): cannot export a HF model")
    written = []
    for f in sorted(src.iterdir()):
        target = out / f.name
        if f.name == "config.json":
            config = json.loads(f.read_text())
            for key in ("dtype", "torch_dtype"):
                if key in config or key == "dtype":
                    config[key] = _HF_NAMES[dtype]
            target.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copyfile(f, target)
        written.append(target)
    return written
