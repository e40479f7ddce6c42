"""
The Shapes world: a deterministic synthetic image world that runs the whole LLaVA recipe, in miniature, on a CPU.

Real LLaVA starts from CLIP and Vicuna and trains on COCO-class photos; none of that fits a laptop without a
GPU. Here each 72 x 72 image holds 1-4 coloured shapes on a 3 x 3 grid (one per cell, so the tiny ViT's 24-pixel
patches see one object each), and the data come in exactly the official formats (DESIGN.md §5), so the same
data.py / train.py code paths run on it:

    pretrain.json  caption pairs with varied instructions          (like LCS-558K, stage 1)
    instruct.json  multi-turn Q&A, detailed descriptions, text-only (like llava_v1_5_mix665k, stage 2)
    eval.jsonl     official question format + reference answers    (like the eval question files)
    corpus.txt     captions, descriptions, text-only chats: the tokenizer's and stage-0 LLM's text
    tokenizer.model  a sentencepiece BPE with LLaMA's special ids (<unk>=0, <s>=1, </s>=2) and byte fallback
    world.json     the version of this file that made them, and its settings (train.py refuses another version's)

    python data.py shapes --out data/shapes
"""
import contextlib
import json
import os
import random

from PIL import Image, ImageDraw
from tqdm import tqdm

SHAPES = ["circle", "square", "triangle", "diamond"]
COLORS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 70, 220), "yellow": (240, 200, 0),
          "purple": (140, 40, 180), "orange": (250, 120, 0)}
SIZES = {"small": 6.0, "large": 10.0}                    # radius in pixels on the 72-pixel canvas (24-pixel cells)
CELLS = ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"]
SHORT = "Answer the question using a single word or phrase."   # the official short-answer suffix
VERSION = 2                         # world.json's; 2 (2026-12-03): 80,000 instruction samples, not 8,000
CAPTION_PROMPTS = [                                      # the instruction list of LCS-558K (LLaVA paper, Table 8)
    "Describe the image concisely.", "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.", "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.", "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.", "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented."]
DESCRIBE_PROMPTS = ["Describe the image in detail.", "What do you see in this image? Describe every shape.",
                    "Give a detailed description of the picture."]


def random_scene(rng):
    cells = rng.sample(range(9), rng.randint(1, 4))
    return [dict(shape=rng.choice(SHAPES), color=rng.choice(list(COLORS)), size=rng.choice(list(SIZES)), cell=c)
            for c in sorted(cells)]                       # row-major: the order every text lists them in


def twin(scene, rng):
    """The same scene with one attribute of one object changed: a hard negative for contrastive training."""
    scene = [dict(o) for o in scene]
    o = rng.choice(scene)
    key = rng.choice(["shape", "color", "size", "cell"])
    free = [c for c in range(9) if c not in {x["cell"] for x in scene}]
    options = {"shape": SHAPES, "color": list(COLORS), "size": list(SIZES), "cell": free}[key]
    o[key] = rng.choice([v for v in options if v != o[key]] or [o[key]])
    return sorted(scene, key=lambda x: x["cell"])


def render(scene, rng, size=72):
    img = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    step = size / 3
    for o in scene:
        r = SIZES[o["size"]] * size / 72
        cx = (o["cell"] % 3 + 0.5) * step + rng.uniform(-1.5, 1.5)
        cy = (o["cell"] // 3 + 0.5) * step + rng.uniform(-1.5, 1.5)
        fill = COLORS[o["color"]]
        if o["shape"] == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o["shape"] == "square":
            d.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=fill)
        elif o["shape"] == "triangle":
            d.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
        else:
            d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    return img


def where(o):
    c = CELLS[o["cell"]]
    return "in the center" if c == "center" else f"on the {c}" if c in ("left", "right") else f"at the {c}"


def caption(scene, rng):                                 # short, BLIP-style
    parts = [f"a {o['size']} {o['color']} {o['shape']}" + (f" {where(o)}" if rng.random() < 0.5 else "")
             for o in scene]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def describe(scene):                                     # detailed, canonical: one sentence per shape
    n = len(scene)
    head = "There is 1 shape in the image." if n == 1 else f"There are {n} shapes in the image."
    return " ".join([head] + [f"A {o['size']} {o['color']} {o['shape']} {where(o)}." for o in scene])


def questions(scene, rng):
    """One (category, question, short answer, sentence answer) per category that has an unambiguous question."""
    qs = [("count", "How many shapes are there?", str(len(scene)),
           f"There {'is 1 shape' if len(scene) == 1 else f'are {len(scene)} shapes'}.")]
    o = rng.choice(scene)
    if sum(x["shape"] == o["shape"] for x in scene) == 1:
        qs.append(("color", f"What color is the {o['shape']}?", o["color"], f"The {o['shape']} is {o['color']}."))
    if sum(x["color"] == o["color"] for x in scene) == 1:
        qs.append(("shape", f"What shape is the {o['color']} object?", o["shape"],
                   f"The {o['color']} object is a {o['shape']}."))
    same = sum(x["color"] == o["color"] and x["shape"] == o["shape"] for x in scene) == 1
    name = f"{o['color']} {o['shape']}"
    if same:
        qs.append(("position", f"Where is the {name}?", CELLS[o["cell"]], f"The {name} is {where(o)}."))
        qs.append(("size", f"Is the {name} small or large?", o["size"], f"The {name} is {o['size']}."))
    if rng.random() < 0.5:                               # existence: yes and no equally often
        c, s = o["color"], o["shape"]
        qs.append(("existence", f"Is there a {c} {s} in the image?", "yes", f"Yes, there is a {c} {s}."))
    else:
        absent = [(c, s) for c in COLORS for s in SHAPES if not any(x["color"] == c and x["shape"] == s for x in scene)]
        c, s = rng.choice(absent)
        qs.append(("existence", f"Is there a {c} {s} in the image?", "no", f"No, there is no {c} {s}."))
    col = rng.choice(list(COLORS))
    k = sum(x["color"] == col for x in scene)
    qs.append(("count", f"How many {col} shapes are there?", str(k), f"There {'is' if k == 1 else 'are'} {k} {col} "
               f"shape{'' if k == 1 else 's'}."))
    return qs


TEXT_ONLY = [  # text-only chats (mix665k's ShareGPT part): knowledge of the world without an image
    ("What colors can the shapes be?", "Red, green, blue, yellow, purple or orange."),
    ("Which shapes can appear in a picture?", "Circles, squares, triangles and diamonds."),
    ("How many corners does a triangle have?", "A triangle has 3 corners."),
    ("How many corners does a square have?", "A square has 4 corners."),
    ("Does a circle have corners?", "No, a circle has no corners."),
    ("What sizes can a shape have?", "A shape is either small or large."),
    ("Where can a shape be in a picture?", "At the top left, top, top right, left, center, right, bottom left, "
                                           "bottom or bottom right.")]


def chat(scene, rng):
    """A conversation about one image: 1-4 question turns, mixing short-answer and sentence-answer ones, or a
    detailed description on its own (like LLaVA-Instruct's). Why never a description after the questions: its
    answer could be copied from the answers before it, and the model learns to copy instead of to look (eval asks
    for it alone): 78.5% overall and 31.0% of descriptions right with it after them, 85.1% and 64.3% with it alone
    (FINDINGS.md)"""
    turns = questions(scene, rng)
    rng.shuffle(turns)
    conv = []
    for cat, q, short, sentence in turns[:rng.randint(1, 4)]:
        use_short = rng.random() < 0.6
        conv += [{"from": "human", "value": f"{q}\n{SHORT}" if use_short else q},
                 {"from": "gpt", "value": short if use_short else sentence}]
    # a description replaces the questions drawn above: drawing them either way keeps the random stream, and with
    # it the corpus, the tokenizer, stage 0 and the eval split, what it was when the description followed them
    if rng.random() < 0.3:
        conv = [{"from": "human", "value": rng.choice(DESCRIBE_PROMPTS)}, {"from": "gpt", "value": describe(scene)}]
    conv[0]["value"] = "<image>\n" + conv[0]["value"] if rng.random() < 0.5 else conv[0]["value"] + "\n<image>"
    return conv


def text_chat(scene, rng):
    """A text-only chat in the vicuna_v1 template where the user *describes* a scene and asks about it, meant to
    teach the stage-0 language model to answer from its context, as Vicuna can. (LLaVA's own instruction data was
    written by a text-only GPT-4 from captions the same way, paper §3.) In stage 0's 400 steps it does not learn
    that: given a described scene it names colours, shapes and positions at chance (FINDINGS.md). What it
    does learn from them is the template and the answers' form: each is a word of the kind asked for."""
    from data import CONV_TEMPLATES
    turns = questions(scene, rng)
    rng.shuffle(turns)
    msgs = []
    for cat, q, short, sentence in turns[:rng.randint(1, 3)]:
        use_short = rng.random() < 0.6
        msgs += [f"{q}\n{SHORT}" if use_short else q, short if use_short else sentence]
    if rng.random() < 0.3:
        msgs += [rng.choice(CAPTION_PROMPTS), caption(scene, rng)]
    msgs[0] = describe(scene) + "\n" + msgs[0]
    return CONV_TEMPLATES["vicuna_v1"].prompt(msgs)


def generate(out, seed=0, n_pretrain=8000, n_instruct=8000, n_eval=300, n_instruct_extra=72000, vocab_size=1024,
             image_size=72):
    """Write the whole world under `out`; the same seed gives the same files, byte for byte. Stage 2 reads
    n_instruct + n_instruct_extra instruction samples; the extra ones are drawn after the eval split and kept out of
    the stage-0 corpus, so that the tokenizer, the corpus, stage 0, stage 1 and the eval split do not depend on
    how many there are (why so many: stage 2 sees each sample once, as LLaVA's does; FINDINGS.md)."""
    from data import DataError
    try:
        return _generate(out, seed, n_pretrain, n_instruct, n_eval, n_instruct_extra, vocab_size, image_size)
    except OSError as e:     # a full disk (the world is 376 MB of PNGs): one line; world.json, written last, is absent
        raise DataError(f"{out}: cannot write the Shapes world ({e.strerror or e})") from None


def _generate(out, seed, n_pretrain, n_instruct, n_eval, n_instruct_extra, vocab_size, image_size):
    rng = random.Random(seed)
    with contextlib.suppress(FileNotFoundError):   # remade over an older world: it is not whole until the end
        os.remove(os.path.join(out, "world.json"))
    for split in ("pretrain", "instruct", "eval"):
        os.makedirs(os.path.join(out, "images", split), exist_ok=True)
    pretrain, instruct, evals, corpus = [], [], [], []

    def image(split, i):
        scene = random_scene(rng)
        path = f"images/{split}/{i:06d}.png"
        render(scene, rng, image_size).save(os.path.join(out, path))
        return scene, path

    def instruct_sample(i):                              # -> the scene, or None for a text-only sample
        if rng.random() < 0.05:                          # text-only samples, as mix665k has
            q, a = rng.choice(TEXT_ONLY)
            instruct.append({"id": f"text-{i}", "conversations": [{"from": "human", "value": q},
                                                                   {"from": "gpt", "value": a}]})
            return None
        scene, path = image("instruct", i)
        instruct.append({"id": f"instruct-{i}", "image": path, "conversations": chat(scene, rng)})
        return scene
    for i in tqdm(range(n_pretrain), desc="shapes: pretrain"):
        scene, path = image("pretrain", i)
        prompt, cap = rng.choice(CAPTION_PROMPTS), caption(scene, rng)
        human = f"{prompt}\n<image>" if rng.random() < 0.5 else f"<image>\n{prompt}"
        pretrain.append({"id": f"pretrain-{i}", "image": path,
                         "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": cap}]})
        corpus.append(cap)
    for i in tqdm(range(n_instruct), desc="shapes: instruct"):
        if (scene := instruct_sample(i)) is not None:
            corpus += [describe(scene), text_chat(scene, rng)]
    for i in tqdm(range(n_eval), desc="shapes: eval"):
        scene, path = image("eval", i)
        seen = set()
        for cat, q, short, _ in questions(scene, rng) + [("description", rng.choice(DESCRIBE_PROMPTS), describe(scene),
                                                          None)]:
            if cat in seen:
                continue
            seen.add(cat)
            text = q if cat == "description" else f"{q}\n{SHORT}"
            evals.append({"question_id": len(evals), "image": path, "text": text, "category": cat, "answer": short})
    for i in tqdm(range(n_instruct, n_instruct + n_instruct_extra), desc="shapes: instruct (extra)"):
        instruct_sample(i)
    corpus += [f"{q} {a}" for q, a in TEXT_ONLY] * 20 + CAPTION_PROMPTS * 5 + DESCRIBE_PROMPTS * 5 + [SHORT] * 20
    with open(os.path.join(out, "pretrain.json"), "w") as f:
        json.dump(pretrain, f, indent=1)
    with open(os.path.join(out, "instruct.json"), "w") as f:
        json.dump(instruct, f, indent=1)
    with open(os.path.join(out, "eval.jsonl"), "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in evals)
    with open(os.path.join(out, "corpus.txt"), "w") as f:        # documents separated by blank lines
        f.writelines(doc + "\n\n" for doc in corpus)
    train_tokenizer(os.path.join(out, "corpus.txt"), os.path.join(out, "tokenizer"), vocab_size)
    with open(os.path.join(out, "world.json"), "w") as f:         # last: a world cut short has none (ensure)
        json.dump(dict(version=VERSION, seed=seed, n_pretrain=n_pretrain, n_instruct=n_instruct, n_eval=n_eval,
                       n_instruct_extra=n_instruct_extra, vocab_size=vocab_size, image_size=image_size), f, indent=1)
    return out


def ensure(out):
    """The world train.py reads (stages 0-2): make it where it is missing; refuse, in one line, one made by another
    version of this file, which the presets and their figures do not hold for (before world.json: 8,000 instruction
    samples, so a stage 2 of 250 steps instead of 2,496)."""
    from data import DataError
    if not os.path.exists(os.path.join(out, "instruct.json")):
        # made where it is missing (a fresh clone, a world cut short), but not among other files: `train.py --stage
        # 0 --data <a real dataset>` would have written 376 MB of shapes into that dataset's directory
        names = set(os.listdir(out)) if os.path.isdir(out) else set()
        if foreign := sorted(n for n in names - {"images", "pretrain.json", "eval.jsonl", "corpus.txt", "world.json"}
                             if not n.startswith(("tokenizer.", "."))):     # (.DS_Store and the like)
            raise DataError(f"{out}: not a Shapes world, and it holds other files ({foreign[0]}); the world goes in a "
                            f"directory of its own: python data.py shapes --out DIR")
        return generate(out)
    try:
        with open(os.path.join(out, "world.json")) as f:
            version = json.load(f)["version"]
    except (OSError, ValueError, LookupError, TypeError):
        version = None
    if version != VERSION:
        made = "an older shapes.py, or cut short" if version is None else f"shapes.py version {version}"
        raise DataError(f"{out}: made by {made} (this is version {VERSION}); make it again: python data.py shapes "
                        f"--out {out}")
    return out


def train_tokenizer(corpus, prefix, vocab_size=1024):
    """A LLaMA-style sentencepiece BPE: <unk>=0 <s>=1 </s>=2, byte fallback, digits split, no normalisation,
    so data.Tokenizer treats it exactly as it treats LLaMA's own tokenizer.model."""
    import sentencepiece as spm
    from data import CONV_TEMPLATES
    extra = prefix + ".extra.txt"                       # the chat scaffolding must tokenize compactly too
    with open(extra, "w") as f:
        f.writelines((t.system + " USER: ASSISTANT:\n") * 50 for t in CONV_TEMPLATES.values() if t.system)
    spm.SentencePieceTrainer.train(
        input=f"{corpus},{extra}", model_prefix=prefix, vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
        split_digits=True, character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=2, minloglevel=2)
    os.remove(extra)
    os.remove(prefix + ".vocab")
    return prefix + ".model"
