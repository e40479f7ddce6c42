"""
Answer an official LLaVA eval question file, and score it where references exist.

In: jsonl lines {"question_id", "image", "text"} (as llava/eval/model_vqa_loader.py reads them; the answer-format
suffix, e.g. "Answer the question using a single word or phrase.", is already in "text"), optionally with
"answer" and "category" (the Shapes eval split has both). Out: the official answers jsonl {"question_id",
"prompt", "text", "answer_id", "model_id", "metadata"} and, with references, exact-match accuracy per category.

    python eval.py                                   # the bundled tiny LLaVA on the Shapes eval split
    python eval.py --blind                           # the same questions with a blank image instead
    python eval.py --model models/llava-v1.5-7b --vision-tower clip-vit-large-patch14-336 \\
        --questions llava_vqav2_mscoco_test-dev2015.jsonl --image-folder test2015 --answers answers.jsonl

A long run that stops (Ctrl-C, a crash, a bad image) keeps its answers so far in <answers>.partial, and the same
command continues from there.
"""
import argparse
import contextlib
import hashlib
import json
import os
import sys
from collections import defaultdict

import torch
from PIL import Image
from tqdm import tqdm

from chat import DEVICE_HELP, DTYPE_HELP, known_device, load_model
from checkpoint import CheckpointError, fingerprint, need_dirs, replacing, text_sha1, write_json
from data import (CONV_TEMPLATES, IMAGE_TOKEN, DataError, load_image, process_image, tokenizer_image_token, whole,
                  writable_dir)
from model import IMAGE_TOKEN_INDEX


def normalize(s):                        # exact match up to case, surrounding space and a final period
    return s.strip().lower().rstrip(".").strip()


def load_questions(path, image_folder=None):
    """The questions of a jsonl file, each checked; with image_folder, every image must exist (a missing one
    fails now, not an hour into the run)."""
    try:
        with open(path) as f:
            lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the questions ({e})") from None
    qs = []
    for n, line in lines:
        try:
            q = json.loads(line)
        except ValueError as e:
            raise DataError(f"{path}: line {n} is not JSON ({e})") from None
        if not (isinstance(q, dict) and "question_id" in q and isinstance(q.get("text"), str)
                and all(isinstance(q.get(k, ""), str) for k in ("image", "answer", "category"))):
            raise DataError(f"{path}: line {n} needs a question_id, a text string and, if it has them, an image "
                            f"path and an answer and category as strings")
        if image_folder is not None and "image" in q and not os.path.isfile(os.path.join(image_folder, q["image"])):
            raise DataError(f"{path}: line {n}: {os.path.join(image_folder, q['image'])}: no such file")
        qs.append(q)
    if not qs:                           # the wrong file, most likely: an empty answers file would say nothing
        raise DataError(f"{path}: no questions")
    return qs


@torch.inference_mode()
def answer(model, tok, questions, image_folder, template, batch_size=32, max_new_tokens=128, blind=False, done=None,
           log=None):
    """Greedy answers (the official eval scripts use temperature 0), in batches of similar prompt length. `done`
    holds answers already made ({question index: text}), which are not made again; each batch's new ones are
    appended to the file `log` as soon as they exist (see `resume`)."""
    vc, t = model.cfg.vision, CONV_TEMPLATES[template]
    stop = tok.newline_id if t.plain else tok.eos_id
    fill = Image.new("RGB", (vc.image_size, vc.image_size), tuple(int(m * 255) for m in vc.image_mean))
    prompts = [t.prompt([IMAGE_TOKEN + "\n" + q["text"] if "image" in q else q["text"], None]) for q in questions]
    ids = [tokenizer_image_token(p, tok, images=int("image" in q)) for p, q in zip(prompts, questions)]
    max_len, N = model.cfg.text.max_position_embeddings, model.cfg.image_tokens
    length = [len(x) + (N - 1) * x.count(IMAGE_TOKEN_INDEX) for x in ids]     # positions, the image's included
    for q, n in zip(questions, length):    # past the context the model answers from positions it never saw
        if n >= max_len:
            raise DataError(f"question_id {q['question_id']}: the prompt is {n} positions long (the image's "
                            f"included); the model's context is {max_len}")
    out = [(done or {}).get(i) for i in range(len(questions))]
    order = sorted((i for i in range(len(questions)) if out[i] is None), key=lambda i: len(ids[i]))
    device = next(model.parameters()).device
    for k in tqdm(range(0, len(order), batch_size), desc="eval", disable=len(order) <= batch_size):
        idx = order[k:k + batch_size]
        T = max(len(ids[i]) for i in idx)
        x, mask = torch.full((len(idx), T), tok.pad_id, dtype=torch.long), torch.zeros(len(idx), T, dtype=torch.long)
        for r, i in enumerate(idx):
            x[r, :len(ids[i])], mask[r, :len(ids[i])] = torch.tensor(ids[i]), 1
        imgs = [process_image(fill if blind else load_image(os.path.join(image_folder, questions[i]["image"])),
                              vc.image_size, model.cfg.image_aspect_ratio, vc.image_mean, vc.image_std)
                for i in idx if "image" in questions[i]]
        images = torch.stack(imgs).to(device) if imgs else None
        new = model.generate(x.to(device), images, attention_mask=mask.to(device), eos_token_id=stop,
                             max_new_tokens=min(max_new_tokens, max_len - max(length[i] for i in idx)))   # (context)
        for r, i in enumerate(idx):
            out[i] = tok.decode(new[r].tolist()).strip()
        if log:                                  # a crash or Ctrl-C loses this batch at most
            try:
                with open(log, "a") as f:
                    f.writelines(json.dumps(dict(i=i, text=out[i])) + "\n" for i in idx)
            except OSError as e:                 # a full disk: a line it cut short is made again on the next run
                raise CheckpointError(f"{log}: cannot write ({e.strerror or e}); the answers before are kept") from None
    return prompts, out


def resume(partial, settings):
    """The answers an interrupted run left in `partial` ({question index: text}), if its settings were these; the
    file is (re)written as a line of the settings and those answers, to which `answer` appends."""
    done, same = {}, False
    if os.path.exists(partial):
        with open(partial) as f:
            lines = f.read().splitlines()
        for line in lines[1:]:
            with contextlib.suppress(ValueError, KeyError, TypeError):   # a line cut short by the crash: made again
                a = json.loads(line)
                done[a["i"]] = a["text"]
        with contextlib.suppress(ValueError, IndexError):
            same = json.loads(lines[0]) == {"settings": settings}
    if done and not same:            # one without answers (stopped before a batch ended, e.g. while loading) is not
        raise DataError(f"{partial}: left by an interrupted run with other settings or weights; run it again with "
                        f"those, or delete the file to start over")
    lines = [{"settings": settings}] + [dict(i=i, text=t) for i, t in done.items()]
    with replacing(partial) as tmp, open(tmp, "w") as f:   # rewritten whole: no cut line is left to append to
        f.writelines(json.dumps(x) + "\n" for x in lines)
    return done


def score(questions, answers):
    """Exact-match accuracy per category (and overall) over the questions that carry a reference answer."""
    hits = defaultdict(list)
    for q, a in zip(questions, answers):
        if "answer" in q:
            ok = normalize(a) == normalize(q["answer"])
            hits["overall"].append(ok)
            if "category" in q:
                hits[q["category"]].append(ok)
    return {c: dict(accuracy=sum(v) / len(v), n=len(v)) for c, v in sorted(hits.items())}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/shapes-llava", help="default: the bundled tiny Shapes LLaVA")
    p.add_argument("--vision-tower", default=None, help="the CLIP dir, for checkpoints that do not include it")
    p.add_argument("--model-base", default=None, help="the base LLM, for a stage-1 (projector only) or LoRA dir")
    p.add_argument("--questions", default="data/shapes/eval.jsonl", help="default: the Shapes eval split")
    p.add_argument("--image-folder", default="data/shapes", help="the root of the questions' image paths")
    p.add_argument("--answers", default=None, help="default: output/<model name>/answers[-blind].jsonl")
    p.add_argument("--conv-mode", default=None, choices=sorted(CONV_TEMPLATES),
                   help="default: the template the checkpoint was trained with")
    p.add_argument("--batch-size", type=whole(1), default=32, help="questions answered together (default 32)")
    p.add_argument("--max-new-tokens", type=whole(1), default=128, help="default 128")
    p.add_argument("--blind", action="store_true", help="a blank image instead of the real one")
    p.add_argument("--compile", action="store_true", help="torch.compile decode, prefill, ViT (on a GPU: CUDA graphs)")
    p.add_argument("--device", type=known_device, default=None, help=DEVICE_HELP)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help=DTYPE_HELP)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    name = os.path.basename(os.path.normpath(args.model))
    path = args.answers or os.path.join("output", name, f"answers{'-blind' if args.blind else ''}.jsonl")
    partial = path + ".partial"                  # the answers so far, while they are being made
    try:
        need_dirs(args.model, *filter(None, (args.vision_tower, args.model_base)))   # before any data or answers
        if args.questions == "data/shapes/eval.jsonl" and not os.path.exists(args.questions):
            import shapes
            shapes.generate("data/shapes")
        questions = load_questions(args.questions, None if args.blind else args.image_folder)
        writable_dir(os.path.dirname(path) or ".")   # an unwritable --answers fails now, not after the answers
        if os.path.isdir(path):
            raise DataError(f"{path}: a directory; --answers names the answers file")
        model, tok = load_model(args)
        # the batch size, device and compilation may change between an interrupted run and its continuation; the
        # questions and the weights may not (a model trained again into the same directory: two models' answers)
        settings = {k: v for k, v in vars(args).items() if k not in ("batch_size", "device", "compile")}
        settings["questions_sha1"] = text_sha1(json.dumps(questions))
        settings["weights"] = fingerprint(model.named_parameters())
        if done := resume(partial, settings):
            print(f"continuing from {partial}: {len(done)} of {len(questions)} answered", file=sys.stderr)
        template = args.conv_mode or model.cfg.conv_template
        _, answers = answer(model, tok, questions, args.image_folder, template, args.batch_size,
                            args.max_new_tokens, args.blind, done, partial)
        with replacing(path) as tmp, open(tmp, "w") as f:   # "prompt": the question's text, as model_vqa_loader.py
            for q, a in zip(questions, answers):   # writes it (cur_prompt = line["text"]), not the templated prompt
                aid = hashlib.sha1(f"{name}:{q['question_id']}:{a}".encode()).hexdigest()[:22]
                f.write(json.dumps(dict(question_id=q["question_id"], prompt=q["text"], text=a, answer_id=aid,
                                        model_id=name, metadata={})) + "\n")
        os.remove(partial)                         # every answer is in `path` now (a full disk: still in partial)
    except (DataError, CheckpointError, torch.cuda.OutOfMemoryError) as e:   # mid-run: the answers so far are kept
        oom = isinstance(e, torch.cuda.OutOfMemoryError)
        print(f"error: {e}" + ("; the answers so far are kept: run again with a smaller --batch-size" if oom else ""),
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        kept = f"the answers so far are in {partial}; " if os.path.exists(partial) else ""
        print(f"\ninterrupted: {kept}the same command continues", file=sys.stderr)
        return 130
    scores = score(questions, answers)
    for c, s in scores.items():
        print(f"{c:>12}: {s['accuracy']:7.2%}  ({s['n']} questions)")
    print(f"answers: {path}")
    try:
        if scores:
            write_json(os.path.splitext(path)[0] + "-accuracy.json", scores, indent=1)
    except CheckpointError as e:                   # a full disk: the scores are printed above
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
