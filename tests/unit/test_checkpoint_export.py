"""HF export: safetensors shards + index + config + tokenizer, loadable by ``from_pretrained`` with the
trained model's logits; the streaming plan and the CLI body."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from heavylift.checkpoint import export, save
from heavylift.checkpoint.export import plan_shards
from heavylift.checkpoint.export_cli import main as export_main
from heavylift.checkpoint.export_cli import parse_size
from heavylift.models.tokenizer import byte_tokenizer
from support.checkpointing import new_engine, train
from support.equivalence import SEQ, VOCAB


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint after 2 steps, and the trained model's logits on a fixed batch."""
    directory = tmp_path_factory.mktemp("ckpt")
    engine = new_engine()
    train(engine, range(2))
    save(engine, directory, "step-2", tokenizer=byte_tokenizer())
    x = torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(9))
    engine.pipeline.wait_all()
    with torch.no_grad():
        logits = engine.eval()(input_ids=x).logits.clone()
    engine.close()
    return directory, x, logits


def test_fp32_export_gives_the_trained_logits(trained, tmp_path):
    directory, x, logits = trained
    files = export(directory, tmp_path, "fp32", max_shard_bytes=40_000)  # several shards and an index
    names = {f.name for f in files}
    assert "model.safetensors.index.json" in names and "config.json" in names and "tokenizer.json" in names
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert "lm_head.weight" not in index["weight_map"]  # tied to the embedding, as save_pretrained writes it
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        got = model(input_ids=x).logits
    torch.testing.assert_close(got, logits, rtol=0, atol=1e-5)
    assert AutoTokenizer.from_pretrained(tmp_path)("hi").input_ids == byte_tokenizer()("hi").input_ids


def test_bf16_export_via_cli(trained, tmp_path):
    directory, x, logits = trained
    assert export_main([str(directory / "step-2"), str(tmp_path), "--dtype", "bf16"]) == 0
    assert (tmp_path / "model.safetensors").is_file()
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with torch.no_grad():
        got = model(input_ids=x).logits.float()
    assert (got - logits).abs().max() < 0.1 * logits.abs().max()


def test_export_refuses_a_corrupted_checkpoint(trained, tmp_path, capsys):
    directory, _, _ = trained
    copy = tmp_path / "ckpt"
    import shutil
    shutil.copytree(directory, copy)
    meta = copy / "step-2" / "meta.json"
    meta.write_text(meta.read_text().replace('"global_step": 2', '"global_step": 3'))
    assert export_main([str(copy), str(tmp_path / "out")]) == 2
    assert "meta.json" in capsys.readouterr().err


def test_plan_shards_and_sizes():
    assert plan_shards([("a", 4), ("b", 4), ("c", 9), ("d", 1)], 8) == [["a", "b"], ["c"], ["d"]]
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("100") == 100
