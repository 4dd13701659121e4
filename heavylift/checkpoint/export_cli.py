"""``heavylift export CKPT OUT_DIR [--dtype bf16] [--max-shard-size 5GB] [--no-verify]``."""

from __future__ import annotations

import argparse
import re
import sys

from heavylift.config.errors import HeavyliftError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: use e.g. 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint directory, or a directory of them (its latest)")
    parser.add_argument("out_dir", help="where to write the HF model (safetensors, config, tokenizer)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--max-shard-size", type=parse_size, default="5GB", help="largest safetensors file")
    parser.add_argument("--no-verify", action="store_true", help="skip the checksum pass over the checkpoint")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="heavylift export", description=__doc__.strip().split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run(args)


def run(args: argparse.Namespace) -> int:
    from heavylift.checkpoint.export import export

    try:
        files = export(args.checkpoint, args.out_dir, args.dtype, args.max_shard_size, check=not args.no_verify)
    except HeavyliftError as e:
        print(f"heavylift: error: {e}", file=sys.stderr)
        return 2
    print(f"heavylift: wrote {len(files)} files to {args.out_dir}")
    return 0
