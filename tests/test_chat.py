"""chat.py as a user runs it: a subprocess, with the bundled tiny LLaVA, one-shot, multi-turn and bad input."""
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import zlib

import pytest
import torch
from PIL import Image

import shapes
from chat import build_parser
from conftest import ROOT
from data import CONV_TEMPLATES, IMAGE_TOKEN, Tokenizer, load_image, process_image, tokenizer_image_token
from model import Llava

BUNDLED = os.path.join(ROOT, "models", "shapes-llava")
COUNT = "How many shapes are there?\n" + shapes.SHORT


def chat(*argv, stdin=None):
    return subprocess.run([sys.executable, "chat.py", *argv], cwd=ROOT, input=stdin, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def scene_png(tmp_path_factory):
    scene = [dict(shape="circle", color="red", size="large", cell=0), dict(shape="square", color="blue",
             size="small", cell=4), dict(shape="triangle", color="green", size="large", cell=8)]
    path = str(tmp_path_factory.mktemp("chat") / "three.png")
    shapes.render(scene, random.Random(0)).save(path)
    return path


def test_one_shot_answer(scene_png):
    r = chat(scene_png, "-p", COUNT, "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "3"
    assert r.stderr == ""                # for scripts and pipes: no progress bar for a model loaded in a blink


def test_a_stage_1_model_says_it_reads_no_question(scene_png):
    """The plain template (stage 1) drops the instruction: the answer is a caption whatever is asked. chat.py gave
    one without a word, which reads as a model that ignores the user."""
    note = "note: a stage-1 model (the plain template) reads no question; every answer is a caption\n"
    r = chat(scene_png, "-p", "What color is the circle?", "--model", os.path.join(ROOT, "models", "shapes-stage1"),
             "--temperature", "0", "--max-new-tokens", "12")
    assert r.returncode == 0 and note in r.stderr and r.stdout.strip(), r.stderr
    r = chat(scene_png, "-p", COUNT, "--temperature", "0")                  # a stage-2 model reads it: no note
    assert r.returncode == 0 and "note:" not in r.stderr


def test_a_literal_image_tag_in_the_prompt_is_text(scene_png):
    r = chat(scene_png, "-p", "What does <image> mean?", "--max-new-tokens", "4")   # was a ValueError traceback
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr


def test_a_photo_is_shown_upright_as_its_exif_orientation_says(tmp_path):
    # a phone stores a portrait photo sideways, with an EXIF tag that says how to turn it for showing
    upright = shapes.render([dict(shape="circle", color="red", size="large", cell=0)], random.Random(0))
    exif = Image.Exif()
    exif[0x0112] = 6                                       # orientation 6: turn 90 degrees clockwise to show
    upright.rotate(90).save(tmp_path / "phone.png", exif=exif)      # stored turned 90 degrees anticlockwise
    upright.rotate(90).save(tmp_path / "sideways.png")
    upright.save(tmp_path / "upright.png")
    answers = {name: chat(str(tmp_path / f"{name}.png"), "-p", "Where is the circle?", "--temperature", "0")
               .stdout.strip() for name in ("phone", "sideways", "upright")}
    assert "top left" in answers["upright"], answers
    assert answers["phone"] == answers["upright"] != answers["sideways"], answers


def test_ctrl_c_at_the_prompt_ends_the_chat(scene_png):
    p = subprocess.Popen([sys.executable, "chat.py", scene_png], cwd=ROOT, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = ""
    while "USER: " not in seen:                             # the model is loaded and waits for a question
        seen += p.stdout.read(1)
        assert p.poll() is None, p.stderr.read()[-2000:]
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err == "", err           # it was a KeyboardInterrupt traceback


def test_ctrl_c_during_an_answer_stops_it_and_the_chat_goes_on(scene_png):
    sampled = [scene_png, "--temperature", "5", "--seed", "0"]    # hot: hundreds of tokens before an "</s>"
    whole = chat(*sampled, stdin="Describe the image.\n\n").stdout.split("ASSISTANT: ")[1]
    p = subprocess.Popen([sys.executable, "chat.py", *sampled], cwd=ROOT, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdin.write("Describe the image.\n")
    p.stdin.flush()
    seen = ""
    while "ASSISTANT: " not in seen[:-1]:                   # the answer has begun
        seen += p.stdout.read(1)
        assert p.poll() is None, p.stderr.read()[-2000:]
    p.send_signal(signal.SIGINT)
    while not seen.endswith("USER: "):                      # it stops, and the next question is asked for
        seen += p.stdout.read(1)
        assert p.poll() is None, p.stderr.read()[-2000:]
    out, err = p.communicate("How many shapes are there?\n\n", timeout=60)
    assert p.returncode == 0 and "Traceback" not in err, err
    cut = seen.split("ASSISTANT: ")[1]
    assert len(cut) < len(whole) / 2, (cut, whole)
    assert out.count("ASSISTANT: ") == 1 and out.strip().endswith("USER:"), out   # the second turn is answered


def test_two_turns_through_stdin_keep_the_history(scene_png):
    """The second answer must be what the model says given the whole conversation, image included, run from
    scratch (the official CLI's way): that proves the KV cache carried the first turn and the image."""
    first, second = "How many shapes are there?", "What color is the circle?"      # one line each
    r = chat(scene_png, "--temperature", "0", stdin=f"{first}\n{second}\n\n")
    assert r.returncode == 0, r.stderr
    replies = [line.split("ASSISTANT: ", 1)[1] for line in r.stdout.splitlines() if "ASSISTANT: " in line]
    assert len(replies) == 2, r.stdout
    model = Llava.from_pretrained(BUNDLED, dtype=torch.float32, device="cpu")
    tok, t = Tokenizer(model.tokenizer_path), CONV_TEMPLATES["vicuna_v1"]
    ids = tokenizer_image_token(t.prompt([IMAGE_TOKEN + "\n" + first, replies[0], second, None]), tok)
    pixels = process_image(load_image(scene_png), 72, "pad")[None]
    expect = model.generate(torch.tensor([ids]), pixels, max_new_tokens=32, eos_token_id=tok.eos_id)[0].tolist()
    assert replies[1] == tok.decode(expect).strip()


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, scene_png):
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.png").write_bytes(b"")
    good = open(scene_png, "rb").read()
    (d / "truncated.png").write_bytes(good[:len(good) // 2])
    (d / "notes.png").write_text("these are my notes, not a picture\n")
    # a valid PNG header claiming 30000 x 30000 pixels (900 M, over PIL's 179 M decompression-bomb limit)
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    (d / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b""))
    (d / "incomplete").mkdir()                                  # a model dir with a config and no weights
    (d / "incomplete" / "config.json").write_text(open(os.path.join(BUNDLED, "config.json")).read())
    for name, tok in [("other-tokenizer", os.path.join(os.path.dirname(__file__), "fixtures", "llama-tokenizer.model")),
                      ("not-a-tokenizer", str(d / "notes.png"))]:   # LLaMA's 32,000 pieces: ids past the 1,024 rows
        shutil.copytree(BUNDLED, d / name)
        shutil.copyfile(tok, d / name / "tokenizer.model")
    return d


@pytest.mark.parametrize("case", ["missing image", "directory", "zero-byte file", "truncated PNG", "text file .png",
                                  "decompression bomb", "missing model dir", "incomplete model dir",
                                  "another model's tokenizer", "a tokenizer that is not one"])
def test_bad_input_is_one_line_and_exit_2(case, bad_inputs, scene_png):
    d = bad_inputs
    argv = {"missing image": [str(d / "nope.png")], "directory": [str(d)], "zero-byte file": [str(d / "empty.png")],
            "truncated PNG": [str(d / "truncated.png")], "text file .png": [str(d / "notes.png")],
            "decompression bomb": [str(d / "bomb.png")],
            "missing model dir": [scene_png, "--model", str(d / "no-such-model")],
            "incomplete model dir": [scene_png, "--model", str(d / "incomplete")],
            "another model's tokenizer": [scene_png, "--model", str(d / "other-tokenizer")],   # was an IndexError
            "a tokenizer that is not one": [scene_png, "--model", str(d / "not-a-tokenizer")]}[case]
    r = chat(*argv, "-p", "hi")
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    named = argv[2] if "model" in case or "tokenizer" in case else argv[0]
    assert named in lines[0]                                     # the message names the file at fault


@pytest.mark.parametrize("value", ["0", "-1", "x"])
def test_max_new_tokens_must_be_positive(value, scene_png):
    r = chat(scene_png, "-p", "hi", "--max-new-tokens", value)     # 0 or -1 used to print an empty answer, exit 0
    assert r.returncode == 2 and f"--max-new-tokens: '{value}' is not a whole number >= 1" in r.stderr, r.stderr


@pytest.mark.parametrize("flag,value", [("--temperature", "-0.5"), ("--temperature", "nan"), ("--top-p", "1.5"),
                                        ("--top-p", "high")])
def test_sampling_flags_must_be_in_range(flag, value, capsys):
    with pytest.raises(SystemExit) as e:                       # refused by the parser, before the model loads
        build_parser().parse_args(["x.png", flag, value])
    assert e.value.code == 2 and f"{flag}: '{value}' is not a number in [0, " in capsys.readouterr().err
    assert build_parser().parse_args(["x.png", "--temperature", "0", "--top-p", "1"]).top_p == 1.0


@pytest.mark.parametrize("value", ["gpu", "cuda:99"])
def test_a_device_this_machine_lacks_is_refused(value, capsys):
    with pytest.raises(SystemExit) as e:                       # was an AssertionError traceback from torch
        build_parser().parse_args(["x.png", "--device", value])
    assert e.value.code == 2 and f"--device: '{value}' is not a device this machine has" in capsys.readouterr().err
    assert build_parser().parse_args(["x.png", "--device", "cpu"]).device == "cpu"


def test_a_one_shot_prompt_longer_than_the_context_is_an_error(scene_png):
    r = chat(scene_png, "-p", "circle " * 600)                  # used to print nothing and exit 0
    assert r.returncode == 2 and r.stdout == "", r.stdout
    assert r.stderr.startswith("error: the prompt is ") and r.stderr.endswith("the model's context is 512\n"), r.stderr
    assert r.stderr.count("\n") == 1
