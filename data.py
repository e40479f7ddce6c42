"""
Everything between files on disk and the model's inputs, byte-for-byte as the official LLaVA code makes them.

    image file ─load_image─▶ RGB ─process_image─▶ pixels (3, S, S): pad to square (LLaVA-1.5) + CLIP preprocessing
    conversation JSON ─tokenize_conversation─▶ input_ids with -200 for <image>, labels with -100 where no loss

Official sources: llava/mm_utils.py (tokenizer_image_token, expand2square), llava/conversation.py (templates),
llava/train/train.py (preprocess_multimodal, preprocess_plain, preprocess_v1, LazySupervisedDataset, the
collator), llava/train/llava_trainer.py (group_by_modality_length). Facts: reference/llava-recipe.md §2-§4.

    python data.py check data/llava_v1_5_mix665k.json --image-folder data   # report every bad sample at once
    python data.py shapes --out data/shapes                                  # the synthetic Shapes world
"""
import argparse
import contextlib
import json
import os
import re
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import sentencepiece as spm
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from model import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from vit import CLIP_MEAN, CLIP_STD

IMAGE_TOKEN = "<image>"


class DataError(ValueError):
    """Bad input data; the message is one line naming the file or sample."""


# ----------------------------------------------------------------------------------------------------- images
def load_image(path, upright=False):
    """Any image PIL reads, as RGB (`Image.open(f).convert('RGB')`, as the official training and CLI code).

    Two exceptions. 16-bit greyscale (a PNG or TIFF from a scanner or a microscope) keeps its top 8 bits: the
    official code, and transformers' processors, clip it and see a white image. And with upright=True (chat.py)
    a photo is turned as its EXIF orientation says, as a viewer shows it: a phone's portrait photo is stored
    sideways, and the official CLI shows it to the model so. Training and eval keep the official pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)   # over PIL's limit: refuse
            with Image.open(path) as im:
                im = ImageOps.exif_transpose(im) if upright else im
                if im.mode.startswith("I;16"):     # 16-bit grey: convert("RGB") would clip all over 255 to white
                    return Image.fromarray((np.asarray(im) >> 8).astype(np.uint8)).convert("RGB")
                return im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not an image") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image file PIL can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{path}: image too large ({str(e).split('could be')[0].strip()})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: unreadable or truncated image ({e})") from None


def expand2square(img, fill):
    """Pad to a square with the background colour, the image centred (llava/mm_utils.py)."""
    w, h = img.size
    if w == h:
        return img
    out = Image.new(img.mode, (max(w, h),) * 2, fill)
    out.paste(img, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return out


def process_image(img, size=336, aspect="pad", mean=CLIP_MEAN, std=CLIP_STD):
    """PIL RGB image -> pixels (3, size, size) float32, exactly as CLIPImageProcessor (transformers 4.x) makes them.

    aspect="pad" (LLaVA-1.5 stage 2 and inference) first pads to a square, so nothing is cut off; any other
    value (stage 1, which never sets image_aspect_ratio) center-crops the long side away."""
    img = img if img.mode == "RGB" else img.convert("RGB")     # (RGBA, L, P ...: CLIPImageProcessor converts too)
    if aspect == "pad":
        # the fill is the mean colour truncated to int: (122, 116, 104), which normalises to about 0
        img = expand2square(img, tuple(int(m * 255) for m in mean))
    w, h = img.size
    short, long = min(w, h), max(w, h)
    new_short, new_long = size, int(size * long / short)          # shortest side -> size, int() as HF
    nw, nh = (new_short, new_long) if w <= h else (new_long, new_short)
    img = img.resize((nw, nh), Image.BICUBIC)                     # PIL bicubic, antialiased
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))          # a no-op after padding
    x = np.asarray(img, dtype=np.float32) / 255                    # (S, S, 3)
    x = (x - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))                 # (3, S, S)


# -------------------------------------------------------------------------------------------------- tokens
class Tokenizer:
    """LLaMA's sentencepiece model, used as the official code uses it: HF's slow LlamaTokenizer (legacy mode).

    Two behaviours matter. "<s>", "</s>" and "<unk>" written in the text are special tokens: the text is split
    around them and each piece is encoded on its own, so "</s>USER" gives 2, "▁US", "ER" (every piece gets
    sentencepiece's leading "▁", which is what "legacy" means). And a BOS is added in front."""

    def __init__(self, path):
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise DataError(f"{path}: not a sentencepiece tokenizer.model ({str(e).splitlines()[0]})") from None
        self.bos_id, self.eos_id, self.unk_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
        self.pad_id = self.unk_id            # LLaVA v1: `tokenizer.pad_token = tokenizer.unk_token`
        self.special = {"<s>": self.bos_id, "</s>": self.eos_id, "<unk>": self.unk_id}
        self.newline_id = self.sp.piece_to_id("<0x0A>")   # "\n": the stop token of the `plain` template

    def __len__(self):
        return self.sp.vocab_size()

    def encode(self, text, bos=True):
        ids = [self.bos_id] if bos else []
        if not text.isascii():           # a lone surrogate (a bad byte on stdin, half an emoji in JSON) would make
            text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")   # sentencepiece raise: U+FFFD
        for piece in re.split(r"(<s>|</s>|<unk>)", text):
            if piece in self.special:
                ids.append(self.special[piece])
            elif piece:
                ids.extend(self.sp.encode(piece))
        return ids

    def decode(self, ids):     # special tokens, image placeholders and ids past the tokenizer (a vocabulary padded
        n = len(self)          # to 32064, as llava-hf's: no text; sentencepiece raised IndexError) are skipped
        return self.sp.decode([i for i in ids if 0 <= i < n and i not in self.special.values()])


def tokenizer_image_token(prompt, tok, images=-1):
    """llava/mm_utils.py: tokenize the text between "<image>"s separately and join the chunks with -200.

    Each chunk gets its own BOS (kept for the first only) and its own leading "▁". So "USER: <image>\\nWhat"
    becomes ▁US ER : ▁ -200 ▁ <0x0A> What: a lone "▁" (29871) on both sides of the image, and "What" without
    its "▁". Checkpoints were trained on exactly these ids; tokenizing the whole string differently would
    feed them text they never saw. With images=n only the first n "<image>"s are placeholders: chat.py and
    eval.py put the image before the user's text, in which a literal "<image>" is text."""
    chunks = [tok.encode(c) for c in prompt.split(IMAGE_TOKEN, images)]
    ids = chunks[0]
    for c in chunks[1:]:
        ids = ids + [IMAGE_TOKEN_INDEX] + c[1:]       # c[1:]: drop the chunk's BOS
    return ids


@dataclass(frozen=True)
class Template:                          # llava/conversation.py, SeparatorStyle.TWO and PLAIN
    system: str
    roles: tuple = ("USER", "ASSISTANT")
    sep: str = " "
    sep2: str = "</s>"                   # closes every assistant message: it is the EOS the model learns
    plain: bool = False

    def prompt(self, messages):
        """messages alternate user, assistant; a final None asks for the assistant's turn ("... ASSISTANT:")."""
        if self.plain:                   # stage 1: the image, then the caption (the instruction is dropped)
            return IMAGE_TOKEN + "".join(m + self.sep for m in messages[1::2] if m)
        out = self.system + self.sep
        for i, m in enumerate(messages):
            role = self.roles[i % 2]
            out += f"{role}: {m}{(self.sep, self.sep2)[i % 2]}" if m is not None else f"{role}:"
        return out


CONV_TEMPLATES = {
    # LLaVA-1.5 training and evaluation (`--version v1`, `--conv-mode vicuna_v1`)
    "vicuna_v1": Template("A chat between a curious user and an artificial intelligence assistant. "
                          "The assistant gives helpful, detailed, and polite answers to the user's questions."),
    # the official CLI and demo: the same with "human" for "user"
    "llava_v1": Template("A chat between a curious human and an artificial intelligence assistant. "
                         "The assistant gives helpful, detailed, and polite answers to the human's questions."),
    # stage 1 (`--version plain`): no system prompt, no roles, "\n" ends the caption
    "plain": Template("", ("", ""), "\n", None, plain=True),
}


def official_messages(conversations, has_image=True):
    """The messages and roles as the official code feeds them to the template (`preprocess_multimodal`):
    "<image>" moves to the front of the message that mentions it, and a leading gpt turn is dropped."""
    msgs, roles = [c["value"] for c in conversations], [c["from"] for c in conversations]
    if has_image:
        msgs = [(IMAGE_TOKEN + "\n" + m.replace(IMAGE_TOKEN, "").strip()).strip() if IMAGE_TOKEN in m else m
                for m in msgs]
    return (msgs[1:], roles[1:]) if roles and roles[0] != "human" else (msgs, roles)


def split_rounds(prompt, t):
    """The official masking's reading of a v1 prompt: one round per answer, "USER: q ASSISTANT: a" (its "</s>"
    cut off), as (instruction up to "ASSISTANT: ", answer). None where that reading fails, which the official
    code reports as a "tokenization mismatch" and trains on nothing: a message whose own text holds "</s>" or
    " ASSISTANT: ", or a conversation that ends with a question."""
    sep = t.sep + t.roles[1] + ": "      # " ASSISTANT: "
    *rounds, rest = prompt.split(t.sep2)
    parts = [r.split(sep) for r in rounds]
    return None if rest or any(len(p) != 2 for p in parts) else [(q + sep, a) for q, a in parts]


def unreadable(t):                       # why split_rounds gives None, in words
    return f"the official masking cannot read it ({t.sep2!r} or ' {t.roles[1]}: ' in a message, or a final question)"


def tokenize_conversation(conversations, tok, template="vicuna_v1", has_image=True, name="sample"):
    """Official `preprocess_multimodal` + `preprocess_plain`/`preprocess_v1`: (input_ids, labels) as lists.

    labels are -100 everywhere except what the model must learn to say: the answers and the "</s>" after each
    (v1), or the caption and its "\\n" (plain). Where the official code prints "tokenization mismatch" and
    silently trains on nothing, this raises, naming the sample (LlavaDataset names such samples up front)."""
    t = CONV_TEMPLATES[template]
    if t.plain:
        msgs = official_messages(conversations, has_image)[0]
        if len(conversations) != 2 or len(msgs) != 2 or IMAGE_TOKEN not in msgs[0]:
            raise DataError(f"{name}: a stage-1 (plain) sample needs an image and exactly one caption turn")
        ids = tokenizer_image_token(t.prompt(msgs), tok)          # [BOS, -200, caption..., "\n"]
        return ids, [IGNORE_INDEX] * 2 + ids[2:]                   # BOS and the image are not supervised
    msgs, roles = official_messages(conversations, has_image)
    if any(r != ("human", "gpt")[i % 2] for i, r in enumerate(roles)):
        raise DataError(f"{name}: roles must alternate human, gpt (got {', '.join(roles)})")
    prompt = t.prompt(msgs)
    if (rounds := split_rounds(prompt, t)) is None:
        raise DataError(f"{name}: tokenization mismatch: {unreadable(t)}")
    encode = (lambda s: tokenizer_image_token(s, tok)) if has_image else tok.encode
    ids = encode(prompt)
    labels = [IGNORE_INDEX] * len(ids)
    cur = 1                              # after BOS
    for instruction, answer in rounds:
        # tok(round) counts a BOS the round does not have: that +1 stands in for the round's "</s>". And
        # tok(instruction) ends in a lone "▁" that merges into the answer's first token: hence the -2.
        round_len, instruction_len = len(encode(instruction + answer)), len(encode(instruction)) - 2
        labels[cur + instruction_len:cur + round_len] = ids[cur + instruction_len:cur + round_len]
        cur += round_len
    if cur != len(ids):                  # the rounds' tokens do not add up to the prompt's: a tokenizer unlike LLaMA's
        raise DataError(f"{name}: tokenization mismatch ({cur} vs {len(ids)} tokens)")
    return ids, labels


# ---------------------------------------------------------------------------------------------------- data sets
ROLE_CODE, ALTERNATING = {"human": "h", "gpt": "g"}, re.compile(r"g?h(gh)*g?")


def sample_problems(s, template="vicuna_v1", image_folder=None):
    """Everything wrong with one sample of the LLaVA JSON, as short phrases; its length in characters; and
    whether the official masking can read it (the official code trains on nothing for one it cannot)."""
    if not isinstance(s, dict):
        return ["not a JSON object"], 0, True
    conv = s.get("conversations")
    if not isinstance(conv, list) or not conv:
        return ["no 'conversations' list, or an empty one"], 0, True
    try:
        roles = "".join(ROLE_CODE[c["from"]] for c in conv)
        text = "".join(c["value"] for c in conv)
    except (TypeError, KeyError):
        return ["every turn needs 'from' (human or gpt) and a string 'value'"], 0, True
    problems, t = [], CONV_TEMPLATES[template]
    if not ALTERNATING.fullmatch(roles):  # a leading gpt turn is dropped by the official code, so allowed
        problems.append(f"roles do not alternate human, gpt ({', '.join(c['from'] for c in conv)})")
    if "image" in s:
        n = text.count(IMAGE_TOKEN)
        n = n if n < 2 else sum(IMAGE_TOKEN in c["value"] for c in conv)     # turns that mention it
        if n != 1:
            problems.append(f"has an image but {n} turns mention {IMAGE_TOKEN} (need exactly 1)")
        if not isinstance(s["image"], str):
            problems.append("'image' is not a path")
        elif image_folder is not None and not os.path.isfile(os.path.join(image_folder, s["image"])):
            problems.append(f"image file {os.path.join(image_folder, s['image'])} not found")
    elif template == "plain":
        problems.append("a stage-1 (plain) sample needs an image")
    if template == "plain" and len(conv) != 2:
        problems.append("a stage-1 (plain) sample needs exactly 2 turns")
    # (a sample with problems is refused anyway, so it is not listed as unreadable too)
    return problems, len(text), (t.plain or bool(problems) or
                                 split_rounds(t.prompt(official_messages(conv, "image" in s)[0]), t) is not None)


def scan_json(path, template="vicuna_v1", image_folder=None):
    """Index the LLaVA JSON (a list of {"id", "image"?, "conversations"}) in one pass.

    Returns the file's text, each sample's (start, end) character span, its modality length (characters of
    text, negative for text-only samples: the official code counts words, which only serves to sort samples
    into batches of similar length, and costs 3x the parse), every problem found, as "sample 12 (id 34): problem"
    lines, and as such lines the samples the official masking cannot read, which training leaves out.
    Keeping the text and parsing a sample when it is used holds llava_v1_5_mix665k (665K samples, 1 GB) in
    about its own size, where json.load would build ~5x that in Python objects."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    ws, dec = re.compile(r"\s*"), json.JSONDecoder()
    i = ws.match(text).end()
    if text[i:i + 1] != "[":
        raise DataError(f"{path}: not a JSON list of samples")
    i = ws.match(text, i + 1).end()
    spans, lengths, problems, left_out = [], [], [], []
    while text[i:i + 1] != "]":
        try:
            s, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        found, n, readable = sample_problems(s, template, image_folder)
        where = f"{path}: sample {len(spans)} (id {s.get('id') if isinstance(s, dict) else None})"
        problems += [f"{where}: {p}" for p in found]
        if not readable:                 # the official code trains on nothing for it; train.py leaves it out
            left_out.append(f"{where}: left out of training: {unreadable(CONV_TEMPLATES[template])}")
        spans.append((i, end))
        lengths.append(max(n, 1) if isinstance(s, dict) and "image" in s else -max(n, 1))
        i = ws.match(text, end).end()
        if text[i:i + 1] == ",":
            i = ws.match(text, i + 1).end()
        elif text[i:i + 1] != "]":
            line = text.count("\n", 0, i) + 1
            raise DataError(f"{path}: malformed JSON at line {line}: expected ',' or ']' after sample {len(spans) - 1}")
    return text, np.array(spans, dtype=np.int64).reshape(-1, 2), np.array(lengths, dtype=np.int64), problems, left_out


class LlavaDataset(torch.utils.data.Dataset):
    """LCS-558K, llava_v1_5_mix665k or the Shapes world: tokens, labels and pixels per sample, made on access
    (the official LazySupervisedDataset). A bad image does not stop training: the sample comes back as
    {"skipped": reason}, which collate() drops and counts; so does one the official masking cannot read (listed
    up front in `left_out`). Bad JSON or other bad samples raise DataError up front."""

    def __init__(self, path, tokenizer, image_folder=".", template="vicuna_v1", image_size=336, aspect="pad",
                 mean=CLIP_MEAN, std=CLIP_STD, check_images=True):
        self.path, self.tok, self.image_folder, self.template = path, tokenizer, image_folder, template
        self.image = dict(size=image_size, aspect=aspect, mean=mean, std=std)
        self.text, self.spans, self.modality_lengths, problems, self.left_out = scan_json(
            path, template, image_folder if check_images else None)
        if problems:
            raise DataError(f"{len(problems)} problem(s); run `python data.py check {path}`. First: {problems[0]}")

    def __len__(self):
        return len(self.spans)

    def raw(self, i):
        s, e = self.spans[i]
        return json.loads(self.text[s:e])

    def __getitem__(self, i):
        s = self.raw(i)
        name = f"sample {i} (id {s.get('id')})"
        try:
            ids, labels = tokenize_conversation(s["conversations"], self.tok, self.template, "image" in s, name=name)
        except DataError as e:                     # a tokenization mismatch: the official code trains on nothing
            return {"skipped": str(e)}
        image = None
        if "image" in s:
            try:
                image = process_image(load_image(os.path.join(self.image_folder, s["image"])), **self.image)
            except DataError as e:
                return {"skipped": f"{name}: {e}"}
        return {"ids": ids, "labels": labels, "image": image, "name": name}


def collate(batch, pad_id=0, max_length=2048):
    """Right-pad a list of samples into tensors, truncating the text to max_length tokens as the official
    collator does (before each -200 becomes 576 image positions). Images come only from samples that have
    one, in order: (n_img, 3, S, S) or None. Samples that were skipped are dropped and listed, and so are those
    that truncation leaves no answer token (a --max-length too small: the official code trains on nothing for
    them, silently)."""
    why = [b.get("skipped") or (all(x == IGNORE_INDEX for x in b["labels"][1:max_length])    # (labels shift by 1)
                                and f"{b.get('name', 'a sample')}: no answer token within --max-length {max_length}")
           for b in batch]
    skipped, batch = [w for w in why if w], [b for b, w in zip(batch, why) if not w]
    T = min(max_length, max((len(b["ids"]) for b in batch), default=0))
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(len(batch), T, dtype=torch.bool)     # from lengths, not ids != pad: <unk> is also 0
    images = []
    for i, b in enumerate(batch):
        n = min(len(b["ids"]), T)
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(b["ids"][:n]), torch.tensor(b["labels"][:n]), True
        if b["image"] is not None and IMAGE_TOKEN_INDEX in b["ids"][:n]:    # truncation may cut the image off
            images.append(b["image"])
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "images": torch.stack(images) if images else None, "skipped": skipped}


def modality_grouped_order(lengths, group, generator=None):
    """The official `group_by_modality_length` order (llava/train/llava_trainer.py): image and text-only samples
    never share a batch, and each group of `group` (= micro-batch x accumulation x GPUs) samples is sorted by
    length, so padding is small. About 25% faster on mix665k (official README). Unlike the official code,
    every shuffle uses `generator`, so the order is reproducible and resumable."""
    lengths = list(map(int, lengths))
    mm = [i for i, n in enumerate(lengths) if n > 0]
    lang = [i for i, n in enumerate(lengths) if n <= 0]

    def megabatches(idx):               # shuffle, cut into groups, longest first within a group
        idx = [idx[j] for j in torch.randperm(len(idx), generator=generator).tolist()]
        return [sorted(idx[k:k + group], key=lambda i: -abs(lengths[i])) for k in range(0, len(idx), group)]
    if not mm or not lang:
        return [i for b in megabatches(mm or lang) for i in b]
    a, b = megabatches(mm), megabatches(lang)
    full = a[:-1] + b[:-1]
    full = [full[j] for j in torch.randperm(len(full), generator=generator).tolist()]
    return [i for mb in full + [sorted(a[-1] + b[-1])] for i in mb]   # the two leftovers: one mixed batch last


# --------------------------------------------------------------------------------------------------------- CLI
def writable_dir(path):
    """Make an output directory if needed, or refuse it in one line: checked before the work that fills it."""
    with contextlib.suppress(OSError):
        os.makedirs(path, exist_ok=True)
    if not (os.path.isdir(path) and os.access(path, os.W_OK)):
        raise DataError(f"{path}: not a directory this process can write to")
    return path


def whole(lo):                             # an argparse type: "-3" or "2.5" is one line and exit 2, not a silent no-op
    def check(s):
        if not s.isdigit() or int(s) < lo:
            raise argparse.ArgumentTypeError(f"{s!r} is not a whole number >= {lo}")
        return int(s)
    return check


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="report every problem in a LLaVA JSON file")
    c.add_argument("json", help="a LLaVA JSON file (a list of samples with conversations)")
    c.add_argument("--image-folder", default=None, help="check that each sample's image exists under this folder")
    c.add_argument("--template", default="vicuna_v1", choices=sorted(CONV_TEMPLATES), help="default vicuna_v1")
    s = sub.add_parser("shapes", help="generate the Shapes world (images, JSON, eval, corpus, tokenizer)")
    import inspect
    import shapes
    n = {k: v.default for k, v in inspect.signature(shapes.generate).parameters.items()}   # its defaults, for --help
    s.add_argument("--out", default="data/shapes", help="default data/shapes")
    s.add_argument("--seed", type=int, default=0, help="the same seed writes the same files (default 0)")
    s.add_argument("--n-pretrain", type=whole(0), default=None, help=f"caption samples, stage 1 ({n['n_pretrain']:,})")
    s.add_argument("--n-instruct", type=whole(0), default=None, help=f"stage-2 samples ({n['n_instruct']:,})")
    s.add_argument("--n-instruct-extra", type=whole(0), default=None,
                   help=f"more stage-2 samples, drawn after the eval split ({n['n_instruct_extra']:,})")
    s.add_argument("--n-eval", type=whole(0), default=None, help=f"eval images ({n['n_eval']:,})")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "check":
            _, spans, _, problems, left_out = scan_json(args.json, args.template, args.image_folder)
            for line in problems + left_out:
                print(line)
            print(f"{args.json}: {len(spans)} samples, {len(problems)} problem(s), {len(left_out)} left out in "
                  f"training", file=sys.stderr)
            return 1 if problems or left_out else 0
        import shapes
        shapes.generate(writable_dir(args.out), seed=args.seed, **{k: v for k, v in vars(args).items()
                                                     if k.startswith("n_") and v is not None})
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:                      # shapes.ensure refuses a world cut short, so none is used
        print("interrupted" + (f": {args.out} is incomplete" if args.cmd == "shapes" else ""), file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
