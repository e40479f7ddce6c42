"""data.py: token ids, label masks and pixels exactly as the official LLaVA code makes them.

Expected ids are built here independently, from raw sentencepiece calls on the chunks the official rules
produce (llava-recipe.md §2): the legacy tokenizer encodes the text between "</s>"s on its own, and
tokenizer_image_token encodes the text between "<image>"s on its own."""
import json
import os

import numpy as np
import pytest
import sentencepiece as spm
import torch
from PIL import Image

from data import (CONV_TEMPLATES, IMAGE_TOKEN, Tokenizer, load_image, process_image, tokenize_conversation,
                  tokenizer_image_token)
from model import IGNORE_INDEX, IMAGE_TOKEN_INDEX as IMG

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
SYSTEM = CONV_TEMPLATES["vicuna_v1"].system


@pytest.fixture(scope="module")
def llama_tok():
    return Tokenizer(os.path.join(FIX, "llama-tokenizer.model"))


@pytest.fixture(scope="module")
def small_tok(tmp_path_factory):
    """A small sentencepiece model trained here, with LLaMA's special ids and byte fallback."""
    d = tmp_path_factory.mktemp("spm")
    lines = [f"USER: <image>\nWhat colour is the {c} {s}? ASSISTANT: It is {c}.</s>" for c in
             ("red", "green", "blue", "yellow") for s in ("circle", "square", "triangle")] * 20 + [SYSTEM] * 20
    (d / "corpus.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "tok"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return Tokenizer(str(d / "tok.model"))


def test_real_llama_tokenizer_reproduces_the_47_reference_vectors(llama_tok):
    inputs = open(os.path.join(FIX, "llama-tokenizer-vectors.inp"), encoding="utf-8").read().split(
        "\n__ggml_vocab_test__\n")
    outputs = open(os.path.join(FIX, "llama-tokenizer-vectors.out"), encoding="utf-8").read().split("\n")
    pairs = list(zip(inputs, outputs))
    assert len(pairs) == 47
    for text, ids in pairs:
        assert llama_tok.encode(text, bos=False) == [int(x) for x in ids.split()], text


def test_image_placeholder_chunking_with_llama_ids(llama_tok):
    assert tokenizer_image_token("USER: <image>\n", llama_tok) == [1, 3148, 1001, 29901, 29871, -200, 29871, 13]
    assert llama_tok.encode("</s>") == [1, 2] and llama_tok.eos_id == 2 and llama_tok.pad_id == 0
    assert tokenizer_image_token("<image>\nHi", llama_tok)[:4] == [1, IMG, 29871, 13]     # BOS kept only once
    # the system prompt plus "USER: " is 35 tokens with BOS, so the image starts at position 35
    ids = tokenizer_image_token(CONV_TEMPLATES["vicuna_v1"].prompt(["<image>\nWhat is it?", None]), llama_tok)
    assert ids.index(IMG) == 35 and ids[-2:] == [13566, 29901]                          # ...ANT ":"
    # images=1: a "<image>" in the user's own text is text (chat.py and eval.py; it was a second placeholder)
    prompt = "USER: <image>\nIs <image> a tag?"
    ids = tokenizer_image_token(prompt, llama_tok, images=1)
    assert ids == llama_tok.encode("USER: ") + [IMG] + llama_tok.encode("\nIs <image> a tag?", bos=False)
    assert llama_tok.decode(ids[ids.index(IMG) + 1:]).strip() == "Is <image> a tag?"
    assert tokenizer_image_token(prompt, llama_tok, images=0) == llama_tok.encode(prompt)


def sp(tok, s):
    return tok.sp.encode(s)


def expected_v1(tok, turns, has_image):
    """ids and labels from raw sentencepiece chunks: prompt "SYS USER: <image>\\nq ASSISTANT: a</s>USER: ..."."""
    ids, labels = [1], [IGNORE_INDEX]
    for k, (q, a) in enumerate(turns):
        head = (SYSTEM + " " if k == 0 else "") + "USER: "
        if k == 0 and has_image:          # chunk boundary at the image: "... USER: " | -200 | "\nq ASSISTANT: a"
            first, head = sp(tok, head) + [IMG], "\n" + q + " ASSISTANT:"
        else:
            first, head = [], head + q + " ASSISTANT:"
        seg = sp(tok, head + " " + a)                     # one sentencepiece call per text segment
        n_head = len(sp(tok, head))
        assert seg[:n_head] == sp(tok, head)              # the prompt's tokens are a prefix of the segment's
        ids += first + seg + [2]
        labels += [IGNORE_INDEX] * (len(first) + n_head) + seg[n_head:] + [2]
    return ids, labels


def conv(turns, image_first=True):
    out = []
    for k, (q, a) in enumerate(turns):
        if k == 0:
            q = f"{IMAGE_TOKEN}\n{q}" if image_first else f"{q}\n{IMAGE_TOKEN}"
        out += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return out


def supervised_spans(tok, ids, labels):
    """Decode each run of supervised tokens: what the model is trained to say."""
    spans, cur = [], []
    for i, l in zip(ids, labels):
        if l != IGNORE_INDEX:
            assert l == i
            cur.append(i)
        elif cur:
            spans, cur = spans + [cur], []
    return spans + ([cur] if cur else [])


ONE = [("What is the colour of the circle?", "It is red.")]
THREE = [("What colour is the square?", "Blue."), ("And the circle?", "The circle is green and small."),
         ("How many shapes are there?", "There are 2 shapes.")]


@pytest.mark.parametrize("which", ["llama_tok", "small_tok"])
@pytest.mark.parametrize("turns", [ONE, THREE], ids=["1-turn", "3-turn"])
def test_v1_ids_and_masks_match_the_official_rules(request, which, turns):
    tok = request.getfixturevalue(which)
    ids, labels = tokenize_conversation(conv(turns), tok, "vicuna_v1", has_image=True)
    assert (ids, labels) == expected_v1(tok, turns, has_image=True)
    spans = supervised_spans(tok, ids, labels)
    assert [tok.decode(s) for s in spans] == [a for _, a in turns]        # the answers, nothing else
    assert all(s[-1] == 2 for s in spans)                                  # each closing </s> is supervised
    # <image> at the end of the first turn (as in LCS-558K) is moved to the front: the same ids
    assert tokenize_conversation(conv(turns, image_first=False), tok, "vicuna_v1", True) == (ids, labels)


@pytest.mark.parametrize("which", ["llama_tok", "small_tok"])
def test_text_only_sample(request, which):
    tok = request.getfixturevalue(which)
    c = [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi there!"}]
    ids, labels = tokenize_conversation(c, tok, "vicuna_v1", has_image=False)
    assert (ids, labels) == expected_v1(tok, [("Say hi.", "Hi there!")], has_image=False)
    assert IMG not in ids
    assert [tok.decode(s) for s in supervised_spans(tok, ids, labels)] == ["Hi there!"]


@pytest.mark.parametrize("which", ["llama_tok", "small_tok"])
def test_stage1_plain_drops_the_instruction_and_supervises_caption_and_newline(request, which):
    tok = request.getfixturevalue(which)
    c = [{"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
         {"from": "gpt", "value": "a red circle next to a blue square"}]
    ids, labels = tokenize_conversation(c, tok, "plain", has_image=True)
    assert ids == [1, IMG] + sp(tok, "a red circle next to a blue square\n")
    assert labels == [IGNORE_INDEX] * 2 + ids[2:]
    assert tok.decode(ids[2:-1]) == "a red circle next to a blue square" and ids[-1] == tok.newline_id


def test_multi_turn_boundaries_use_the_legacy_behaviour(llama_tok):
    """After </s>, "USER" gets sentencepiece's "▁": ▁US ER (3148, 1001), as transformers 4.31 gave the
    released models, not the non-legacy USER (11889)."""
    ids, _ = tokenize_conversation(conv(THREE), llama_tok, "vicuna_v1", True)
    after = [ids[i + 1:i + 3] for i, t in enumerate(ids[:-1]) if t == 2]
    assert after == [[3148, 1001], [3148, 1001]]


def test_inference_prompts():
    v1 = CONV_TEMPLATES["vicuna_v1"].prompt(["<image>\nQ1", "A1", "Q2", None])
    assert v1 == SYSTEM + " USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:"
    assert CONV_TEMPLATES["llava_v1"].system.startswith("A chat between a curious human")
    assert CONV_TEMPLATES["plain"].prompt(["<image>\nDescribe.", None]) == "<image>"


def test_decode_skips_ids_past_the_tokenizer(llama_tok):
    """llava-hf's LLaVA-1.5 pads its vocabulary to 32064 rows (<image>, <pad>, 62 more) over the 32000-piece
    tokenizer.model: a sampled id there was an IndexError traceback in chat.py; it has no text (HF's decode with
    skip_special_tokens, as the official eval calls it, skips <image> and <pad> too)."""
    hi = llama_tok.encode("Hi there", bos=False)
    assert len(llama_tok) == 32000 and llama_tok.decode(hi[:1] + [32000, 32001, 32063] + hi[1:]) == "Hi there"


def test_text_that_is_not_valid_unicode_is_encoded_not_a_crash(llama_tok):
    """A bad byte on stdin or in argv (Python keeps it as a lone surrogate) or a broken emoji in a JSON file
    ("\\ud83d" alone, as web-scraped text has) made sentencepiece raise a RuntimeError: chat.py's traceback, and a
    training run's, mid-epoch, from the worker that met the sample. It is now U+FFFD, as a decoder would show it."""
    for text in ["a\udcffb", json.loads('"emoji \\ud83d cut"')]:
        ids = llama_tok.encode(text)
        assert llama_tok.decode(ids).replace("\ufffd", "") == text.encode("utf-8", "ignore").decode().strip(), ids
    ids, labels = tokenize_conversation([{"from": "human", "value": "<image>\nWhat is \ud83d?"},
                                         {"from": "gpt", "value": "A cut emoji \udcff."}], llama_tok)
    assert IMG in ids and any(x != IGNORE_INDEX for x in labels)
    assert llama_tok.encode("plain text é 🙂") == llama_tok.sp.encode("plain text é 🙂", add_bos=True)   # as before


def test_masking_errors_name_the_sample(llama_tok):
    bad = [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]
    with pytest.raises(ValueError, match="sample 7: roles must alternate human, gpt"):
        tokenize_conversation(bad, llama_tok, name="sample 7")
    sneaky = [{"from": "human", "value": "Say ' ASSISTANT: ' please"}, {"from": "gpt", "value": "ok"}]
    with pytest.raises(ValueError, match="sample 8: tokenization mismatch"):   # official: silently all -100
        tokenize_conversation(sneaky, llama_tok, has_image=False, name="sample 8")


# ----------------------------------------------------------------------------------------------------- pixels
def images():
    rng = np.random.RandomState(0)
    rgb = lambda h, w: Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8))
    pal = Image.fromarray(rng.randint(0, 256, (30, 50, 3), dtype=np.uint8)).convert("P")
    pal_t = pal.copy()
    pal_t.info["transparency"] = 0                        # a palette PNG with a transparent index (hf-parity §9)
    return {"wide": rgb(45, 60), "tall": rgb(70, 33), "square": rgb(40, 40), "1x1": rgb(1, 1),
            "rgba": Image.fromarray(rng.randint(0, 256, (37, 52, 4), dtype=np.uint8), "RGBA"),
            "palette": pal, "palette_transparent": pal_t,
            "grey": Image.fromarray(rng.randint(0, 256, (50, 29), dtype=np.uint8), "L")}


@pytest.mark.parametrize("name", list(images()))
@pytest.mark.parametrize("aspect", ["pad", "crop"])
def test_pixels_equal_transformers_image_processors(tmp_path, name, aspect):
    from transformers import CLIPImageProcessorPil, LlavaImageProcessorPil
    path = str(tmp_path / f"{name}.png")
    images()[name].save(path)
    img = load_image(path)                                # .convert("RGB"), as the official code
    kw = dict(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, resample=3, do_center_crop=True,
              image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
              do_convert_rgb=False)     # already RGB; 5.x's convert_to_rgb would composite on white (§9)
    ref = (LlavaImageProcessorPil(do_pad=True, **kw) if aspect == "pad" else CLIPImageProcessorPil(**kw))(
        images=img, return_tensors="pt")["pixel_values"][0]
    got = process_image(img, 28, aspect)
    assert got.shape == (3, 28, 28) and got.dtype == torch.float32
    assert (got - ref).abs().max() == 0


@pytest.mark.parametrize("name", ["rgba", "palette", "grey"])
def test_an_image_not_in_rgb_given_straight_to_process_image_is_converted_as_load_image_would(name):
    """An image opened by hand (Image.open, not load_image) in RGBA, P or L mode was an "axes don't match array"
    ValueError or an index error; CLIPImageProcessor converts it to RGB, and so does process_image now."""
    img = images()[name]
    assert torch.equal(process_image(img, 28, "pad"), process_image(img.convert("RGB"), 28, "pad"))


def test_16_bit_grey_keeps_its_top_8_bits(tmp_path):
    # convert("RGB") clips 16-bit values at 255, so this gradient would be read as a white image
    grey = np.arange(0, 65536, 256, dtype=np.uint16).reshape(16, 16)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I;16")
    img = np.asarray(load_image(tmp_path / "g16.png"))
    assert img.shape == (16, 16, 3) and img.dtype == np.uint8
    assert (img == (grey >> 8).astype(np.uint8)[:, :, None]).all()


def test_pad_colour_is_the_truncated_mean(tmp_path):
    img = Image.new("RGB", (40, 10), (255, 0, 0))
    x = process_image(img, 28, "pad")
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    corner = x[:, 0, 0] * std + mean                       # un-normalised top-left pixel: the padding
    assert torch.allclose(corner * 255, torch.tensor([122.0, 116, 104]), atol=1e-3)
