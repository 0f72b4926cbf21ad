"""Resume: an interrupted pair run, run again, writes every pair exactly once (no duplicates, no
losses), whatever the point of interruption."""

import json
import os
import random
from collections import Counter

import pytest

import mpo_fast.pairs.io as pairs_io
from mpo_fast.pairs.correctness import CorrectnessConfig, run_correctness
from mpo_fast.pairs.dropout_ntp import run_dropout_ntp
from mpo_fast.pairs.io import PairWriter, read_items


class FakeGenerator:
    """Answers that depend only on (prompt, its copy number in the call, salt): an interrupted
    run and a clean one sample the same responses, whatever the batching."""

    def __init__(self, salt: int, batch_size: int = 8, fail_on_call: int | None = None):
        self.salt, self.batch_size, self.progress = salt, batch_size, False
        self.fail_on_call, self.calls = fail_on_call, 0

    def __call__(self, prompts, desc=""):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise KeyboardInterrupt("interrupted while sampling")
        seen, out = Counter(), []
        for p in prompts:
            key = (p.question, p.prefix)
            out.append(self.response(p, seen[key]))
            seen[key] += 1
        return out

    def response(self, p, j):
        r = random.Random(f"{self.salt}|{p.question}|{p.prefix}|{j}")
        if p.prefix:
            return " and then " + " ".join(r.choice(["dots", "lines", "blue"]) for _ in range(3))
        n = int(p.question.split("#")[1].split()[0]) % 7  # the ground truth, see make_items
        u = r.random()
        if u < 0.35:
            return f"Counting, way {r.randint(0, 3)}.\nFinal Answer: {n}"
        if u < 0.8:
            return f"Miscounting, way {r.randint(0, 3)}.\nFinal Answer: {n + r.randint(1, 12)}"
        return f"It is {n} I guess ({r.randint(0, 3)})"  # no trigger: a format failure


def make_items(path, n, with_chosen=False):
    with open(path, "w") as f:
        for i in range(n):
            item = {"id": f"q{i}", "question": f"How many dots? #{i} ", "answer": str(i % 7),
                    "image": f"img/{i}.png"}
            if with_chosen:
                item["chosen"] = f"There are {i % 7} dots, spread over the page evenly."
            f.write(json.dumps(item) + "\n")
    return read_items(path)


def lines(path):
    with open(path) as f:
        return [line for line in f if line.strip()]


def run(items, gen, out, cfg):
    return run_correctness(items, gen, out, "dots", config=cfg, image_root=None, log=lambda s: None)


@pytest.fixture
def no_images(monkeypatch):
    """The fake generator needs no pixels: skip loading the (absent) image files."""
    monkeypatch.setattr("mpo_fast.pairs.correctness.load_images", lambda image, root: [])
    monkeypatch.setattr("mpo_fast.pairs.dropout_ntp.load_images", lambda image, root: [])


def check_same_output(out, ref, names=("dots.jsonl", "dots_format.jsonl", "dots.samples.jsonl")):
    for name in names:
        got, want = lines(out / name), lines(ref / name)
        assert sorted(got) == sorted(want), name  # nothing lost, nothing doubled
        if name != "dots.samples.jsonl":
            ids = [json.loads(x)["id"] for x in got]
            assert len(ids) == len(set(ids)), name
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dots"]["length"] == len(lines(out / "dots.jsonl"))
    assert meta["dots"]["annotation"] == str(out / "dots.jsonl")


@pytest.mark.parametrize("fault", ["sampling", "mid_commit", "torn_lines"])
def test_correctness_resume_exactly_once(tmp_path, no_images, monkeypatch, fault):
    salt = random.randrange(1 << 30)
    items = make_items(tmp_path / "in.jsonl", random.randint(9, 14))
    cfg = CorrectnessConfig(num_samples=6, max_pairs=4, seed=salt)
    ref, out = tmp_path / "ref", tmp_path / "out"
    ref_summary = run(items, FakeGenerator(salt), ref, cfg)
    assert ref_summary["pairs"] > 0 and ref_summary["format_pairs"] > 0  # a meaningful test

    if fault == "sampling":  # killed between two questions' commits
        with pytest.raises(KeyboardInterrupt):
            run(items, FakeGenerator(salt, fail_on_call=3), out, cfg)
    elif fault == "mid_commit":  # killed after the data lines of a question, before its ledger
        calls = {"n": 0}
        real_fsync = os.fsync

        def dying_fsync(fd):
            calls["n"] += 1
            if calls["n"] == 4 * 3 + 2:  # 3 commits done (4 fsyncs each), 2 data files synced
                raise KeyboardInterrupt("killed mid-commit")
            real_fsync(fd)

        monkeypatch.setattr(pairs_io.os, "fsync", dying_fsync)
        with pytest.raises(KeyboardInterrupt):
            run(items, FakeGenerator(salt), out, cfg)
        monkeypatch.setattr(pairs_io.os, "fsync", real_fsync)
        assert len(lines(out / "dots.progress.jsonl")) == 3
    else:  # a torn data line and a torn ledger line at the end of every file
        run(items[:5], FakeGenerator(salt), out, cfg)
        for name in ("dots.jsonl", "dots_format.jsonl", "dots.samples.jsonl",
                     "dots.progress.jsonl"):
            with open(out / name, "a") as f:
                f.write('{"id": "q9/c0", "question": "half a li')
    partial = len(lines(out / "dots.progress.jsonl"))
    assert 0 < partial < len(items)

    summary = run(items, FakeGenerator(salt), out, cfg)
    check_same_output(out, ref)
    assert summary == ref_summary
    again = run(items, FakeGenerator(salt, fail_on_call=1), out, cfg)  # all done: no sampling
    assert again == ref_summary
    check_same_output(out, ref)


def test_dropout_ntp_resume_exactly_once(tmp_path, no_images):
    salt = random.randrange(1 << 30)
    items = make_items(tmp_path / "in.jsonl", random.randint(9, 14), with_chosen=True)
    ref, out = tmp_path / "ref", tmp_path / "out"

    def go(gen, where):
        return run_dropout_ntp(items, gen, where, "dots", log=lambda s: None)

    ref_summary = go(FakeGenerator(salt, batch_size=4), ref)
    assert ref_summary["pairs"] == len(items)
    with pytest.raises(KeyboardInterrupt):
        go(FakeGenerator(salt, batch_size=4, fail_on_call=2), out)
    assert len(lines(out / "dots.jsonl")) == 4
    assert go(FakeGenerator(salt, batch_size=4), out) == ref_summary
    assert sorted(lines(out / "dots.jsonl")) == sorted(lines(ref / "dots.jsonl"))


def test_writer_refuses_files_shorter_than_the_ledger(tmp_path):
    with PairWriter(tmp_path, "x", {"pairs": ".jsonl"}) as w:
        w.commit("a", {"pairs": [{"id": "a/0", "chosen": "c", "rejected": "r"}]}, {"pairs": 1})
        with pytest.raises(ValueError, match="already committed"):
            w.commit("a", {"pairs": []}, {})
    (tmp_path / "x.jsonl").write_text("")
    with pytest.raises(RuntimeError, match="changed by hand"):
        PairWriter(tmp_path, "x", {"pairs": ".jsonl"})


def test_meta_json_merges_and_skips_empty_sets(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"other": {"root": "", "annotation": "o.jsonl",
                                                              "repeat_time": 2}}))
    with PairWriter(tmp_path, "x", {"pairs": ".jsonl", "format": "_format.jsonl"}) as w:
        w.commit("a", {"pairs": [{"id": "a/0"}, {"id": "a/1"}], "format": []}, {"pairs": 2})
        w.write_meta({"pairs": "x", "format": "x_format"}, root=tmp_path / "imgs", repeat_time=0.5)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert set(meta) == {"other", "x"}  # the empty format set is not listed
    assert meta["x"] == {"root": str((tmp_path / "imgs").resolve()),
                         "annotation": str((tmp_path / "x.jsonl").resolve()),
                         "repeat_time": 0.5, "length": 2}
