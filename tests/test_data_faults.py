"""Hostile and broken data (issue 17): every case is a counted skip naming `file:line` under
on_error / on_bad_data "skip" and a clear error under "raise", never a crash; image paths stay
inside the dataset root; a reference cache that is not what this run would write is recomputed.
"""

from __future__ import annotations

import importlib
import json
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from mpo_fast.data import DataError, Example, PairTokenizer, collate, load_dataset, tiny
from mpo_fast.train import cli, reference
from mpo_fast.train.config import TrainConfig
from mpo_fast.train.distributed import Context
from mpo_fast.train.loop import load_examples, train
from mpo_fast.train.model import set_attention

CPU = Context("none", 0, 1, torch.device("cpu"))
NO_AMP = lambda: torch.autocast("cpu", enabled=False)
QUIET = lambda *a: None
COLLATE = importlib.import_module("mpo_fast.data.collate")  # the module (the package exports
# a function of the same name)
# The tiny template, refusing any role but user / assistant / system (as strict templates do).
STRICT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] not in ['user', 'assistant', 'system'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}")


@pytest.fixture(scope="module")
def tok():
    return tiny.tiny_tokenizer()


@pytest.fixture(scope="module")
def strict_tok():
    t = tiny.tiny_tokenizer()
    t.chat_template = STRICT_TEMPLATE
    return t


def _image(path, seed=0, size=(20, 30)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
    return path


def _bomb(path, width=30000, height=30000):
    """A 60-byte PNG whose header claims width x height pixels (a decompression bomb)."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def _jsonl(path, rows, encoding="utf-8"):
    """Rows as lines; a bytes row is written as it is."""
    with open(path, "wb") as f:
        for k, row in enumerate(rows):
            line = row if isinstance(row, bytes) else json.dumps(row).encode()
            f.write((line.decode().encode(encoding) if k == 0 else line) + b"\n")
    return path


def _row(i):
    return {"prompt": f"largest of {i} {i + 1}", "chosen": str(i + 1), "rejected": str(i)}


def _both_ways(path, source, reason, **kw):
    """Under skip: loaded without the bad row, one counted skip naming ``source``; under
    raise: a DataError naming it. Returns the skip run's examples."""
    examples, report = load_dataset(str(path), **kw)
    assert len(report.skipped) == 1, report.skipped
    err = report.skipped[0]
    assert err.source == source and reason in err.reason, err
    assert "1 bad lines skipped" in report.summary() and report.loaded == len(examples)
    with pytest.raises(DataError, match=f"^{source}: .*{reason}"):
        load_dataset(str(path), on_error="raise", **kw)
    return examples


# --------------------------------------------------------------------------- reading files


def test_a_non_utf8_line_is_a_bad_row_with_its_line_number(tmp_path):
    bad = b'{"prompt": "largest of 1 \xff\xfe", "chosen": "1", "rejected": "2"}'
    path = _jsonl(tmp_path / "p.jsonl", [_row(1), bad, _row(3)])
    examples = _both_ways(path, f"{path}:2", "not UTF-8")
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:3"]  # the rest still read
    as_list = tmp_path / "p.json"
    as_list.write_bytes(b'[\n{"prompt": "a", "chosen": "b", "rejected": "c"},\n' + bad + b"]")
    with pytest.raises(DataError, match=rf"^{as_list}:3: not UTF-8"):
        load_dataset(str(as_list))


def test_deeply_nested_json_is_a_bad_row(tmp_path):
    deep = {"prompt": "largest of 1 2", "chosen": "2", "rejected": "1"}
    line = json.dumps(deep)[:-1] + ', "extra": ' + "[" * 100_000 + "]" * 100_000 + "}"
    path = _jsonl(tmp_path / "p.jsonl", [_row(1), _row(2), line.encode()])
    _both_ways(path, f"{path}:3", "nested too deeply")


def test_a_utf8_bom_does_not_cost_the_first_row(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [_row(1), _row(2)], encoding="utf-8-sig")
    assert path.read_bytes()[:3] == b"\xef\xbb\xbf"
    examples, report = load_dataset(str(path), on_error="raise")
    assert [e.chosen for e in examples] == ["2", "3"] and not report.skipped
    as_list = tmp_path / "p.json"
    as_list.write_text(json.dumps([_row(5)]), encoding="utf-8-sig")
    assert load_dataset(str(as_list), on_error="raise")[0][0].chosen == "6"
    (tmp_path / "meta.json").write_text(json.dumps({"d": {"annotation": "ann.jsonl"}}),
                                        encoding="utf-8-sig")
    _jsonl(tmp_path / "ann.jsonl", [{"question": "q ?", "chosen": "a", "rejected": "b"}],
           encoding="utf-8-sig")
    mmpr, _ = load_dataset(str(tmp_path / "meta.json"), on_error="raise")
    assert [e.chosen for e in mmpr] == ["a"]


# --------------------------------------------------------------------------- MMPR meta.json


BAD_ENTRIES = [
    ([1, 2], "an entry must be an object"),
    ({"root": "."}, "missing 'annotation'"),
    ({"annotation": 7}, "'annotation' must be a path"),
    ({"annotation": "nope.jsonl"}, "'annotation' file .*nope.jsonl does not exist"),
    ({"annotation": "ann.jsonl", "root": ["a"]}, "'root' must be a path"),
    ({"annotation": "ann.jsonl", "repeat_time": "twice"}, "'repeat_time' must be a number > 0, "
                                                          "got 'twice'"),
    ({"annotation": "ann.jsonl", "repeat_time": -2}, "'repeat_time' must be a number > 0, got -2"),
    ({"annotation": "ann.jsonl", "repeat_time": 0}, "'repeat_time' must be a number > 0"),
    ({"annotation": "ann.jsonl", "repeat_time": None}, "'repeat_time' must be a number > 0"),
    ({"annotation": "ann.jsonl", "repeat_time": True}, "'repeat_time' must be a number > 0"),
]


@pytest.mark.parametrize("entry, reason", BAD_ENTRIES)
@pytest.mark.parametrize("on_error", ["skip", "raise"])
def test_one_bad_meta_entry_refuses_the_meta_naming_entry_and_field(tmp_path, entry, reason,
                                                                    on_error):
    _jsonl(tmp_path / "ann.jsonl", [{"question": "q ?", "chosen": "a", "rejected": "b"}])
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"good": {"root": ".", "annotation": "ann.jsonl",
                                         "repeat_time": 1}, "broken": entry}))
    with pytest.raises(DataError, match=rf"^{meta}\['broken'\]: {reason}"):
        load_dataset(str(meta), on_error=on_error)


def test_repeat_time_as_a_numeric_string_still_reads(tmp_path):
    _jsonl(tmp_path / "ann.jsonl", [{"question": "q ?", "chosen": "a", "rejected": "b"}])
    (tmp_path / "meta.json").write_text(json.dumps(
        {"d": {"annotation": "ann.jsonl", "repeat_time": "3"}}))
    examples, _ = load_dataset(str(tmp_path / "meta.json"), on_error="raise")
    assert len(examples) == 3


# --------------------------------------------------------------------------- image paths


@pytest.fixture
def escapes(tmp_path):
    """A dataset root with one image inside, one outside, and MMPR rows reaching it by ``..``,
    an absolute path, a symlink to outside, and (fine) a symlink to inside."""
    root = tmp_path / "data"
    (root / "imgs").mkdir(parents=True)
    _image(root / "imgs" / "in.png")
    outside = _image(tmp_path / "secret.png", 1)
    os.symlink(outside, root / "imgs" / "link-out.png")
    os.symlink(root / "imgs" / "in.png", root / "imgs" / "link-in.png")
    rows = [{"image": name, "question": "<image> what ?", "chosen": "red", "rejected": "blue"}
            for name in ("in.png", "../../secret.png", str(outside), "link-out.png",
                         "link-in.png")]
    ann = _jsonl(root / "ann.jsonl", rows)
    (root / "meta.json").write_text(json.dumps({"d": {"root": "imgs",
                                                      "annotation": "ann.jsonl"}}))
    return root / "meta.json", ann


def test_image_paths_leaving_the_root_are_bad_rows(escapes):
    meta, ann = escapes
    examples, report = load_dataset(str(meta))
    assert [e.source for e in examples] == [f"{ann}:1", f"{ann}:5"]  # inside, link inside
    assert [e.source for e in report.skipped] == [f"{ann}:{n}" for n in (2, 3, 4)]
    assert all("outside the dataset root" in e.reason and "secret.png" in e.reason
               for e in report.skipped)
    with pytest.raises(DataError, match=rf"^{ann}:2: image .*outside the dataset root"):
        load_dataset(str(meta), on_error="raise")
    allowed, report = load_dataset(str(meta), on_error="raise", allow_outside_root=True)
    assert len(allowed) == 5 and not report.skipped


def test_hf_image_paths_are_confined_to_the_files_folder(tmp_path):
    (tmp_path / "d").mkdir()
    _image(tmp_path / "d" / "ok.png")
    _image(tmp_path / "up.png")
    rows = [{"prompt": "<image> what ?", "chosen": "a", "rejected": "b", "images": [img]}
            for img in ("ok.png", "../up.png")]
    path = _jsonl(tmp_path / "d" / "p.jsonl", rows)
    _both_ways(path, f"{path}:2", "outside the dataset root")


def test_allow_outside_root_is_a_train_flag_that_reaches_the_loader(escapes):
    meta, _ = escapes
    assert TrainConfig().allow_outside_root is False
    assert cli.build_parser().parse_args(["--allow-outside-root"]).allow_outside_root is True
    said = []
    cfg = TrainConfig(model="given", data=str(meta))
    assert len(load_examples(cfg, said.append)) == 2 and "3 bad lines skipped" in said[0]
    cfg = TrainConfig(model="given", data=str(meta), allow_outside_root=True)
    assert len(load_examples(cfg, QUIET)) == 5


# --------------------------------------------------------------------------- tokenizing


def test_tokenizer_faults_name_the_pair(tok, strict_tok, tmp_path, monkeypatch):
    """Each fault met while tokenizing is a DataError naming the pair's file:line."""
    _, proc = tiny.tiny_internvl(tok, image_size=56)
    vl = lambda t, max_length=64: PairTokenizer(t, proc, max_length=max_length)
    img = str(_image(tmp_path / "ok.png"))
    with_image = lambda path: Example("<image> what ?", "red", "blue", (path,), "d.jsonl:4")
    cases = [
        (PairTokenizer(tok, max_length=64), with_image(img), "no processor"),
        (vl(tok), with_image(str(_bomb(tmp_path / "bomb.png"))), "DecompressionBombError"),
        (vl(tok), with_image(str(tmp_path / "gone.png")), "cannot read image"),
        (vl(strict_tok), Example(({"role": "narrator", "content": "largest of 1 2"},), "2",
                                 "1", (), "d.jsonl:4"), "chat template rejects .*narrator"),
        (vl(tok), Example("largest of 1 2", "apple", "pear", (), "d.jsonl:4"),
         "same tokens once tokenized"),  # both unknown words: <unk>
        (vl(tok, 12), Example("largest of 1 2 3 4 5 6 7 8 9 10", "7 3", "7 5", (), "d.jsonl:4"),
         "same tokens once tokenized and truncated to max_length=12"),
    ]
    for tokenize, example, reason in cases:
        with pytest.raises(DataError, match=f"^d.jsonl:4: .*{reason}"):
            tokenize(example)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 20 x 30 = 600: PIL's warning zone
    with pytest.raises(DataError, match=r"d.jsonl:4: .*DecompressionBombWarning"):
        vl(tok)(with_image(img))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # a library switched PIL's check off
    with pytest.raises(DataError, match=r"d.jsonl:4: .*30000 x 30000, more than MAX_IMAGE_PIX"):
        vl(tok)(with_image(str(tmp_path / "bomb.png")))
    monkeypatch.setattr(COLLATE, "MAX_IMAGE_PIXELS", 599)
    with pytest.raises(DataError, match=r"d.jsonl:4: .*30 x 20, more than MAX_IMAGE_PIXELS=599"):
        vl(tok)(with_image(img))
    monkeypatch.setattr(COLLATE, "MAX_IMAGE_PIXELS", 600)
    assert vl(tok)(with_image(img)).pixel_values.shape[0] == 1


def cfg_for(path, **kw):
    base = dict(model="given", data="given", output_dir=str(path), max_steps=1,
                pairs_per_step=6, max_tokens=4096, max_length=64, lr=1e-3, warmup_ratio=0.0,
                progress=False)
    return TrainConfig(**{**base, **kw})


def test_a_run_skips_and_counts_every_tokenizing_fault_or_stops_on_it(strict_tok, tmp_path):
    _image(tmp_path / "a.png")
    _bomb(tmp_path / "bomb.png")
    image_row = lambda name: {"prompt": "<image> what color ?", "chosen": "red",
                              "rejected": "blue", "images": [name]}
    rows = [image_row("a.png"), image_row("bomb.png"),
            {"prompt": [{"role": "narrator", "content": "largest of 1 2"}], "chosen": "2",
             "rejected": "1"},
            {"prompt": "largest of 1 2", "chosen": "apple", "rejected": "pear"},
            _row(5), image_row("a.png")]
    path = _jsonl(tmp_path / "p.jsonl", rows)
    examples, _ = load_dataset(str(path), on_error="raise")  # fine as text
    model, proc = tiny.tiny_internvl(strict_tok, image_size=56)
    said = []
    r = train(cfg_for(tmp_path / "skip"), model=model, tokenizer=strict_tok, processor=proc,
              examples=examples, log=said.append)
    assert r.history[0]["pairs"] == 3 and np.isfinite(r.history[0]["loss"])
    for n, reason in ((2, "DecompressionBombError"), (3, "unknown role narrator"),
                      (4, "same tokens")):
        assert any(f"{path}:{n}: " in s and reason in s for s in said), (n, said)
    assert "skipped 3 bad pairs while training" in said
    state = json.loads((tmp_path / "skip" / "checkpoints" / "step-00000001" /
                        "trainer_state.json").read_text())
    assert state["bad_pairs"] == 3
    with pytest.raises(DataError, match=rf"^{path}:[234]: "):
        train(cfg_for(tmp_path / "raise", on_bad_data="raise"), model=model,
              tokenizer=strict_tok, processor=proc, examples=examples, log=QUIET)


def test_images_for_a_text_only_model_are_skipped_not_a_crash(tok, tmp_path):
    """Every pair has an image and the model has no processor: every step is empty."""
    _image(tmp_path / "a.png")
    rows = [{"prompt": f"<image> largest of {i} 9", "chosen": "9", "rejected": str(i),
             "images": ["a.png"]} for i in range(8)]
    path = _jsonl(tmp_path / "p.jsonl", rows)
    examples, _ = load_dataset(str(path))
    model = tiny.tiny_lm(tok, hidden=32, layers=1, heads=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    said = []
    r = train(cfg_for(tmp_path / "skip", pairs_per_step=4, max_steps=2), model=model,
              tokenizer=tok, examples=examples, log=said.append)
    assert r.step == 2 and not any("loss" in h for h in r.history)  # no pair trained on
    skipped = [s for s in said if s.startswith("skipping bad pair")]
    assert sorted(skipped) == sorted(f"skipping bad pair: {path}:{i + 1}: the pair has images "
                                     "but the model has no processor (a text-only model?)"
                                     for i in range(8))
    assert "skipped 8 bad pairs while training" in said
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n  # no update from an empty step
    with pytest.raises(DataError, match=rf"^{path}:\d: the pair has images but the model has "
                                        "no processor"):
        train(cfg_for(tmp_path / "raise", pairs_per_step=4, on_bad_data="raise"), model=model,
              tokenizer=tok, examples=examples, log=QUIET)


# --------------------------------------------------------------------------- reference cache


def test_a_tampered_reference_cache_is_detected_and_recomputed(tok, tmp_path, monkeypatch):
    model = tiny.tiny_lm(tok, hidden=32, layers=1, heads=2, seed=torch.initial_seed() % 1000)
    set_attention(model, True)
    examples = tiny.make_task(10, seed=torch.initial_seed() % 1000)
    tokenize = PairTokenizer(tok, max_length=32)
    key = reference.fingerprint(model, reference.data_key(examples, tokenize), {})
    build = lambda key=key: reference.CachedReference.build(
        model, (lambda i: tokenize(examples[i], i), len(examples)), str(tmp_path), key, CPU,
        max_tokens=64, pad_id=tokenize.pad_id, packed=True, autocast=NO_AMP)
    good = build()
    path = good.path
    pairs = [tokenize(examples[i], i) for i in (3, 0, 8)]
    batch = collate(pairs, pad_id=tokenize.pad_id)
    want = reference.FrozenCopy(model, CPU, NO_AMP).logps(batch)

    saved = torch.load(path, weights_only=True)
    marker = tmp_path / "pwned"
    tampered = {
        "a bare table (someone else's)": torch.full((10, 2), 999.0),
        "an edited table": {**saved, "table": saved["table"] + 999},
        "another run's file": {**saved, "key": "0" * 16},
        "a short table": {**saved, "table": saved["table"][:5]},
        "a pickle that runs code": _Evil(str(marker)),
    }
    for what, content in tampered.items():
        torch.save(content, path)
        with pytest.warns(UserWarning, match=f"reference cache {path} is not used: .*recomputing"):
            again = build()
        assert not marker.exists(), what  # never unpickled with code
        for a, b in zip(again.logps(batch), want, strict=True):
            assert torch.allclose(a, b, rtol=1e-5), what  # the real numbers, not 999
    torch.save(_Evil(str(marker)), path)
    with pytest.warns(UserWarning, match="objects other than tensors"):
        build()
    truncated = open(path, "rb").read()
    open(path, "wb").write(truncated[: len(truncated) // 2])
    with pytest.warns(UserWarning, match="cannot be read"):
        build()

    def no_forward(*a, **k):
        raise AssertionError("an intact cache is read, not recomputed")

    monkeypatch.setattr(reference, "sequence_logps", no_forward)
    assert torch.equal(build().table, good.table)  # the rewritten file is trusted again


class _Evil:
    """Unpickling this would create the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_the_cache_fingerprint_covers_settings_and_model_config(tok, tmp_path):
    """reference.make keys the cache by the packing and the model's config, not only by the
    weights and the data: the same weights under another config get their own file."""
    examples = tiny.make_task(8, seed=2)
    tokenize = PairTokenizer(tok, max_length=32)
    made = {}
    for name, packing, eps in (("packed", True, 1e-6), ("padded", False, 1e-6),
                               ("config", True, 1e-3)):
        model = tiny.tiny_lm(tok, hidden=32, layers=1, heads=2)
        model.config.rms_norm_eps = eps
        set_attention(model, packing)
        cfg = cfg_for(tmp_path, reference="cached", packing=packing, max_length=32)
        made[name] = reference.make(cfg, model, examples, tokenize, CPU, str(tmp_path), NO_AMP)
    assert len({m.path for m in made.values()}) == 3
    assert all(os.path.basename(m.path).startswith("ref_logps-") for m in made.values())
