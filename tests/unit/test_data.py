"""Data: JSONL errors with file:line, response-only labels, packing without leakage, the resumable loader."""

import itertools
import json

import pytest
import torch

from heavylift.config.errors import HeavyliftError
from heavylift.data import BUNDLED, PackedLoader, PackStats, build_datasets
from heavylift.data.dataset import split_holdout, tokenize_and_pack
from heavylift.data.formats import IGNORE, encode
from heavylift.data.jsonl import read_jsonl
from heavylift.data.pack import fit, pack
from heavylift.models import build_preset, byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def write(path, lines):
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


def test_bad_json_names_file_and_line(tmp_path):
    f = write(tmp_path / "d.jsonl", [{"text": "a"}, "", '{"text": oops}'])
    with pytest.raises(HeavyliftError, match=r"d\.jsonl:3: not valid JSON"):
        read_jsonl(f)


def test_non_object_line_and_empty_and_missing_file(tmp_path):
    with pytest.raises(HeavyliftError, match=r"d\.jsonl:1: each line must be a JSON object"):
        read_jsonl(write(tmp_path / "d.jsonl", ["[1, 2]"]))
    with pytest.raises(HeavyliftError, match="is empty"):
        read_jsonl(write(tmp_path / "e.jsonl", ["", "  "]))
    with pytest.raises(HeavyliftError, match="does not exist"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_missing_field_names_line(tmp_path, tok):
    f = write(tmp_path / "d.jsonl", [{"instruction": "x", "output": "y"}, {"instruction": "x"}])
    with pytest.raises(HeavyliftError, match=r"d\.jsonl:2: missing field 'output'"):
        tokenize_and_pack(read_jsonl(f), tok, "auto", 64, "truncate")
    with pytest.raises(HeavyliftError, match=r":1: cannot tell the format"):
        tokenize_and_pack(read_jsonl(write(tmp_path / "u.jsonl", [{"foo": 1}])), tok, "auto", 64, "truncate")


def test_alpaca_loss_only_on_response(tok):
    ids, labels = encode({"instruction": "Add.", "input": "1 2", "output": "3"}, "alpaca", tok, "x:1")
    trained = [i for i, l in zip(ids, labels) if l != IGNORE]
    assert tok.decode(trained) == "3<|eos|>"
    assert tok.decode(ids).startswith("U: Add.\n\n1 2\nA: ")


def test_alpaca_without_chat_template_uses_plain_prompt():
    tok = byte_tokenizer()
    tok.chat_template = None
    ids, labels = encode({"instruction": "Add.", "output": "3"}, "alpaca", tok, "x:1")
    assert tok.decode(ids) == "### Instruction:\nAdd.\n\n### Response:\n3<|eos|>"
    assert tok.decode([i for i, l in zip(ids, labels) if l != IGNORE]) == "3<|eos|>"


def test_chat_trains_every_assistant_turn(tok):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"}, {"role": "user", "content": "bye"},
            {"role": "assistant", "content": "ciao"}]
    ids, labels = encode({"messages": msgs}, "auto", tok, "x:1")
    trained = [i if l != IGNORE else None for i, l in zip(ids, labels)]
    spans = "".join(tok.decode([i]) if i is not None else "\0" for i in trained).split("\0")
    assert [s for s in spans if s] == ["yo<|eos|>", "ciao<|eos|>"]


def test_chat_errors(tok):
    with pytest.raises(HeavyliftError, match="no assistant message"):
        encode({"messages": [{"role": "user", "content": "hi"}]}, "chat", tok, "f:7")
    with pytest.raises(HeavyliftError, match=r"f:7: messages\[0\] must be"):
        encode({"messages": [{"role": "robot", "content": "hi"}]}, "chat", tok, "f:7")
    plain = byte_tokenizer()
    plain.chat_template = None
    with pytest.raises(HeavyliftError, match="f:7: chat data needs a tokenizer with a chat template"):
        encode({"messages": [{"role": "assistant", "content": "hi"}]}, "chat", plain, "f:7")


def test_packing_positions_labels_and_padding():
    stats = PackStats()
    a, b = ([1, 2, 3], [IGNORE, 2, 3]), ([4, 5], [4, 5])
    rows = pack([a, b, ([6] * 6, [6] * 6)], seq_len=8, pad_id=0, stats=stats)
    assert rows.shape == (2, 3, 8)
    assert rows[0, 0].tolist() == [1, 2, 3, 4, 5, 0, 0, 0]
    assert rows[0, 1].tolist() == [IGNORE, 2, 3, IGNORE, 5, IGNORE, IGNORE, IGNORE]  # no cross-sample target
    assert rows[0, 2].tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    assert (stats.samples, stats.tokens, stats.rows) == (3, 11, 2)


def test_overlong_truncated_or_dropped_and_counted():
    stats = PackStats()
    long = (list(range(10)), list(range(10)))
    assert fit(long, 4, "truncate", stats) == ([0, 1, 2, 3], [0, 1, 2, 3])
    assert fit(long, 4, "drop", stats) is None
    prompt_only = ([1] * 10, [IGNORE] * 8 + [1, 1])  # response cut away entirely
    assert fit(prompt_only, 4, "truncate", stats) is None
    assert (stats.truncated, stats.dropped) == (2, 2)


def test_packed_samples_do_not_attend_to_each_other():
    model = build_preset("tiny", device="cpu").eval()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 259, (1, 7), generator=g), torch.randint(0, 259, (1, 5), generator=g)
    alone = model(input_ids=b).logits
    positions = torch.cat([torch.arange(7), torch.arange(5)])[None]
    packed = model(input_ids=torch.cat([a, b], 1), position_ids=positions).logits[:, 7:]
    torch.testing.assert_close(packed, alone)


def _rows(n):
    return torch.arange(n).repeat_interleave(3 * 4).reshape(n, 3, 4)


def test_loader_deterministic_rank_disjoint():
    rows = _rows(10)
    first = lambda loader: [b["input_ids"][:, 0].tolist() for b, _ in zip(loader, range(4))]
    assert first(PackedLoader(rows, 2, seed=3)) == first(PackedLoader(rows, 2, seed=3))
    r0, r1 = PackedLoader(rows, 1, 0, 2, seed=3), PackedLoader(rows, 1, 1, 2, seed=3)
    seen0 = {x for b, _ in zip(r0, range(5)) for x in b["input_ids"][:, 0].tolist()}
    seen1 = {x for b, _ in zip(r1, range(5)) for x in b["input_ids"][:, 0].tolist()}
    assert len(seen0) == len(seen1) == 5 and not seen0 & seen1


def test_loader_resumes_exactly():
    rows = _rows(7)
    full = PackedLoader(rows, 2, seed=1)
    expected = [b["input_ids"].tolist() for b, _ in zip(full, range(9))]  # crosses epochs (4 batches/epoch)
    part = PackedLoader(rows, 2, seed=1)
    got = [b["input_ids"].tolist() for b in itertools.islice(part, 5)]
    resumed = PackedLoader(rows, 2, seed=1)
    resumed.load_state_dict(part.state_dict())
    got += [b["input_ids"].tolist() for b, _ in zip(resumed, range(4))]
    assert got == expected


def test_holdout_split_and_bundled_data(tok, tmp_path):
    records = [(f"f:{i}", {"text": str(i)}) for i in range(20)]
    train, held = split_holdout(records, 0.1, seed=0)
    assert len(held) == 2 and not set(map(str, held)) & set(map(str, train))
    assert split_holdout(records, 0.1, seed=0) == (train, held)
    assert (BUNDLED / "train.jsonl").is_file() and (BUNDLED / "eval.jsonl").is_file()
    data = build_datasets(tok, 256)
    assert data.train_stats.samples == 400 and data.eval_stats.samples == 50
    with pytest.raises(HeavyliftError, match="no usable samples"):
        build_datasets(tok, 16, str(write(tmp_path / "t.jsonl", [{"instruction": "x" * 40, "output": "y"}] * 3)),
                       overlong="drop")
