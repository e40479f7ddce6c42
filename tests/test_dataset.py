"""data.py's dataset side: the Shapes world, the lazy JSON index, collate, the check pass and bad data."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from data import DataError, LlavaDataset, Tokenizer, collate, modality_grouped_order, scan_json
from model import IGNORE_INDEX, IMAGE_TOKEN_INDEX as IMG


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import shapes
    return shapes.generate(str(tmp_path_factory.mktemp("shapes")), seed=3, n_pretrain=40, n_instruct=60, n_eval=10,
                           n_instruct_extra=20)


def test_shapes_world_is_deterministic_and_complete(world, tmp_path):
    import shapes
    again = shapes.generate(str(tmp_path), seed=3, n_pretrain=40, n_instruct=60, n_eval=10, n_instruct_extra=20)
    for f in ("pretrain.json", "instruct.json", "eval.jsonl", "corpus.txt", "world.json", "images/instruct/000007.png"):
        assert open(os.path.join(world, f), "rb").read() == open(os.path.join(again, f), "rb").read(), f
    evals = [json.loads(line) for line in open(os.path.join(world, "eval.jsonl"))]
    assert {"question_id", "image", "text", "category", "answer"} <= set(evals[0])
    cats = {e["category"] for e in evals}
    assert {"count", "existence", "description"} <= cats <= {"color", "shape", "count", "position", "size",
                                                             "existence", "description"}
    assert all(e["text"].endswith("Answer the question using a single word or phrase.")
               for e in evals if e["category"] != "description")
    tok = Tokenizer(os.path.join(world, "tokenizer.model"))
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2) and tok.encode("é", bos=False)  # byte fallback
    instruct = json.load(open(os.path.join(world, "instruct.json")))
    assert any("image" not in s for s in instruct) and any(len(s["conversations"]) > 2 for s in instruct)
    # a detailed description is asked on its own, never after questions whose answers it could copy (shapes.chat)
    asks = lambda t: t["value"].replace("<image>", "").strip() in shapes.DESCRIBE_PROMPTS
    described = [s["conversations"] for s in instruct if any(asks(t) for t in s["conversations"])]
    assert described and all(len(conv) == 2 for conv in described)


def test_train_refuses_a_world_another_shapes_py_made(world, tmp_path, monkeypatch, capsys):
    """train.py makes data/shapes only where it is missing. One an older shapes.py made (8,000 instruction samples)
    would run the shapes-stage2 preset over a tenth of its data without a word: it is refused, in one line."""
    import shutil
    import shapes
    import train
    shutil.copytree(world, tmp_path / "data" / "shapes")
    monkeypatch.chdir(tmp_path)
    assert shapes.ensure("data/shapes") == "data/shapes"        # as generate makes it: accepted
    for stamp, why in ((None, "an older shapes.py, or cut short"), ({"version": 1}, "shapes.py version 1")):
        if stamp is None:
            os.remove("data/shapes/world.json")
        else:
            with open("data/shapes/world.json", "w") as f:
                json.dump(stamp, f)
        # (stage 0 calls the same shapes.ensure; the models are the bundled ones, as from the repository root)
        assert train.main(["--stage", "2", "--projector", os.path.join(ROOT, "models", "shapes-stage1")]) == 2
        assert capsys.readouterr().err == (f"error: data/shapes: made by {why} (this is version {shapes.VERSION}); "
                                           "make it again: python data.py shapes --out data/shapes\n")


def test_the_world_is_not_made_among_other_files(tmp_path, monkeypatch, capsys):
    """`train.py --stage 0 --data <a real dataset's json>` made the 376 MB Shapes world in that dataset's directory.
    A directory of other files is refused; one that holds only a world cut short (or nothing) is made again."""
    import shapes
    import train
    made = []
    monkeypatch.setattr(shapes, "generate", lambda out: made.append(out) or out)     # (the real one takes 16 s)
    real, partial = tmp_path / "LLaVA-Pretrain", tmp_path / "partial"
    real.mkdir()
    (real / "blip_laion_cc_sbu_558k.json").write_text("[]")
    (partial / "images" / "pretrain").mkdir(parents=True)
    (partial / "tokenizer.extra.txt").write_text("")
    (partial / ".DS_Store").write_text("")                                  # (a file browser's)
    assert train.main(["--stage", "0", "--data", str(real / "blip_laion_cc_sbu_558k.json")]) == 2
    assert capsys.readouterr().err == (f"error: {real}: not a Shapes world, and it holds other files "
                                       "(blip_laion_cc_sbu_558k.json); the world goes in a directory of its own: "
                                       "python data.py shapes --out DIR\n")
    assert os.listdir(real) == ["blip_laion_cc_sbu_558k.json"] and made == []
    assert shapes.ensure(str(partial)) == str(partial) and shapes.ensure(str(tmp_path / "new")) and len(made) == 2


def test_a_world_remade_and_cut_short_is_refused(world, tmp_path):
    """Ctrl-C while `data.py shapes` remakes a world over a whole one left the old world.json, which stamped a mix
    of old and new files as whole; now it is removed first, and Ctrl-C is one line and exit 130."""
    import shutil
    import signal
    import shapes
    out = tmp_path / "shapes"
    shutil.copytree(world, out)
    p = subprocess.Popen([sys.executable, "data.py", "shapes", "--out", str(out), "--n-pretrain", "100000"],
                         cwd=ROOT, stderr=subprocess.PIPE, text=True, bufsize=1)
    seen = ""
    while "shapes: pretrain" not in seen or "100000 [" not in seen:    # rendering has begun
        seen += p.stderr.read(64)
        assert p.poll() is None, seen[-2000:]
    p.send_signal(signal.SIGINT)
    err = p.stderr.read()
    assert p.wait(timeout=60) == 130 and "Traceback" not in err, err
    assert err.endswith(f"interrupted: {out} is incomplete\n"), err
    with pytest.raises(DataError, match="cut short"):
        shapes.ensure(str(out))


def test_a_full_disk_while_making_the_world_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    """The world is 376 MB of PNGs: a full disk midway was an OSError traceback. world.json, written last, is
    absent, so no run takes the part made for a world (shapes.ensure makes it again or refuses it)."""
    import errno

    import data
    from PIL import Image
    saved, save = [], Image.Image.save

    def fills_up(self, *a, **k):
        if len(saved) == 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append(1)
        return save(self, *a, **k)
    monkeypatch.setattr(Image.Image, "save", fills_up)
    out = tmp_path / "shapes"
    assert data.main(["shapes", "--out", str(out), "--n-pretrain", "40", "--n-instruct", "10", "--n-eval", "2",
                      "--n-instruct-extra", "0"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"error: {out}: cannot write the Shapes world (No space left " \
                                                       "on device)"
    assert not (out / "world.json").exists()


def test_extra_instruction_samples_change_nothing_before_them(world, tmp_path):
    """Stage 2's extra samples are drawn after the eval split and kept out of the corpus: with none of them, every
    other file (so the tokenizer, stage 0, stage 1 and the eval split) is the same, byte for byte."""
    import data
    fewer = str(tmp_path)                                   # through the CLI, as a user shrinks the world
    assert data.main(["shapes", "--out", fewer, "--seed", "3", "--n-pretrain", "40", "--n-instruct", "60",
                      "--n-eval", "10", "--n-instruct-extra", "0"]) == 0
    for f in ("pretrain.json", "eval.jsonl", "corpus.txt", "images/eval/000009.png"):
        assert open(os.path.join(world, f), "rb").read() == open(os.path.join(fewer, f), "rb").read(), f
    a, b = (Tokenizer(os.path.join(w, "tokenizer.model")) for w in (world, fewer))
    assert [a.sp.id_to_piece(i) for i in range(a.sp.get_piece_size())] == \
        [b.sp.id_to_piece(i) for i in range(b.sp.get_piece_size())]
    more, base = (json.load(open(os.path.join(w, "instruct.json"))) for w in (world, fewer))
    assert len(base) == 60 and len(more) == 80 and more[:60] == base
    assert len({s["id"] for s in more}) == 80 and all(os.path.exists(os.path.join(world, s["image"]))
                                                      for s in more[60:] if "image" in s)


def test_datasets_load_and_collate(world):
    tok = Tokenizer(os.path.join(world, "tokenizer.model"))
    ds = LlavaDataset(os.path.join(world, "instruct.json"), tok, world, "vicuna_v1", image_size=64)
    assert len(ds) == 60 + 20
    items = [ds[i] for i in range(8)]
    batch = collate(items, tok.pad_id, max_length=2048)
    n_img = sum(it["image"] is not None for it in items)
    assert batch["images"].shape == (n_img, 3, 64, 64) and (batch["input_ids"] == IMG).sum() == n_img
    lens = [len(it["ids"]) for it in items]
    assert batch["attention_mask"].sum(1).tolist() == lens                 # right padding
    assert (batch["labels"][~batch["attention_mask"]] == IGNORE_INDEX).all()
    first = [next(j for j, x in enumerate(it["labels"]) if x != IGNORE_INDEX) for it in items]   # 1st answer token
    T = max(first) + 1                                                      # every sample keeps an answer token
    short = collate(items, tok.pad_id, max_length=T)                        # truncation as the official collator
    assert T < max(lens) and short["input_ids"].shape == (8, T) and short["skipped"] == []
    assert short["images"] is None or len(short["images"]) == (short["input_ids"] == IMG).sum()
    # cut before any answer: the official code trains on nothing for such a sample, silently; here it is skipped
    none = collate(items, tok.pad_id, max_length=min(first))
    assert none["input_ids"].shape == (0, 0) and none["images"] is None and len(none["skipped"]) == 8
    assert all(re.fullmatch(rf"sample {i} \(id .*\): no answer token within --max-length {min(first)}", w)
               for i, w in enumerate(none["skipped"]))
    pre = LlavaDataset(os.path.join(world, "pretrain.json"), tok, world, "plain", image_size=64, aspect="crop")
    it = pre[0]
    assert it["ids"][:2] == [1, IMG] and it["labels"][:2] == [IGNORE_INDEX] * 2 and it["ids"][-1] == tok.newline_id


def test_corrupt_image_is_skipped_and_reported(world, tmp_path):
    tok = Tokenizer(os.path.join(world, "tokenizer.model"))
    samples = json.load(open(os.path.join(world, "instruct.json")))[:4]
    samples = [s for s in samples if "image" in s][:3]
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    samples[1] = dict(samples[1], image=str(tmp_path / "bad.png"))
    (tmp_path / "d.json").write_text(json.dumps(samples))
    ds = LlavaDataset(str(tmp_path / "d.json"), tok, world, image_size=64)
    batch = collate([ds[i] for i in range(3)], tok.pad_id)
    assert len(batch["input_ids"]) == 2 and len(batch["skipped"]) == 1
    assert "sample 1 (id " in batch["skipped"][0] and "bad.png: not an image file" in batch["skipped"][0]


def test_a_sample_the_official_masking_cannot_read_is_left_out_of_training(world, tmp_path, capsys):
    """The official code trains on nothing for it ("tokenization mismatch"); here it is named before the first step
    and skipped like an unreadable image. It used to stop training when first drawn, in a DataLoader worker."""
    import train
    samples = json.load(open(os.path.join(world, "instruct.json")))[:40]
    samples[5]["conversations"][-1]["value"] = "Say ASSISTANT: yes</s>"
    (tmp_path / "d.json").write_text(json.dumps(samples))
    ds = LlavaDataset(str(tmp_path / "d.json"), Tokenizer(os.path.join(world, "tokenizer.model")), world, image_size=64)
    assert len(ds.left_out) == 1 and "sample 5 (id " in ds.left_out[0]
    assert ds[5] == {"skipped": f"sample 5 (id {samples[5]['id']}): tokenization mismatch: the official masking "
                                "cannot read it ('</s>' or ' ASSISTANT: ' in a message, or a final question)"}
    assert "ids" in ds[4] and "ids" in ds[6]
    for s in samples:                          # one epoch of batches of 8 takes every sample: sample 5 is drawn
        s.pop("image", None)                   # (text-only: no vision tower needed)
    (tmp_path / "t.json").write_text(json.dumps(samples))
    assert train.main(["--stage", "2", "--projector", "models/shapes-stage1", "--data", str(tmp_path / "t.json"),
                       "--out", str(tmp_path / "out"), "--ckpt-dir", str(tmp_path / "ckpt"), "--log-dir",
                       str(tmp_path / "log"), "--batch-size", "8", "--micro-batch", "8", "--val-samples", "0",
                       "--num-workers", "0"]) == 0
    err = capsys.readouterr().err
    assert "1 sample(s) to skip; first: " in err and "sample 5 (id " in err
    assert json.load(open(tmp_path / "log" / "metrics.json"))["skipped"] == [ds[5]["skipped"]]


def test_check_reports_every_problem_with_index_and_id(world, tmp_path):
    good = json.load(open(os.path.join(world, "instruct.json")))
    img = next(s for s in good if "image" in s)
    bad = [img,
           {"id": "no-conv", "image": img["image"]},
           {"id": "repeat", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]},
           dict(img, id="missing-file", image="images/nope.png"),
           {"id": "no-token", "image": img["image"], "conversations": [{"from": "human", "value": "hi"},
                                                                         {"from": "gpt", "value": "yo"}]},
           5,                                                   # not a sample at all: was a TypeError traceback
           # the next two passed the check, then stopped training when first drawn ("tokenization mismatch"); they
           # are left out of training, as the official code trains on nothing for them
           {"id": "sep", "conversations": [{"from": "human", "value": "Say ' ASSISTANT: '"}, {"from": "gpt",
                                                                                            "value": "ok"}]},
           {"id": "open", "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                                            {"from": "human", "value": "c"}]},
           {"id": "empty", "conversations": []}]                # was: "no 'conversations' list", when it was one
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    r = subprocess.run([sys.executable, "data.py", "check", str(tmp_path / "bad.json"), "--image-folder", world],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    assert len(lines) == 8 and "Traceback" not in r.stderr
    assert lines[0].endswith("sample 1 (id no-conv): no 'conversations' list, or an empty one")
    assert "sample 2 (id repeat): roles do not alternate human, gpt (human, human)" in lines[1]
    assert "sample 3 (id missing-file): image file" in lines[2] and "nope.png not found" in lines[2]
    assert "sample 4 (id no-token): has an image but 0 turns mention <image>" in lines[3]
    assert "sample 5 (id None): not a JSON object" in lines[4]
    why = ("left out of training: the official masking cannot read it ('</s>' or ' ASSISTANT: ' in a message, or a "
           "final question)")
    assert lines[5].endswith("sample 8 (id empty): no 'conversations' list, or an empty one")
    assert lines[6].endswith(f"sample 6 (id sep): {why}") and lines[7].endswith(f"sample 7 (id open): {why}")
    assert "9 samples, 6 problem(s), 2 left out in training" in r.stderr
    with pytest.raises(DataError, match="6 problem"):
        LlavaDataset(str(tmp_path / "bad.json"), Tokenizer(os.path.join(world, "tokenizer.model")), world)


def test_malformed_json_names_file_and_line(tmp_path):
    (tmp_path / "m.json").write_text('[\n {"id": "a", "conversations": []},\n {"id": "b", \n]')
    with pytest.raises(DataError, match=r"m\.json: malformed JSON at line 4 column 1"):
        scan_json(str(tmp_path / "m.json"))
    r = subprocess.run([sys.executable, "data.py", "check", str(tmp_path / "m.json")], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    (tmp_path / "o.json").write_text('{"id": 1}')
    with pytest.raises(DataError, match="not a JSON list of samples"):
        scan_json(str(tmp_path / "o.json"))


def test_modality_grouped_order_never_mixes_within_a_group_and_is_seeded():
    lengths = [5, -3, 7, 9, -2, 4, 1, -8, 6, 3, -1, 2, 8, -4]               # > 0: image sample; < 0: text only
    g = lambda: torch.Generator().manual_seed(0)
    order = modality_grouped_order(lengths, group=3, generator=g())
    assert sorted(order) == list(range(len(lengths))) and order == modality_grouped_order(lengths, 3, g())
    # 9 image samples -> groups of 3, 3, 3; 5 text -> 3, 2. The last group of each (3 + 2) is merged into one
    # mixed group at the end, so the first 3 groups (9 indices) are pure, in shuffled order
    full = [order[i:i + 3] for i in range(0, 9, 3)]
    assert sorted(order[9:]) == order[9:] and len(order[9:]) == 5
    assert all(len({lengths[i] > 0 for i in grp}) == 1 for grp in full)
    assert all([abs(lengths[i]) for i in grp] == sorted([abs(lengths[i]) for i in grp], reverse=True) for grp in full)


@pytest.mark.parametrize("value", ["-3", "2.5", "many"])
def test_shapes_counts_must_be_whole_numbers(value, capsys):
    import data                                               # "-3" used to make an empty split without a word
    with pytest.raises(SystemExit) as e:
        data.build_parser().parse_args(["shapes", "--n-eval", value])
    assert e.value.code == 2 and f"--n-eval: '{value}' is not a whole number >= 0" in capsys.readouterr().err


def test_shapes_out_that_cannot_be_created_is_one_line(tmp_path, capsys):
    import data                                               # was a NotADirectoryError traceback
    (tmp_path / "a-file").write_text("not a directory")
    out = tmp_path / "a-file" / "shapes"
    assert data.main(["shapes", "--out", str(out), "--n-eval", "1"]) == 2
    assert capsys.readouterr().err == f"error: {out}: not a directory this process can write to\n"
