"""
Chat with LLaVA about an image (the official llava/serve/cli.py, with the KV cache kept across turns).

    python chat.py img.png                   # interactive: an empty line, Ctrl-D or Ctrl-C ends; Ctrl-C stops an answer
    python chat.py img.png -p "What is in the image?"      # one answer, for scripts and pipes
    python chat.py photo.jpg --model models/llava-v1.5-7b --vision-tower models/clip-vit-large-patch14-336

The official CLI re-tokenizes and re-runs the whole conversation every turn. Here the cache holds it: each
turn feeds only its new tokens ("</s>USER: ... ASSISTANT:"), so a reply costs the same at turn 10 as at turn 1.
"""
import argparse
import signal
import sys

import torch

from checkpoint import CheckpointError
from data import (CONV_TEMPLATES, IMAGE_TOKEN, DataError, Tokenizer, load_image, process_image, tokenizer_image_token,
                  whole)
from model import Llava


def stream_answer(model, tok, ids, images, cache, args, stop_id, max_new_tokens, gen):
    """Print the answer as it is generated; return its token ids. Ctrl-C ends the answer, not the program: the
    signal only sets a flag, checked between tokens, so the cache is never left half-written."""
    interrupted = []
    old = signal.signal(signal.SIGINT, lambda *_: interrupted.append(1))
    new, shown = [], ""
    try:
        for t in model.generate_stream(torch.tensor([ids], device=cache.valid.device), images, cache=cache,
                                       max_new_tokens=max_new_tokens, temperature=args.temperature,
                                       top_p=args.top_p, eos_token_id=stop_id, generator=gen):
            new.append(t.item())
            text = tok.decode(new)
            if not text.endswith("\ufffd"):        # hold back half of a multi-byte character
                print(text[len(shown):], end="", flush=True)
                shown = text
            if interrupted:
                break
    finally:
        signal.signal(signal.SIGINT, old)
    print(flush=True)
    return new


def number(lo, hi=float("inf")):          # an argparse type: a float in [lo, hi], else one line and exit 2
    def check(s):
        try:
            if lo <= float(s) <= hi:
                return float(s)
        except ValueError:
            pass
        raise argparse.ArgumentTypeError(f"{s!r} is not a number in [{lo}, {hi}]")
    return check


def known_device(s):                      # an argparse type: a device this machine lacks is one line and exit 2
    try:
        d = torch.device(s)
    except RuntimeError:                  # not a device name at all
        d = None
    if d is None or not {"cpu": True, "cuda": (d.index or 0) < torch.cuda.device_count(),
                         "mps": torch.backends.mps.is_available()}.get(d.type):
        raise argparse.ArgumentTypeError(f"{s!r} is not a device this machine has")
    return s


DEVICE_HELP = "default: cuda if there is one, else mps, else cpu"
DTYPE_HELP = "default: bfloat16 on a GPU that has it, else float16; float32 on a CPU"


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", help="an image file (PNG, JPEG, anything PIL reads)")
    p.add_argument("-p", "--prompt", default=None, help="ask one question, print the answer, exit")
    p.add_argument("--model", default="models/shapes-llava", help="default: the bundled tiny Shapes LLaVA")
    p.add_argument("--vision-tower", default=None, help="the CLIP dir, for checkpoints that do not include it")
    p.add_argument("--model-base", default=None, help="the base LLM, for a stage-1 (projector only) or LoRA dir")
    p.add_argument("--conv-mode", default=None, choices=sorted(CONV_TEMPLATES),
                   help="default: the template the checkpoint was trained with")
    p.add_argument("--temperature", type=number(0), default=0.2, help="0 is greedy (default 0.2, as the official CLI)")
    p.add_argument("--top-p", type=number(0, 1), default=1.0, help="sample from the likeliest tokens whose "
                   "probabilities sum to p (default 1: all)")
    p.add_argument("--max-new-tokens", type=whole(1), default=512, help="default 512")
    p.add_argument("--device", type=known_device, default=None, help=DEVICE_HELP)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help=DTYPE_HELP)
    p.add_argument("--seed", type=int, default=0, help="for sampling (default 0)")
    p.add_argument("--compile", action="store_true", help="torch.compile decode, prefill, ViT (on a GPU: CUDA graphs)")
    return p


def load_model(args):
    """The model and tokenizer that --model, --vision-tower, --model-base, --device, --dtype, --compile name
    (chat.py and eval.py alike). Raises CheckpointError for a checkpoint without its tokenizer."""
    model = Llava.from_pretrained(args.model, vision_tower=args.vision_tower, model_base=args.model_base,
                                  device=args.device, dtype=getattr(torch, args.dtype) if args.dtype else None)
    if model.tokenizer_path is None:
        raise CheckpointError(f"{args.model}: no tokenizer.model")
    if args.compile:
        model.compile_inference()
    return model, Tokenizer(model.tokenizer_path)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        image = load_image(args.image, upright=True)   # bad input fails before the model is loaded
        model, tok = load_model(args)
    except (DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:                      # Ctrl-C while loading
        return 130
    vc, t = model.cfg.vision, CONV_TEMPLATES[args.conv_mode or model.cfg.conv_template]
    device = next(model.parameters()).device
    pixels = process_image(image, vc.image_size, model.cfg.image_aspect_ratio, vc.image_mean, vc.image_std)
    pixels = pixels[None].to(device)
    stop_id = tok.newline_id if t.plain else tok.eos_id   # a stage-1 model only ever learned "caption\n"
    if t.plain:                                    # (the official `plain` template drops the instruction)
        print("note: a stage-1 model (the plain template) reads no question; every answer is a caption",
              file=sys.stderr)
    max_len = model.cfg.text.max_position_embeddings
    cache, last = None, None
    gen = torch.Generator(device=device).manual_seed(args.seed)    # one random stream for the whole chat
    while True:
        if args.prompt is not None:
            msg = args.prompt
        else:
            try:
                msg = input("USER: ")
            except EOFError:                       # Ctrl-D ends the chat
                break
            except KeyboardInterrupt:              # so does Ctrl-C at the prompt, with the shell's code for it
                print()
                return 130
            if not msg.strip():
                break
            print("ASSISTANT: ", end="", flush=True)
        if cache is None or t.plain:               # the first turn carries the image ("<image>\n" + text)
            cache = model.new_cache(1, max_len)
            ids, images = tokenizer_image_token(t.prompt([IMAGE_TOKEN + "\n" + msg, None]), tok, images=1), pixels
        else:                                      # later turns: only what follows the last answer
            ids, images = tok.encode(f"{t.sep2}{t.roles[0]}: {msg}{t.sep}{t.roles[1]}:", bos=False), None
            # the last sampled token was never fed. If it was the model's "</s>", this chunk's "</s>" is that
            # token; if the answer was cut short (Ctrl-C, max tokens), feed it before the "</s>"
            if last != tok.eos_id:
                ids = [last] + ids
        room = max_len - cache.length - len(ids) - (model.cfg.image_tokens if images is not None else 0)
        if room < 1 and args.prompt is not None:   # one answer asked for, none possible: bad input, not a chat's end
            print(f"error: the prompt is {max_len - room} positions long (the image's included); the model's "
                  f"context is {max_len}", file=sys.stderr)
            return 2
        if room < 1:
            print(f"\n[the conversation has filled the {max_len}-token context; start a new chat]", file=sys.stderr)
            break
        new = stream_answer(model, tok, ids, images, cache, args, stop_id, min(args.max_new_tokens, room), gen)
        last = new[-1] if new else tok.eos_id
        if args.prompt is not None:
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
