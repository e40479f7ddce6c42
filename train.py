"""
Train LLaVA in two stages (paper §4.2; LLaVA-1.5 scripts/v1_5/pretrain.sh, finetune.sh, finetune_lora.sh):

  stage 1  feature alignment: CLIP and the LLM frozen, only the projector learns to caption (`plain` template)
  stage 2  visual instruction tuning: the projector and the LLM (full, or LoRA) learn to follow instructions
  stage 0  (the tiny Shapes world only) what OpenAI and LMSYS did for the real model: pretrain CLIP and the LLM

    python train.py --stage 1          # the Shapes world on a CPU: data made if missing, bundled stage-0 models
    python train.py --stage 2          # continues from stage 1's output
    python train.py --stage 2 --preset llava-1.5 --lora --projector models/llava-stage1 --data mix665k.json ...
    torchrun --standalone --nproc_per_node=8 train.py --stage 2 --preset llava-1.5 ...   # same global batch

Outputs: the model in --out (models/), resumable snapshots in --ckpt-dir (checkpoints/), loss.png and
metrics.json in --log-dir (output/). Ctrl-C saves a checkpoint; --resume continues exactly where it stopped.
"""
import argparse
import contextlib
import inspect
import math
import os
import re
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.distributed as dist
from tqdm import tqdm

from checkpoint import (CheckpointError, check_start, fingerprint, load_components, load_snapshot, need_dirs,
                        replacing, save_projector, save_snapshot, text_sha1, write_json)
from data import CONV_TEMPLATES, DataError, LlavaDataset, Tokenizer, collate, modality_grouped_order, writable_dir
from lora import apply_lora, merge_lora, save_adapter
from model import IGNORE_INDEX, Llava
from projector import build_projector


class UsageError(Exception):
    """Settings that cannot work together; reported in one line."""


class Interrupted(Exception):
    """Ctrl-C, SIGTERM or --stop-after: the checkpoint is saved; --resume continues."""


class Diverged(Exception):
    """A gradient that is NaN or inf: stopped before the update would put it into the weights and the snapshots."""


@dataclass
class TrainConfig:
    stage: int = 1                                 # 1: align the projector; 2: instruction tuning; 0: tiny CLIP, LLM
    data: str = "data/shapes/pretrain.json"        # LLaVA JSON: LCS-558K (stage 1), mix665k (stage 2)
    image_folder: str = "data/shapes"              # the root of the samples' relative "image" paths
    val_data: str = ""                             # a held-out LLaVA JSON; default: val_samples held out of `data`
    val_samples: int = 200                         # held out of `data` for the validation loss (with no val_data)
    model_base: str = "models/shapes-llama"        # the LLM (HF LLaMA/Vicuna dir); stage 2: overrides the projector's
    vision_tower: str = "models/shapes-clip"       # the CLIP dir; stage 2: overrides the projector's (a hub id, say)
    projector: str = "models/shapes-stage1"        # stage 2: stage 1's output dir
    out: str = "models/shapes-stage1"              # where the trained model goes (stage 1: the projector)
    ckpt_dir: str = ""                             # default checkpoints/<name of out> (stage 0: shapes-stage0)
    log_dir: str = ""                              # default output/<name of out>
    template: str = "plain"                        # the conversation format: plain (stage 1), vicuna_v1 (stage 2)
    image_aspect_ratio: str = "square"             # pad: to a square (stage 2); square: center-crop (stage 1)
    projector_type: str = "mlp2x_gelu"             # LLaVA-1.5's two-layer MLP; linear is LLaVA-1's
    lr: float = 1e-3                               # the peak lr: the projector's, the LLM's (stage 2), LoRA's
    projector_lr: float = 0.0                      # 0: the same as lr (llava-1.5 --lora: 2e-5, finetune_lora.sh)
    weight_decay: float = 0.0                      # AdamW's, on trained matrices (not biases, norm gains)
    warmup_ratio: float = 0.03                     # share of the steps with the lr rising linearly from 0
    hold_ratio: float = 0.0                        # share of the steps at the peak lr before the decay (0: cosine)
    epochs: float = 1.0                            # passes over `data`; a fraction stops partway
    max_steps: int = 0                             # 0: the whole schedule
    stop_after: int = 0                            # save and exit after this step (a job's time limit: --resume)
    batch_size: int = 256                          # global: micro_batch x accumulation x GPUs
    micro_batch: int = 32                          # samples in one forward and backward pass, per GPU
    max_length: int = 2048                         # text tokens a sample is cut to (each image: N positions more)
    grad_clip: float = 0.0                         # max gradient norm, 0: none (the official DeepSpeed configs')
    lora: bool = False                             # stage 2: LoRA adapters learn instead of the whole LLM
    lora_r: int = 128                              # the adapters' rank
    lora_alpha: int = 256                          # the adapters' scale is alpha / r
    lora_dropout: float = 0.05                     # on the adapters' input
    group_by_modality: bool = False                # image and text-only samples in batches of their own, by length
    grad_checkpointing: bool = False               # recompute each decoder block in backward: less memory
    compile: bool = False                          # torch.compile each decoder block (no shared prefix: build_model)
    eval_every: int = 0                            # steps between validation losses (0: at the end only)
    ckpt_every: int = 100                          # steps between snapshots (0: at the end and on Ctrl-C only)
    num_workers: int = 2                           # DataLoader processes that read images and tokenize
    seed: int = 42                                 # the projector's init, the held-out samples, the data order
    resume: bool = False                           # continue from ckpt_dir's snapshot, exactly


PRESETS = {   # --preset NAME --stage N picks f"{NAME}-stage{N}"; every field can be overridden on the command line
    "shapes-stage1": TrainConfig(lr=2e-3, batch_size=64, micro_batch=32, epochs=1, val_samples=128, eval_every=50,
                                 num_workers=1, grad_clip=1.0),
    # one epoch over 80,000 samples, as LLaVA's stage 2 sees each sample once, the projector at the LLM's lr, the lr
    # held at its peak for 80% of the steps (FINDINGS.md); batches sorted by length pad less: 1.2x the speed. The
    # LLM and CLIP are those stage 1's config.json names
    "shapes-stage2": TrainConfig(stage=2, data="data/shapes/instruct.json", out="models/shapes-llava", model_base="",
                                 vision_tower="", template="vicuna_v1", image_aspect_ratio="pad", lr=5e-4,
                                 batch_size=32, micro_batch=16, epochs=1, val_samples=128, eval_every=100,
                                 num_workers=1, group_by_modality=True, grad_clip=1.0, hold_ratio=0.8),
    "llava-1.5-stage1": TrainConfig(data="", image_folder="", model_base="", vision_tower="", projector="", out="",
                                    grad_checkpointing=True, val_samples=1000, eval_every=200, num_workers=4),
    "llava-1.5-stage2": TrainConfig(stage=2, data="", image_folder="", model_base="", vision_tower="", projector="",
                                    out="", template="vicuna_v1", image_aspect_ratio="pad", lr=2e-5, batch_size=128,
                                    micro_batch=16, group_by_modality=True, grad_checkpointing=True, val_samples=1000,
                                    eval_every=200, num_workers=4),
}
LORA = dict(lr=2e-4, projector_lr=2e-5)            # finetune_lora.sh
NEEDED = {1: ("data", "image_folder", "model_base", "vision_tower", "out"),   # by stage: llava-1.5 has no defaults
          2: ("data", "image_folder", "projector", "out")}
CHOICES = dict(stage=(0, 1, 2), template=tuple(CONV_TEMPLATES), image_aspect_ratio=("pad", "square"))
LIMITS = {(0, math.inf): ("lr", "projector_lr", "weight_decay", "grad_clip", "num_workers", "val_samples", "eval_every",
                          "ckpt_every", "stop_after", "max_steps"),
          (0, 1): ("warmup_ratio", "hold_ratio", "lora_dropout"), (1, math.inf): ("max_length", "lora_r", "lora_alpha")}


# ------------------------------------------------------------------------------------------------- model setup
def build_model(cfg, device, dtype):
    """Load the stage's starting point and freeze by hand: nothing learns unless this says so."""
    if cfg.stage == 1:
        model = load_components(Llava, cfg.model_base, cfg.vision_tower, cfg.projector_type, dtype=dtype, device=device)
    else:
        model = Llava.from_pretrained(cfg.projector, vision_tower=cfg.vision_tower or None, dtype=dtype, device=device,
                                      model_base=cfg.model_base or None)      # base LLM + projector + CLIP
    model.cfg = replace(model.cfg, conv_template=cfg.template, image_aspect_ratio=cfg.image_aspect_ratio)
    model.requires_grad_(False)
    model.mm_projector.requires_grad_(True)        # stage 1 and 2
    if cfg.stage == 2 and cfg.lora:
        apply_lora(model.language_model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)   # adapters trainable
    elif cfg.stage == 2:
        model.language_model.requires_grad_(True)
    fp32_masters(model)
    model.vision_tower.eval()                      # frozen in every stage, and always run under no_grad
    model.language_model.grad_checkpointing = cfg.grad_checkpointing
    if cfg.compile:                                # each decoder block, as torchtitan does: the splicing stays eager
        model.shared_prefix = False                # (Llava.trunk's three kinds of call, one-row prefix, cached rest,
        for block in model.language_model.model.layers:     # plain, would make 8 graphs, dynamo's limit)
            block.compile(dynamic=True)
    return model


def fp32_masters(model):           # trainable weights keep fp32 masters, which AdamW updates; autocast computes in bf16
    for p in (p for p in model.parameters() if p.requires_grad):
        p.data = p.data.float()


def make_optimizer(model, cfg, device):
    """AdamW; the projector at its own lr (--projector-lr), weight decay on matrices only: not on biases and norm
    gains, as HF's Trainer leaves them out for the official runs (and nanoGPT: p.dim() >= 2)."""
    groups = []
    for proj, lr in ((False, cfg.lr), (True, cfg.projector_lr or cfg.lr)):
        ps = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("mm_projector.") == proj]
        groups += [dict(params=[p for p in ps if p.dim() >= 2], lr=lr, base_lr=lr, weight_decay=cfg.weight_decay),
                   dict(params=[p for p in ps if p.dim() < 2], lr=lr, base_lr=lr, weight_decay=0.0)]
    return torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.999), eps=1e-8,
                             fused=device.type == "cuda")


def lr_factor(step, total, warmup_ratio, hold_ratio=0.0):
    """HF get_cosine_schedule_with_warmup, as the official runs, but warming up one step ahead: HF's first step
    has lr 0. With hold_ratio the lr stays at its peak until that share of the steps and only then follows the
    cosine down (warmup-stable-decay, as MiniCPM trains)."""
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return (step + 1) / warmup
    start = max(warmup, int(hold_ratio * total))
    return 0.5 * (1 + math.cos(math.pi * max(0, step - start) / max(1, total - start)))


# ------------------------------------------------------------------------------------------------------ data
def step_batches(order, step, cfg, rank, world):
    """The micro-batches (lists of sample indices) this rank runs in optimizer step `step`."""
    G, m = cfg.batch_size, cfg.micro_batch
    chunk = order[step * G:(step + 1) * G]
    return [chunk[(a * world + rank) * m:(a * world + rank + 1) * m] for a in range(G // (m * world))]


def epoch_order(train_idx, lengths, cfg, epoch):
    g = torch.Generator().manual_seed(cfg.seed + epoch)
    if cfg.group_by_modality:
        return [train_idx[i] for i in modality_grouped_order(lengths[train_idx], cfg.batch_size, g)]
    return [train_idx[i] for i in torch.randperm(len(train_idx), generator=g).tolist()]


def quiet_worker(_):   # Ctrl-C reaches the whole process group, and so do Slurm's SIGTERM at a time limit and
    for sig in (signal.SIGINT, signal.SIGTERM):    # `timeout`'s: the main process saves a checkpoint, so the data
        signal.signal(sig, signal.SIG_IGN)         # workers must not die first (they exit when the main one does)


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def validate(model, loader, device, ctx, world):
    model.eval()
    total = torch.zeros(2, device=device)          # (sum of token losses, tokens)
    for batch in loader:
        if batch["input_ids"].numel() == 0:        # every sample skipped (unreadable images)
            continue
        b = to_device(batch, device)
        with ctx:
            out = model(b["input_ids"], b["images"], b["labels"], b["attention_mask"], return_logits=False)
        total += torch.stack([out.loss.float() * out.n_tokens, out.n_tokens.float()])
    if world > 1:
        dist.all_reduce(total)
    model.train()
    getattr(model, "module", model).vision_tower.eval()     # (under DDP the model is wrapped in .module)
    return (total[0] / total[1]).item()            # nan if nothing was left to validate on


def export(model, cfg, tok_path):
    """Stage 1: the projector, as ours and as the official mm_projector.bin + config.json. Stage 2: the merged
    model in our format (from_pretrained and chat.py load it), and a LoRA run's adapter on its own. Weights are
    written in the dtype the run loaded them in (bf16 on a GPU: the official outputs are 16-bit, and a 7B model's
    fp32 masters would double its size; fp32 on a CPU), the model cast in place; the adapter stays fp32 (small)."""
    dtype = next(model.vision_tower.parameters()).dtype        # frozen in every stage: never an fp32 master
    if cfg.stage == 1:
        model.mm_projector.to(dtype)
        return save_projector(model, cfg.out, cfg.model_base, cfg.vision_tower)
    if cfg.lora:
        save_adapter(model, os.path.join(cfg.out, "adapter"), cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                     base_path=cfg.projector, llm=cfg.model_base or None, clip=cfg.vision_tower or None)
        merge_lora(model.language_model)
    model.to(dtype).save_pretrained(cfg.out, tokenizer_path=tok_path)


def plot(metrics, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4), layout="tight")
    ax.plot([m["step"] for m in metrics["train"]], [m["loss"] for m in metrics["train"]], lw=1, label="train")
    if metrics["val"]:
        ax.plot([m["step"] for m in metrics["val"]], [m["loss"] for m in metrics["val"]], "o-", label="validation")
    ax.set(xlabel="optimizer step", ylabel="loss (token mean)", title=metrics["title"])
    ax.legend()
    with replacing(path, ".tmp.png") as tmp:      # (matplotlib picks the format from the extension)
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------- train
def peak_bf16(device):                        # dense bf16 FLOP/s by datasheet, for MFU; None off the GPUs listed
    peaks = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "RTX 4090": 165e12}
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((v for k, v in peaks.items() if k in gpu), None)


def autocast_dtype(device):       # bf16 autocast where the GPU has it; fp16 with loss scaling where not; none on a CPU
    return (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if device.type == "cuda" else None


def train(cfg: TrainConfig):
    """Run a stage; return the trained (unmerged) model on rank 0, None on the others."""
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with contextlib.ExitStack() as closing:   # the progress bar ends before an error is printed, not after
            return _train(cfg, closing)
    finally:                                      # give Ctrl-C back as it was (a notebook kernel needs it)
        for s, h in old.items():
            signal.signal(s, h)


def check(cfg, world):
    """Settings that would fail late or train wrongly (a negative lr ascends) are refused in one line, up front;
    the output directories are made here."""
    for (lo, hi), names in LIMITS.items():
        if bad := [k for k in names if not lo <= getattr(cfg, k) <= hi]:
            raise UsageError(f"--{bad[0].replace('_', '-')} {getattr(cfg, bad[0])} is outside [{lo}, {hi}]")
    try:                                           # projector.py knows the types it builds
        weights = list(build_projector(cfg.projector_type, 1, 1).parameters())
    except ValueError as e:
        raise UsageError(f"--projector-type {cfg.projector_type}: {e}") from None
    if cfg.micro_batch < 1 or cfg.batch_size % (cfg.micro_batch * world) or cfg.batch_size < 1:
        raise UsageError(f"--batch-size {cfg.batch_size} is not a positive multiple of --micro-batch "
                         f"{cfg.micro_batch} x {world} processes")
    if cfg.stage == 1 and not weights:             # (identity) an optimizer without parameters: a traceback
        raise UsageError(f"--projector-type {cfg.projector_type} has no weights: stage 1, which trains the "
                         f"projector alone, would train nothing")
    if cfg.lora and cfg.stage == 1:                # was ignored, and with llava-1.5 gave stage 1 LoRA's lr
        raise UsageError("--lora is for stage 2: stage 1 trains the projector alone")
    if not (cfg.max_steps or cfg.epochs > 0):
        raise UsageError(f"--epochs {cfg.epochs}, --max-steps {cfg.max_steps}: no step to run")
    for d in (cfg.out, *run_dirs(cfg)[1:]):       # an unwritable output fails now, not after the training
        writable_dir(d)


def run_dirs(cfg):
    """The run's name and where it writes snapshots and records (default checkpoints/<name>, output/<name>)."""
    name = os.path.basename(os.path.normpath(cfg.out))
    return name, cfg.ckpt_dir or os.path.join("checkpoints", name), cfg.log_dir or os.path.join("output", name)


def _train(cfg: TrainConfig, closing):
    # DDP the nanoGPT way: torchrun sets RANK/WORLD_SIZE; each process runs this same code on its share
    ddp = "RANK" in os.environ
    rank, world, local = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
                          ) if ddp else (0, 1, 0)
    cuda = torch.cuda.is_available()
    if ddp:
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True   # `--tf32 True`
    master = rank == 0
    torch.manual_seed(cfg.seed)
    amp = autocast_dtype(device)
    ctx = torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    check(cfg, world)
    A = cfg.batch_size // (cfg.micro_batch * world)          # gradient accumulation steps
    name, ckpt_dir, log_dir = run_dirs(cfg)
    ckpt_path = os.path.join(ckpt_dir, "ckpt.pt")
    check_start(ckpt_path, cfg.resume)             # before the model loads (a forgotten --resume, say)

    model = build_model(cfg, device, amp or torch.float32)
    if model.tokenizer_path is None:
        raise CheckpointError(f"{cfg.model_base if cfg.stage == 1 else cfg.projector}: no tokenizer.model")
    tok = Tokenizer(model.tokenizer_path)
    vc = model.cfg.vision
    kw = dict(image_size=vc.image_size, aspect=cfg.image_aspect_ratio, mean=vc.image_mean, std=vc.image_std)
    ds = LlavaDataset(cfg.data, tok, cfg.image_folder, cfg.template, **kw)
    if ds.left_out and master:
        print(f"{len(ds.left_out)} sample(s) to skip; first: {ds.left_out[0]}", file=sys.stderr)
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    if cfg.val_data:
        val_ds = LlavaDataset(cfg.val_data, tok, cfg.image_folder, cfg.template, **kw)
        val_idx, train_idx = list(range(len(val_ds))), perm
        if not val_idx:
            raise DataError(f"{cfg.val_data}: no samples to validate on")
    else:                                       # hold a fixed random subset of the training file out
        val_ds, val_idx, train_idx = ds, perm[:cfg.val_samples], perm[cfg.val_samples:]
    coll = lambda b: collate(b, tok.pad_id, cfg.max_length)
    mine = val_idx[rank::world]
    val_loader = torch.utils.data.DataLoader(val_ds, batch_sampler=[mine[i:i + cfg.micro_batch] for i in range(
        0, len(mine), cfg.micro_batch)], collate_fn=coll)
    steps_per_epoch = len(train_idx) // cfg.batch_size
    if steps_per_epoch == 0:                    # (a small file can lose them all to the default validation set)
        held = f" ({len(val_idx)} of its {len(ds)} held out by --val-samples)" if val_idx and not cfg.val_data else ""
        raise DataError(f"{cfg.data}: {len(train_idx)} training samples{held}, fewer than a batch of {cfg.batch_size}")
    total = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)

    opt = make_optimizer(model, cfg, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # the settings and what --resume reads again (the data, the frozen weights): it refuses to continue over others
    settings = asdict(cfg) | dict(data_sha1=text_sha1(ds.text), val_data_sha1=cfg.val_data and text_sha1(val_ds.text),
                                  frozen_weights=fingerprint((n, p) for n, p in model.named_parameters()
                                                             if not p.requires_grad))
    step, metrics = 0, dict(title=f"stage {cfg.stage}: {name}", train=[], val=[], skipped=[], config=settings)
    if cfg.resume:
        step, metrics = load_snapshot(ckpt_path, model, opt, scaler, settings, asdict(TrainConfig()))
    raw = model
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local] if cuda else None)
    peak = peak_bf16(device)                    # for MFU, on a GPU

    stop = []                                   # Ctrl-C / SIGTERM: finish the step, save, exit
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(1))
    bar = closing.enter_context(tqdm(total=total, initial=step, disable=not master, desc=f"stage {cfg.stage}",
                                     dynamic_ncols=True))
    t_start = time.time()
    while step < total:
        epoch, first = divmod(step, steps_per_epoch)
        order = epoch_order(train_idx, ds.modality_lengths, cfg, epoch)
        plan = [b for s in range(first, steps_per_epoch) for b in step_batches(order, s, cfg, rank, world)]
        loader = iter(torch.utils.data.DataLoader(ds, batch_sampler=plan, collate_fn=coll, num_workers=cfg.num_workers,
                                                  pin_memory=cuda, worker_init_fn=quiet_worker,
                                                  generator=torch.Generator().manual_seed(0)))   # not the global RNG
        for _ in range(first, steps_per_epoch):
            t0 = time.time()
            mbs = [to_device(next(loader), device) for _ in range(A)]
            # [supervised tokens, LLM positions, FLOPs] of the global batch (all micro-batches, all ranks): the loss
            # is a mean over every supervised token of it, so the result does not depend on how the batch is
            # split (the official code averages per micro-batch)
            counts = sum(raw.step_counts(b["input_ids"], b["attention_mask"], b["labels"]) for b in mbs)
            if ddp:
                dist.all_reduce(counts)
            n_tok = counts[0].clamp(min=1)
            lr = lr_factor(step, total, cfg.warmup_ratio, cfg.hold_ratio)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * lr
            loss_sum = torch.zeros((), device=device)
            for a, b in enumerate(mbs):
                if ddp:                         # all-reduce gradients on the last micro-batch only
                    model.require_backward_grad_sync = a == A - 1
                if b["input_ids"].numel() == 0:     # every sample's image was unreadable: a no-op batch
                    b = dict(b, input_ids=torch.zeros(1, 1, dtype=torch.long, device=device),
                             labels=torch.full((1, 1), IGNORE_INDEX, device=device),
                             attention_mask=torch.ones(1, 1, dtype=torch.bool, device=device))
                with ctx:
                    out = model(b["input_ids"], b["images"], b["labels"], b["attention_mask"], return_logits=False)
                loss = out.loss * out.n_tokens / n_tok * world        # DDP averages over ranks: undo it
                if b["images"] is None:         # keep the projector in the graph, or DDP waits for its gradient
                    loss = loss + 0 * sum(p.sum() for p in raw.mm_projector.parameters())
                scaler.scale(loss).backward()
                loss_sum += out.loss.detach() * out.n_tokens
            scaler.unscale_(opt)                # the norm before clipping (inf: no clipping) goes into metrics.json
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip or float("inf"))
            if not (scaler.is_enabled() or torch.isfinite(grad_norm)):    # (fp16's scaler skips such a step itself)
                again = f"delete {ckpt_path} and " * os.path.exists(ckpt_path) + "run again with a lower --lr"
                raise Diverged(f"step {step + 1}: the gradient norm is {grad_norm.item()}: the run has diverged; "
                               f"stopped before the update, so the snapshots so far hold none of it ({again})")
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            step += 1
            if ddp:
                dist.all_reduce(loss_sum)
            dt = time.time() - t0
            rec = dict(step=step, loss=(loss_sum / n_tok).item(), lr=lr * cfg.lr, grad_norm=grad_norm.item(),
                       tokens_per_s=counts[1].item() / dt)
            metrics["train"].append(rec)
            metrics["skipped"] += [s for b in mbs for s in b["skipped"]]
            post = dict(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
            if peak:                            # counts are over all ranks; peak is one GPU's
                rec["mfu"] = counts[2].item() / dt / world / peak
                post["mfu"] = f"{rec['mfu']:.1%}"
            if metrics["skipped"]:
                post["skipped"] = len(metrics["skipped"])
            bar.set_postfix(post, refresh=False)
            bar.update(1)
            if val_idx and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total):   # --val-samples 0: none
                metrics["val"].append(dict(step=step, loss=validate(model, val_loader, device, ctx, world)))
                bar.write(f"step {step}: validation loss {metrics['val'][-1]['loss']:.4f}") if master else None
            interrupted = torch.tensor(float(bool(stop) or step == cfg.stop_after), device=device)
            if ddp:                             # every rank must stop at the same step
                dist.all_reduce(interrupted)
            if master and ((cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == total or interrupted):
                metrics["wall_time_s"] = metrics.get("wall_time_s", 0) + time.time() - t_start
                t_start = time.time()
                save_snapshot(ckpt_path, raw, opt, scaler, step, metrics, settings, finished=step == total)
                write_records(metrics, log_dir)
            if interrupted:
                if ddp:                         # leave together: a rank that tears gloo down while rank 0
                    dist.barrier()              # still saves can abort ("terminate called...", seen once in CI)
                    dist.destroy_process_group()
                raise Interrupted(f"stopped at step {step}/{total}: checkpoint saved to {ckpt_path}; continue "
                                  f"with --resume")
            if step >= total:
                break
    if ddp:
        dist.barrier()                             # as above: no rank leaves while rank 0 still writes
        dist.destroy_process_group()
    raw.metrics, raw.log_dir = metrics, log_dir
    return raw if master else None                 # the trained model (unmerged), for export on rank 0


def write_records(metrics, log_dir):
    os.makedirs(log_dir, exist_ok=True)
    write_json(os.path.join(log_dir, "metrics.json"), metrics, indent=1)
    plot(metrics, os.path.join(log_dir, "loss.png"))


def preset(name, stage, lora=False):     # `--preset NAME --stage N [--lora]`'s config; stage 0 writes where 1 reads
    base = PRESETS.get(f"{name}-stage{max(1, stage)}")
    return replace(base, **LORA) if base and lora and name != "shapes" else base


def parse_args(argv=None):
    look = argparse.ArgumentParser(add_help=False, allow_abbrev=False)   # a first look at the flags that pick the
    look.add_argument("--preset", nargs="?", default="shapes")           # defaults, for --help to show them
    look.add_argument("--stage", nargs="?", default="1")
    look.add_argument("--lora", action="store_true")
    seen = look.parse_known_args(argv)[0]
    name, stage = (seen.preset, int(seen.stage)) if seen.stage in ("0", "1", "2") else ("shapes", 1)
    shown = preset(name, stage, seen.lora) or preset("shapes", 1)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"The defaults shown are --preset {name if preset(name, 1) else 'shapes'} "
                                       f"--stage {shown.stage}'s; `--preset llava-1.5 --stage 2 --help` shows those.")
    p.add_argument("--preset", default="shapes", help="shapes (the tiny world, default) or llava-1.5")
    notes = dict(re.findall(r"^    (\w+): \w+ = .*?# (.*)$", inspect.getsource(TrainConfig), re.M))  # its comments
    for f in fields(TrainConfig):               # every config field is a flag: --micro-batch 8, --no-lora ...
        flag, v = "--" + f.name.replace("_", "-"), 1 if f.name == "stage" else getattr(shown, f.name)
        default = f"default {v}" if v != "" else "required" * (name == "llava-1.5" and f.name in NEEDED[shown.stage])
        kw = dict(help="; ".join(filter(None, [notes.get(f.name), default])).replace("%", "%%"))
        if f.type is bool or f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, **kw)
        else:
            p.add_argument(flag, type={"int": int, "float": float, "str": str}.get(str(f.type), f.type), default=None,
                           choices=CHOICES.get(f.name), **kw)
    args = p.parse_args(argv)
    stage = args.stage if args.stage is not None else 1
    over = {k: v for k, v in vars(args).items() if k in {f.name for f in fields(TrainConfig)} and v is not None}
    if (base := preset(args.preset, stage, over.get("lora"))) is None:
        p.error(f"no preset {args.preset!r}: choose shapes or llava-1.5")
    cfg = replace(base, **over)
    if stage == 0 and args.preset != "shapes":
        p.error(f"--preset {args.preset} has no stage 0 (the Shapes world's CLIP and LLaMA)")
    stage0_reads = ["data", "model_base", "vision_tower", "seed", "ckpt_dir", "resume", "stop_after"]   # stage0.main
    unread = dict.fromkeys(("lora_r", "lora_alpha", "lora_dropout") * (not cfg.lora), "only with --lora") | (
        dict(val_samples="--val-data is the validation set: nothing is held out") if cfg.val_data else {}) | {
        0: dict.fromkeys(set(over) - {"stage", *stage0_reads}, "stage 0 reads only " + ", ".join(
            "--" + k.replace("_", "-") for k in stage0_reads)),
        1: dict(projector="stage 1 trains a new projector (into --out)"),
        2: dict(projector_type="stage 2 trains the projector in --projector")}[stage]
    if bad := [k for k in over if k in unread]:    # a flag the stage would ignore, silently: refused
        p.error(f"--{bad[0].replace('_', '-')}: {unread[bad[0]]}")
    if args.preset == "llava-1.5" and (missing := [f for f in NEEDED[max(1, stage)] if not getattr(cfg, f)]):
        p.error("--preset llava-1.5 needs " + ", ".join("--" + m.replace("_", "-") for m in missing))
    return cfg


def main(argv=None):
    cfg = parse_args(argv)
    try:
        if cfg.stage == 0:
            import stage0
            return stage0.main(cfg)
        need_dirs(*filter(None, [cfg.model_base, cfg.vision_tower] + [cfg.projector] * (cfg.stage == 2)))   # first
        if os.path.normpath(os.path.dirname(cfg.data)) == os.path.join("data", "shapes"):   # the default world:
            import shapes                       # made on a fresh clone (about 15 s); one an older shapes.py made
            shapes.ensure("data/shapes")        # is refused (fewer samples: lower accuracy)
        model = train(cfg)
    except (Interrupted, KeyboardInterrupt) as e:  # KeyboardInterrupt: Ctrl-C while loading or making the data
        print(str(e) or "interrupted before the first step", file=sys.stderr)
        return 130                                 # the shell's code for "ended by Ctrl-C"
    except (DataError, CheckpointError, UsageError, Diverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError as e:       # a setting to change, not a bug: say which
        tips = (["lower --micro-batch (the global --batch-size stays)"] + ["add --grad-checkpointing"] * (
            not cfg.grad_checkpointing) + ["use --lora"] * (cfg.stage == 2 and not cfg.lora))
        print(f"error: {'. '.join(str(e).split('. ')[:2])}: {', or '.join(tips)}", file=sys.stderr)
        return 2
    if model is not None:                          # rank 0 writes the result
        try:
            export(model, cfg, model.tokenizer_path)
        except (CheckpointError, KeyboardInterrupt) as e:    # a full disk, Ctrl-C: the final snapshot has it all
            stopped = isinstance(e, KeyboardInterrupt)
            print(("interrupted while writing the model" if stopped else f"error: {e}") + f"; the trained run is in "
                  f"{run_dirs(cfg)[1]}: the same command with --resume writes the model again", file=sys.stderr)
            return 130 if stopped else 2
        m = model.metrics
        val = f"validation {m['val'][-1]['loss']:.4f}" if m["val"] else "no validation set"
        print(f"stage {cfg.stage} done: {len(m['train'])} steps, final loss {m['train'][-1]['loss']:.4f}, {val}; "
              f"model in {cfg.out}, records in {model.log_dir}"
              + (f"; {len(m['skipped'])} sample(s) skipped (unreadable image, tokenization mismatch, no answer "
                 f"within --max-length: listed in metrics.json)"
                 if m["skipped"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
