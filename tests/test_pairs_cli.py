"""`mpo-fast pairs` / `python -m mpo_fast.pairs` on a tiny text model saved to disk."""

import argparse
import json

import pytest

from mpo_fast.pairs.cli import add_parser, main
from mpo_fast.pairs.tiny import build_tokenizer


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder = tmp_path_factory.mktemp("tiny_lm")
    tok = build_tokenizer(["What is two plus two? Two plus two is four. Final Answer: 4"])
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    Qwen2ForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_items(path, with_answer):
    with open(path, "w") as f:
        for i in range(3):
            item = {"id": f"t{i}", "question": f"What is {i} plus two?"}
            if with_answer:
                item["answer"] = str(i + 2)
            else:
                item["chosen"] = f"Well, {i} plus two makes {i + 2}, as anyone can count."
            f.write(json.dumps(item) + "\n")


def test_correctness_cli(tmp_path, tiny_lm):
    write_items(tmp_path / "q.jsonl", with_answer=True)
    argv = ["correctness", "--model", str(tiny_lm), "--data", str(tmp_path / "q.jsonl"),
            "--out", str(tmp_path / "out"), "--num-samples", "3", "--max-new-tokens", "5",
            "--batch-size", "4", "--no-progress", "--device", "cpu"]
    assert main(argv) == 0
    samples = (tmp_path / "out" / "q.samples.jsonl").read_text().splitlines()
    assert len(samples) == 9
    ledger = (tmp_path / "out" / "q.progress.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in ledger] == ["t0", "t1", "t2"]
    assert main(argv) == 0  # resumed: all done, nothing added
    assert len((tmp_path / "out" / "q.samples.jsonl").read_text().splitlines()) == 9
    assert (tmp_path / "out" / "meta.json").exists()


def test_dropout_ntp_cli(tmp_path, tiny_lm):
    write_items(tmp_path / "open.jsonl", with_answer=False)
    assert main(["dropout-ntp", "--model", str(tiny_lm), "--data", str(tmp_path / "open.jsonl"),
                 "--out", str(tmp_path / "out"), "--name", "dn", "--max-new-tokens", "6",
                 "--no-progress", "--device", "cpu"]) == 0
    pairs = [json.loads(x) for x in (tmp_path / "out" / "dn.jsonl").read_text().splitlines()]
    assert len(pairs) == 3
    for p in pairs:
        prefix = " ".join(p["chosen"].split()[:5])  # 11 words -> the first 5
        assert p["rejected"].startswith(prefix) and "image" not in p
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["dn"]["length"] == 3 and meta["dn"]["root"] == ""


def test_add_parser_mounts_under_a_top_level_cli():
    top = argparse.ArgumentParser(prog="mpo-fast")
    add_parser(top.add_subparsers(dest="command"))
    args = top.parse_args(["pairs", "correctness", "--model", "m", "--data", "d.jsonl",
                           "--out", "o"])
    assert args.command == "pairs" and args.pairs_command == "correctness"
    assert args.num_samples == 32 and args.max_pairs == 15 and args.temperature == 0.7
    assert args.top_k == 50 and callable(args.func)
    args = top.parse_args(["pairs", "dropout-ntp", "--model", "m", "--data", "d", "--out", "o"])
    assert args.ratio == 0.5
    with pytest.raises(SystemExit):
        top.parse_args(["pairs"])  # a subcommand is required
