"""
Stage 0, for the tiny Shapes world only: what OpenAI and LMSYS did before LLaVA began (DESIGN.md §5).

Real LLaVA starts from a pretrained CLIP ViT-L/14 and a pretrained Vicuna. Here both are made in miniature:
  - a CLIP: the tiny ViT (vit.py) and a tiny causal text encoder (llama.py) trained contrastively (Radford et
    al. 2021, §2.3) on freshly rendered scenes and their full descriptions, so the ViT's features say what is
    where in words' terms, plus a region-word loss (as GLIP and RegionCLIP add) that ties each object's own
    patch feature to its colour, shape, size and position words; saved as an HF CLIPModel-style directory
    (vision_model.*, text_model.*, projections)
  - a "Vicuna": the tiny LLaMA trained on next-token prediction over the Shapes text corpus; saved as an HF
    LLaMA directory with the tokenizer
Stages 1 and 2 then load them exactly as they load openai/clip-vit-large-patch14-336 and lmsys/vicuna-7b-v1.5.

    python train.py --stage 0         # models/shapes-clip and models/shapes-llama (a few minutes on 2 CPU cores)
"""
import math
import os
import random
import shutil
import signal
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import llama
import shapes
import vit
from checkpoint import check_start, read_snapshot, replacing, text_sha1, write_json, write_safetensors
from data import Tokenizer, process_image, writable_dir

CLIP_STEPS, CLIP_BATCH, LLM_STEPS, LLM_BATCH = 600, 128, 400, 32     # what `train.py --stage 0` runs


class Stopped(Exception):
    """Ctrl-C, SIGTERM or --stop-after: the snapshot is saved; --resume continues."""


class Snapshots:
    """Stage 0 stops and continues as stages 1 and 2 do: a snapshot (weights, optimizer, step, random states)
    every 100 steps and on Ctrl-C, SIGTERM or --stop-after, written whole; --resume continues exactly. The steps
    count on from the CLIP's into the LLaMA's (--stop-after 650: the LLaMA's 50th)."""

    def __init__(self, path, settings, resume, stop_after, clip_steps):
        self.path, self.settings, self.stop_after, self.clip_steps = path, settings, stop_after, clip_steps
        self.stop, self.state, self.extra = [], None, {}        # stop: Ctrl-C or SIGTERM came (main's handlers)
        check_start(path, resume)                               # (a forgotten --resume, say)
        if resume:                                              # damaged, foreign or other settings: one line
            self.state = read_snapshot(path, {"part", "step", "config"}, "stage 0", settings, {})

    def restore(self, part, model, opt, rng):
        """(the step to start `part`, "clip" or "llm", from; its last losses), its state restored from the snapshot
        if it holds that part."""
        if not self.state or self.state["part"] != part:
            return 0, None
        model.load_state_dict(self.state["model"])
        opt.load_state_dict(self.state["optimizer"])
        torch.set_rng_state(self.state["torch_rng"])
        rng.setstate(self.state["rng"]) if part == "clip" else rng.set_state(self.state["rng"])
        return self.state["step"], self.state["losses"]

    def after(self, part, step, steps, model, opt, rng, losses):
        """After step `step` (1-based) of `steps`: a snapshot every 100 steps, at the last, on a stop (then Stopped)."""
        stop = bool(self.stop) or step + (part == "llm") * self.clip_steps == self.stop_after
        if stop or step % 100 == 0 or step == steps:
            state = dict(part=part, step=step, finished=part == "llm" and step == steps, config=self.settings,
                         model=model.state_dict(), optimizer=opt.state_dict(), torch_rng=torch.get_rng_state(),
                         losses=losses, rng=rng.getstate() if part == "clip" else rng.get_state(), **self.extra)
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with replacing(self.path) as tmp:
                torch.save(state, tmp)
        if stop:
            raise Stopped(f"stage 0 stopped at the {'CLIP' if part == 'clip' else 'LLaMA'}'s step {step}/{steps}: "
                          f"checkpoint saved to {self.path}; continue with --resume")


def cosine(step, total, warmup=20):
    return (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def pad(seqs, pad_id):
    """Token id lists -> right-padded ids (B, T) and lengths (B,); a causal encoder never sees the padding."""
    lengths = torch.tensor([len(t) for t in seqs])
    return torch.tensor([t + [pad_id] * (int(lengths.max()) - len(t)) for t in seqs]), lengths


class TinyCLIP(nn.Module):
    def __init__(self, vcfg, tcfg, dim):
        super().__init__()
        self.vision_model, self.text_model = vit.VisionTransformer(vcfg), llama.Llama(tcfg)
        self.visual_projection = nn.Linear(vcfg.hidden_size, dim, bias=False)
        self.text_projection = nn.Linear(tcfg.hidden_size, dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))    # CLIP's initial temperature

    def embed_text(self, ids, lengths):
        """Right-padded ids (B, T) -> unit vectors in the joint space (B, dim), read at each text's EOS."""
        hidden = self.text_model(ids, return_hidden=True)                                         # (B, T, D)
        return F.normalize(self.text_projection(hidden[torch.arange(len(ids)), lengths - 1]), dim=-1)

    def forward(self, pixels, ids, lengths):
        img = F.normalize(self.visual_projection(self.vision_model.pooled(pixels)), dim=-1)      # (B, dim)
        txt = self.embed_text(ids, lengths)                                                       # (B, dim)
        logits = self.logit_scale.exp().clamp(max=100) * img @ txt.t()                            # (B, B)
        labels = torch.arange(len(ids))          # the i-th image belongs with the i-th text
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2

    def word_loss(self, pixels, cells, words):
        """Region-word contrast: the patch feature LLaVA reads (penultimate layer) of every occupied cell against
        the embeddings of the words of each group (colours, shapes, sizes, places), in the joint space.

        cells: (n, 2) rows of (image, patch); words: per group the padded ids of its words (each BOS word EOS),
        their lengths, and the (n,) index of each cell's word. Why: trained on whole descriptions alone, the tiny
        CLIP's features hold shape (linearly decodable) as a tiny direction next to "occupied or not", and stage 2
        then learns the shape lookups ("What color is the circle?") at about chance; with this loss (and 600
        steps) shape questions are answered 86% right instead of 32%, with two stage-2 epochs (FINDINGS.md)"""
        # a second pass through the ViT's first layers (forward() ran them for the pooled CLS): 40 ms of 205 ms per
        # step (batch 128, 2 threads), about 24 s of stage 0. One pass for both losses is the same but for rounding,
        # yet two CLIPs so made took the recipe to 79.0% and 79.3%, where this one gives 88.3% (FINDINGS.md)
        feats = self.vision_model(pixels, layer=-2)[cells[:, 0], cells[:, 1]]               # (n, D)
        img = F.normalize(self.visual_projection(feats), dim=-1)                            # (n, dim)
        scale = self.logit_scale.exp().clamp(max=100)
        loss = 0.0
        for ids, lengths, target in words:
            txt = self.embed_text(ids, lengths)                                             # (W, dim)
            loss = loss + F.cross_entropy(scale * img @ txt.t(), target)                    # (n, W) logits
        return loss / len(words)


def pretrain_clip(out, tok, steps=CLIP_STEPS, batch=CLIP_BATCH, lr=3e-4, seed=0, snap=None):
    # 600 steps, not 300: the same recipe then reaches 65.6% on the eval split instead of 55.3% (FINDINGS.md)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    vcfg = vit.PRESETS["shapes-tiny"]
    tcfg = llama.LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    model = TinyCLIP(vcfg, tcfg, vcfg.projection_dim)
    # decay on every weight, gains and biases too (train.py spares them): the recipe of every draw in FINDINGS.md
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    groups = [list(shapes.COLORS), shapes.SHAPES, list(shapes.SIZES), shapes.CELLS]   # one word group per attribute
    word_ids = [pad([tok.encode(w) + [tok.eos_id] for w in group], tok.pad_id) for group in groups]   # once
    start, losses = snap.restore("clip", model, opt, rng) if snap else (0, None)
    for step in (bar := tqdm(range(start, steps), initial=start, total=steps, desc="stage 0: CLIP")):
        # half the batch are "twins" of the other half with one attribute of one object changed (hard
        # negatives, as NegCLIP): telling a scene from its twin takes shape, size and position, not just colour
        scenes = [shapes.random_scene(rng) for _ in range(batch // 2)]
        scenes += [shapes.twin(s, rng) for s in scenes]
        pixels = torch.stack([process_image(shapes.render(s, rng), vcfg.image_size, "pad") for s in scenes])
        texts = [tok.encode(shapes.describe(s)) + [tok.eos_id] for s in scenes]
        ids, lengths = pad(texts, tok.pad_id)
        occupied = [(b, o) for b, s in enumerate(scenes) for o in s]
        cells = torch.tensor([(b, o["cell"]) for b, o in occupied])     # (n, 2); patch i is cell i (row-major)
        target = torch.tensor([(groups[0].index(o["color"]), groups[1].index(o["shape"]), groups[2].index(o["size"]),
                                o["cell"]) for _, o in occupied])                 # (n, 4): each object's words
        words = [(*w, t) for w, t in zip(word_ids, target.t())]                  # (ids, lengths, target)
        for g in opt.param_groups:
            g["lr"] = lr * cosine(step, steps)
        clip_loss = model(pixels, ids, lengths)
        word_loss = model.word_loss(pixels, cells, words)
        (clip_loss + word_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses = clip_loss.item(), word_loss.item()
        bar.set_postfix(loss=f"{losses[0]:.3f}", words=f"{losses[1]:.3f}")
        if snap:
            snap.after("clip", step + 1, steps, model, opt, rng, losses)
    os.makedirs(out, exist_ok=True)
    write_safetensors({k: v.contiguous() for k, v in model.state_dict().items()},
                      os.path.join(out, "model.safetensors"))
    config = {"model_type": "clip", "architectures": ["CLIPModel"], "projection_dim": vcfg.projection_dim,
              "vision_config": {k: v for k, v in vars(vcfg).items() if k not in ("image_mean", "image_std")}
              | {"model_type": "clip_vision_model"}, "text_config": vars(tcfg) | {"model_type": "llama"}}
    write_json(os.path.join(out, "config.json"), config)
    write_json(os.path.join(out, "preprocessor_config.json"), {
        "image_mean": list(vcfg.image_mean), "image_std": list(vcfg.image_std), "size": vcfg.image_size,
        "crop_size": vcfg.image_size, "resample": 3})
    return losses


def pretrain_llm(out, tok_path, corpus, steps=LLM_STEPS, batch=LLM_BATCH, seq=128, lr=1e-3, seed=0, snap=None):
    torch.manual_seed(seed)
    tok = Tokenizer(tok_path)
    docs = [d for d in open(corpus).read().split("\n\n") if d.strip()]
    stream = torch.tensor([i for d in docs for i in tok.encode(d) + [tok.eos_id]])     # BOS text EOS, packed
    cfg = llama.PRESETS["shapes-tiny"]
    cfg = llama.LlamaConfig(**{**vars(cfg), "vocab_size": len(tok)})
    model = llama.Llama(cfg)
    # std 1/sqrt(width), not LLaMA's 0.02 (initializer_range, chosen for 4096-wide models): at 192 wide 0.02 gives
    # attention logits of about 0.1, every head starts almost uniform, and stage 2's lookups ("What color is the
    # circle?": find the image token with that shape, copy its colour) sit on a plateau (FINDINGS.md)
    model.init_weights(std=cfg.hidden_size ** -0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    g = torch.Generator().manual_seed(seed)
    start, losses = snap.restore("llm", model, opt, g) if snap else (0, None)
    for step in (bar := tqdm(range(start, steps), initial=start, total=steps, desc="stage 0: LLaMA")):
        starts = torch.randint(0, len(stream) - seq - 1, (batch,), generator=g)
        x = torch.stack([stream[s:s + seq + 1] for s in starts])          # (B, seq + 1) random windows
        for p in opt.param_groups:
            p["lr"] = lr * cosine(step, steps)
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses = (loss.item(),)
        bar.set_postfix(loss=f"{losses[0]:.3f}")
        if snap:
            snap.after("llm", step + 1, steps, model, opt, g, losses)
    os.makedirs(out, exist_ok=True)
    write_safetensors({k: v.contiguous() for k, v in model.state_dict().items()},
                      os.path.join(out, "model.safetensors"))
    hf = {k: v for k, v in vars(cfg).items()} | {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                 "hidden_act": "silu"}
    write_json(os.path.join(out, "config.json"), hf)
    with replacing(os.path.join(out, "tokenizer.model")) as tmp:
        shutil.copyfile(tok_path, tmp)
    return losses[0]


def main(cfg):
    data = os.path.dirname(cfg.data) if cfg.data.endswith(".json") else cfg.data
    shapes.ensure(data)                            # made if missing; refused if an older shapes.py made it
    tok_path, corpus = os.path.join(data, "tokenizer.model"), os.path.join(data, "corpus.txt")
    ckpt_dir = cfg.ckpt_dir or os.path.join("checkpoints", "shapes-stage0")
    for d in (cfg.vision_tower, cfg.model_base, ckpt_dir):   # an unwritable one is refused now, not minutes later
        writable_dir(d)
    with open(corpus) as f:                        # --resume continues only the same run: same outputs, seed, text
        settings = dict(vision_tower=cfg.vision_tower, model_base=cfg.model_base, seed=cfg.seed,
                        corpus_sha1=text_sha1(f.read()))
    snap = Snapshots(os.path.join(ckpt_dir, "ckpt.pt"), settings, cfg.resume, cfg.stop_after, CLIP_STEPS)
    old = {sig: signal.signal(sig, lambda *_: snap.stop.append(1)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:                                           # Ctrl-C: the step ends, the snapshot is saved, exit 130
        if snap.state and snap.state["part"] == "llm":          # the CLIP was written whole before the LLaMA began
            snap.extra = dict(clip_losses=snap.state["clip_losses"])
        else:
            snap.extra = dict(clip_losses=pretrain_clip(cfg.vision_tower, Tokenizer(tok_path), CLIP_STEPS, CLIP_BATCH,
                                                        seed=cfg.seed, snap=snap))
        lm_loss = pretrain_llm(cfg.model_base, tok_path, corpus, LLM_STEPS, LLM_BATCH, seed=cfg.seed, snap=snap)
    except Stopped as e:
        print(e, file=sys.stderr)
        return 130
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    clip_loss, word_loss = snap.extra["clip_losses"]
    print(f"stage 0 done: CLIP loss {clip_loss:.3f} (region-word {word_loss:.3f}) -> {cfg.vision_tower}; LLaMA loss "
          f"{lm_loss:.3f} -> {cfg.model_base}")
    return 0
