"""Sequence packing: samples laid end to end in rows of ``seq_len`` tokens, each with its own positions.

Why packing cannot leak between samples: ``position_ids`` restart at 0 for every sample, and a stock HF
model called with ``attention_mask=None`` and no KV cache (heavylift loads models with
``config.use_cache=False``) turns those restarts into a block-diagonal causal mask
(``transformers.masking_utils.find_packed_sequence_indices``), with SDPA on CPU and GPU alike; a test
checks that a packed sample's logits equal the sample's logits alone. With a KV cache, HF skips that
detection and samples would attend to each other. Across a boundary, the first token of every sample
gets label -100, so no sample is trained to predict the next one's first token. The tail of a row is
padding: its own "sample" of pad tokens with label -100.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from heavylift.data.formats import IGNORE, Sample


@dataclass
class PackStats:
    samples: int = 0      # samples kept
    truncated: int = 0    # longer than seq_len, cut to fit
    dropped: int = 0      # longer than seq_len with overlong="drop", or nothing left to train on once cut
    tokens: int = 0       # tokens kept (no padding)
    rows: int = 0


def fit(sample: Sample, seq_len: int, overlong: Literal["truncate", "drop"], stats: PackStats) -> Sample | None:
    """The sample cut to ``seq_len`` (or None if dropped); counts what happened in ``stats``."""
    ids, labels = sample
    if len(ids) > seq_len:
        if overlong == "drop":
            stats.dropped += 1
            return None
        ids, labels = ids[:seq_len], labels[:seq_len]
        stats.truncated += 1
    if all(label == IGNORE for label in labels[1:]):
        stats.dropped += 1
        return None
    return ids, labels


def pack(samples: list[Sample], seq_len: int, pad_id: int, stats: PackStats) -> torch.Tensor:
    """Rows of shape (N, 3, seq_len): input_ids, labels, position_ids. Samples keep their order (greedy fill)."""
    rows, current = [], []
    for sample in samples:
        if sum(len(s[0]) for s in current) + len(sample[0]) > seq_len:
            rows.append(_row(current, seq_len, pad_id))
            current = []
        current.append(sample)
        stats.samples += 1
        stats.tokens += len(sample[0])
    if current:
        rows.append(_row(current, seq_len, pad_id))
    stats.rows = len(rows)
    return torch.stack(rows) if rows else torch.empty(0, 3, seq_len, dtype=torch.long)


def _row(samples: list[Sample], seq_len: int, pad_id: int) -> torch.Tensor:
    ids, labels, positions = [], [], []
    for sample_ids, sample_labels in samples:
        ids += sample_ids
        labels += [IGNORE] + sample_labels[1:]
        positions += range(len(sample_ids))
    pad = seq_len - len(ids)
    ids += [pad_id] * pad
    labels += [IGNORE] * pad
    positions += range(pad)
    return torch.tensor([ids, labels, positions], dtype=torch.long)
