"""
Speed and memory, side by side with transformers' LlavaForConditionalGeneration: same weights, same dtype, same
device, same prompts, in one run. Each side uses the best attention it offers (ours: SDPA; HF: "sdpa").

    python bench.py                                   # CPU: the bundled tiny LLaVA and a ~100M-parameter config
    python bench.py --config 7b --device cuda --dtype bfloat16 --only inference --compile   # LLaVA-1.5-7B shapes
    python bench.py --config 7b --device cuda --dtype bfloat16 --only training --lora --grad-checkpointing \\
        --train-batch 16                              # our stage-1 and stage-2 LoRA steps alone: memory, MFU
    python bench.py --compile ...                     # ours compiled: decode step (on CUDA a CUDA graph), prefill, ViT
    python bench.py --load models/llava-v1.5-7b --vision-tower models/clip-vit-large-patch14-336   # peak RSS of
                                                      # loading a checkpoint, against its bf16 size

Needs `transformers` (requirements-dev.txt): the reference is measured, never imported by the model code.
Timings are medians over --iters runs after a warm-up. Results (and the machine) are written to --out as JSON.
"""
import argparse
import contextlib
import os
import platform
import signal
import statistics
import subprocess
import sys
import time

import torch

import llama
import vit
from chat import known_device
from checkpoint import CheckpointError, free_memory, llava_hf_key, write_json
from data import DataError, whole, writable_dir
from model import IMAGE_TOKEN_INDEX, LlavaConfig, Llava

CONFIGS = {  # name -> (our config or a checkpoint dir, prompt text tokens, new tokens, training text tokens)
    "tiny": ("models/shapes-llava", 40, 64, 96),
    "100m": (LlavaConfig(vision=vit.VisionConfig(image_size=224, patch_size=16, hidden_size=384, intermediate_size=1536,
                                                 num_hidden_layers=6, num_attention_heads=6, projection_dim=384),
                         text=llama.LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                                                num_hidden_layers=8, num_attention_heads=12, num_key_value_heads=12,
                                                max_position_embeddings=2048)), 64, 64, 256),
    "7b": (LlavaConfig(vision=vit.PRESETS["clip-vit-large-patch14-336"], text=llama.PRESETS["vicuna-7b-v1.5"]),
           64, 128, 2048 - 576),
}


# ---------------------------------------------------------------------------------------------- the two models
def build(name, device, dtype, with_hf=True, full_training=False):
    """Our model and the HF model holding exactly the same weights (None without with_hf)."""
    from transformers import CLIPVisionConfig, LlavaConfig as HFConfig, LlavaForConditionalGeneration
    from transformers import LlamaConfig as HFLlamaConfig
    src = CONFIGS[name][0]
    if isinstance(src, str):
        ours = Llava.from_pretrained(src, dtype=dtype, device=device)
    else:
        with torch.device("meta"):          # counted first: 7B in fp32 on a laptop would meet the OOM killer
            m = Llava(src)
        n, n_llm = (sum(p.numel() for p in x.parameters()) for x in (m, m.language_model))
        # the weights, and for a full stage 2 the LLM's gradients and two AdamW moments: a lower bound
        need = (2 if with_hf else 1) * dtype.itemsize * (n + 3 * n_llm * full_training)
        if need > (free := free_memory(device)):
            raise MemoryError(f"--config {name} needs at least {need / 2**30:.1f} GiB in {dtype} (ours"
                              f"{' and transformers' if with_hf else ''}); {device} has {free / 2**30:.1f} GiB free")
        torch.manual_seed(0)
        with torch.device(device):
            ours = Llava(src).to(dtype)
        ours.language_model.init_weights()
    if not with_hf:
        return ours, None, None
    c = ours.cfg
    v, t = c.vision, c.text
    image_token = t.vocab_size - 1                                     # HF marks image positions with a real id
    hf_cfg = HFConfig(
        # our configs use HF's field names; the preprocessing fields are not part of HF's model config
        vision_config=CLIPVisionConfig(**{k: x for k, x in vars(v).items() if k not in ("image_mean", "image_std")}),
        text_config=HFLlamaConfig(**vars(t)),
        image_token_index=image_token, image_seq_length=c.image_tokens, vision_feature_layer=c.vision_feature_layer,
        vision_feature_select_strategy="default" if c.vision_feature_select == "patch" else "full",
        projector_hidden_act="gelu")
    with torch.device(device):
        hf = LlavaForConditionalGeneration._from_config(hf_cfg, attn_implementation="sdpa", dtype=dtype)
    mine = ours.state_dict()             # each HF key through checkpoint.py's llava-hf map to the weight it names
    hf.load_state_dict({k: mine[llava_hf_key(k)] for k in hf.state_dict()}, strict=True)
    ours.eval(), hf.eval()
    return ours, hf, image_token


def widen(x, values, n, fill=None):
    """Our layout -> HF's: wherever x (B, T) holds -200, repeat the aligned entry of `values` (or `fill`) n times.
    Ids (fill = HF's image token id), attention masks (fill None: the mask bit) and labels (fill -100) alike."""
    return torch.tensor([[w for i, v in zip(row, vrow) for w in ([v if fill is None else fill] * n
                                                                   if i == IMAGE_TOKEN_INDEX else [v])]
                         for row, vrow in zip(x.tolist(), values.tolist())], device=x.device)


class Rows(dict):
    """One config's results, each row printed as it is measured: a compiled 7B run takes minutes, and one stopped
    early (Ctrl-C, or `timeout`'s SIGTERM) has printed, and writes to --out, every row it finished."""
    def __setitem__(self, k, v):
        super().__setitem__(k, v)
        (a, b), fmt = v, lambda x: "-" if x is None else f"{x:.3g}"
        ratio = f"{a / b:.2f}x" if a is not None and b else ""
        print(f"{k:34} {fmt(a):>10} {fmt(b):>13} {ratio:>8}", flush=True)


# --------------------------------------------------------------------------------------------------- timing
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, iters, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def copy_bandwidth(device, n=2**29):             # bytes read + written per second by a device-to-device copy
    x = torch.randn(n, device=device)             # 2 GiB of random data: GPUs can run faster on zeros
    y = torch.empty_like(x)
    return 2 * x.numel() * x.element_size() / timed(lambda: y.copy_(x), device, 10)


def peak_memory(fn):                               # CUDA only: on a CPU both models share one process's RSS
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    return torch.cuda.max_memory_allocated() / 2**30


def prompts(c, batch, text_len, device, seed=0, ragged=False):
    """Random text ids with one image placeholder after a short prefix; left-padded when ragged."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(batch):
        n = text_len - (3 * b if ragged else 0)
        ids = torch.randint(3, c.text.vocab_size - 1, (n,), generator=g).tolist()
        rows.append([1] + ids[:4] + [IMAGE_TOKEN_INDEX] + ids[4:])
    T = max(map(len, rows))
    x = torch.tensor([[0] * (T - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows], device=device)
    return x, mask


# ------------------------------------------------------------------------------------------------- measures
def bench_inference(ours, hf, image_token, args, device, dtype, r):
    c, N = ours.cfg, ours.cfg.image_tokens
    _, text_len, new_tokens, _ = CONFIGS[args.config]
    S = c.vision.image_size
    pix = torch.randn(1, 3, S, S, device=device, dtype=dtype)
    ids, mask = prompts(c, 1, text_len, device)
    hids = widen(ids, ids, N, image_token)

    def gen(x, px, m, n):                       # eos -1: never stop early, every run makes n tokens
        return ours.generate(x, px, attention_mask=m, max_new_tokens=n, eos_token_id=-1)
    with torch.inference_mode():
        # correctness first: the same weights must give the same next-token logits
        a = ours.prefill(ids, pix, ours.new_cache(1, ids.shape[1] + N + 8)).float()
        b = hf(input_ids=hids, pixel_values=pix).logits[:, -1].float()
        r["max |logit diff| vs HF"] = ((a - b).abs().max().item(), None)
        r["image encoding (ms)"] = (
            1e3 * timed(lambda: ours.encode_images(pix), device, args.iters),
            1e3 * timed(lambda: hf.model.get_image_features(
                pixel_values=pix, vision_feature_layer=c.vision_feature_layer,
                vision_feature_select_strategy=hf.config.vision_feature_select_strategy), device, args.iters))
        r["time to first token (ms)"] = (
            1e3 * timed(lambda: ours.prefill(ids, pix, ours.new_cache(1, ids.shape[1] + N + 1)), device, args.iters),
            1e3 * timed(lambda: hf(input_ids=hids, pixel_values=pix, use_cache=True, logits_to_keep=1), device,
                        args.iters))
        for label, batch in (("decode, batch 1 (tok/s)", 1), ("decode, batch 8 (tok/s)", 8)):
            x, m = prompts(c, batch, text_len, device, seed=batch, ragged=batch > 1)
            hx, hm = widen(x, x, N, image_token), widen(x, m, N)
            px = pix.expand(batch, -1, -1, -1)

            def hf_gen(n):
                return hf.generate(input_ids=hx, pixel_values=px, attention_mask=hm, do_sample=False,
                                   min_new_tokens=n, max_new_tokens=n, pad_token_id=0)

            def rate(run):       # decode speed: the tokens after the first over the time after the first
                t_n, t_1 = (timed(lambda: run(n), device, args.iters) for n in (new_tokens, 1))
                return batch * (new_tokens - 1) / (t_n - t_1)
            r[label] = (rate(lambda n: gen(x, px, m, n)), rate(hf_gen))
        if device.type == "cuda":
            # batch-1 decode reads every LLM weight once per token: weight bytes over the measured copy bandwidth
            # is the most tokens/s any implementation can make (perf-anchors.md; 356 tok/s on an H200 datasheet)
            weights = sum(p.numel() * p.element_size() for p in ours.language_model.parameters())
            ceiling = copy_bandwidth(device) / weights
            r["decode ceiling, batch 1 (tok/s)"] = (ceiling, None)
            r["decode, batch 1 / ceiling"] = tuple(x / ceiling for x in r["decode, batch 1 (tok/s)"])
            r["peak memory, generate (GiB)"] = (
                peak_memory(lambda: gen(ids, pix, mask, new_tokens)),
                peak_memory(lambda: hf.generate(input_ids=hids, pixel_values=pix, do_sample=False,
                                                max_new_tokens=new_tokens, pad_token_id=0)))


def bench_training(ours, hf, image_token, args, device, dtype, r):
    """One optimizer step of stage 1 (projector learns; gradients still flow through the frozen LLM) and of
    stage 2 (projector + LLM learn, or with --lora the adapters), on the same batch and set up as train.py sets
    them up (on CUDA bf16 autocast, trainable weights kept in fp32); tokens/s counts every LLM position. hf None:
    ours alone. On a GPU train.peak_bf16 knows, MFU as train.py reports it."""
    import train
    from lora import apply_lora
    c, N = ours.cfg, ours.cfg.image_tokens
    text_len = CONFIGS[args.config][3]
    B = args.train_batch
    S = c.vision.image_size
    pix = torch.randn(B, 3, S, S, device=device, dtype=dtype)
    x, m = prompts(c, B, text_len, device, seed=3)
    labels = x.clone()
    labels[:, :text_len // 2] = -100                     # the first half is "prompt", the rest "answer"
    hx, hl = widen(x, x, N, image_token), widen(x, labels, N, -100)
    tokens = B * hx.shape[1]
    cuda = device.type == "cuda"
    amp = train.autocast_dtype(device)                   # train.py's precision choice: on a CPU, none
    ctx = torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()
    peak = train.peak_bf16(device)
    for stage in (1, 2):
        res = []
        # ours as train.py calls it: no (B, T, V) logits, the vocab projection only where a label is
        sides = [(ours, lambda: ours(x, pix, labels, return_logits=False).loss)]
        if hf is not None:
            sides.append((hf, lambda: hf(input_ids=hx, pixel_values=pix, labels=hl).loss))
        for model, step in sides:
            model.train()
            model.requires_grad_(False)
            proj = model.mm_projector if model is ours else model.model.multi_modal_projector
            llm = model.language_model if model is ours else model.model.language_model
            proj.requires_grad_(True)
            if stage == 2 and args.lora:
                apply_lora(llm, 128, 256, 0.05)       # finetune_lora.sh; the adapters are made in fp32
            elif stage == 2:
                llm.requires_grad_(True)
                if model is hf:
                    model.lm_head.requires_grad_(True)
            if cuda:                                  # fp32 masters under autocast, as train.py keeps them
                train.fp32_masters(model)
            if args.grad_checkpointing:
                if model is ours:
                    ours.language_model.grad_checkpointing = True
                else:
                    hf.gradient_checkpointing_enable()
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=cuda)
            if model is ours:                         # HF's side: the same model and trainable set, the same FLOPs
                flops = ours.step_counts(x, m, labels)[2].item()

            def one():
                with ctx:
                    loss = step()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            t = timed(one, device, args.iters)
            res.append((tokens / t, peak_memory(one) if cuda else None, flops / t / peak if peak else None,
                        sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6))
            model.requires_grad_(False)
            model.eval()
        res.append((None,) * 4)                       # ours alone: no transformers column
        r[f"stage {stage} train step (tok/s)"] = (res[0][0], res[1][0])
        r[f"stage {stage} trainable (M)"] = (res[0][3], res[1][3])   # the two sides train the same weights
        if cuda:
            r[f"stage {stage} peak memory (GiB)"] = (res[0][1], res[1][1])
        if peak:
            r[f"stage {stage} MFU"] = (res[0][2], res[1][2])


def bench_load(path, vision_tower=None):
    """Peak RSS of from_pretrained in a fresh process, against the model's bf16 size."""
    code = ("import resource, sys, torch; from model import Llava; from checkpoint import CheckpointError\n"
            f"try: m = Llava.from_pretrained({path!r}, {vision_tower!r}, dtype=torch.bfloat16, device='cpu')\n"
            "except CheckpointError as e: sys.exit(f'error: {e}')\n"
            "n = sum(p.numel() for p in m.parameters()); "
            "print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    t = time.time()
    r = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,   # its stderr is ours
                       cwd=os.path.dirname(os.path.abspath(__file__)))
    if r.returncode:
        return 2
    out = r.stdout.split()
    n, rss = int(out[-2]), int(out[-1]) * 1024
    print(f"{path}: {n / 1e9:.2f} B parameters = {2 * n / 1e9:.2f} GB in bf16; load {time.time() - t:.0f} s, "
          f"peak RSS {rss / 1e9:.2f} GB = {rss / (2 * n):.2f}x")
    return 0


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=list(CONFIGS), action="append", help="default: tiny and 100m")
    p.add_argument("--device", type=known_device, default="cpu", help="default cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="default float32")
    p.add_argument("--iters", type=whole(1), default=5,
                   help="timed runs of each measurement, after a warm-up (default 5)")
    p.add_argument("--train-batch", type=whole(1), default=4, help="samples per training step (default 4)")
    p.add_argument("--grad-checkpointing", action="store_true", help="in the training steps")
    p.add_argument("--compile", action="store_true",
                   help="ours: torch.compile decode step (on CUDA a CUDA graph), prefill and ViT")
    p.add_argument("--only", choices=["inference", "training"],
                   help="only these figures; training: ours alone, no transformers model on the device (the peak "
                   "memory is ours)")
    p.add_argument("--lora", action="store_true", help="stage 2 trains LoRA adapters (r 128), not the whole LLM")
    p.add_argument("--load", default=None, help="only measure the peak RSS of loading this checkpoint")
    p.add_argument("--vision-tower", default=None, help="with --load: the CLIP dir, where the config names a hub id")
    p.add_argument("--out", default="output/bench.json", help="the figures as JSON (default output/bench.json)")
    return p


def main(argv=None):
    args = (p := build_parser()).parse_args(argv)
    given = {k for k, v in vars(args).items() if v != p.get_default(k)}     # a flag the run would ignore: refused
    ignored = sorted(given - {"load", "vision_tower"} if args.load else given & {"vision_tower"} | (
        given & {"train_batch", "grad_checkpointing", "lora"} if args.only == "inference" else set()))
    if ignored:
        p.error(f"--{ignored[0].replace('_', '-')}: " + ("--load measures loading alone, in bf16 on the CPU"
                if args.load else "only --load reads it" if ignored[0] == "vision_tower" else
                "--only inference trains nothing"))
    if args.load:
        return bench_load(args.load, args.vision_tower)
    try:                                        # an unwritable --out fails now, not after the whole benchmark
        writable_dir(os.path.dirname(args.out) or ".")
        if os.path.isdir(args.out):
            raise DataError(f"{args.out}: a directory; --out names the JSON file")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    from transformers.utils import logging
    logging.set_verbosity_error()
    machine = (torch.cuda.get_device_name() if device.type == "cuda" else
               f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    results, code = {}, 0
    try:
        for name in args.config or ["tiny", "100m"]:
            args.config = name
            ours, hf, image_token = build(name, device, dtype, with_hf=args.only != "training",
                                          full_training=args.only != "inference" and not args.lora)
            if args.compile:
                ours.compile_inference()        # compiled on first use: timed()'s warm-up run pays for it
            n = sum(p.numel() for p in ours.parameters())
            print(f"\n{name}: {n / 1e6:.1f}M parameters, {args.dtype}, {machine}, torch {torch.__version__}")
            print(f"{'':34} {'ours':>10} {'transformers':>13} {'ours/HF':>8}"
                  + ("   (ours: compiled for generation; transformers: eager)" if args.compile else ""))
            results[name] = dict(parameters=n, results=(r := Rows()))
            if args.only != "training":
                bench_inference(ours, hf, image_token, args, device, dtype, r)
            if args.only != "inference":
                bench_training(ours, hf, image_token, args, device, dtype, r)
            del ours, hf
    except KeyboardInterrupt:
        print(f"interrupted: {args.out} holds the rows measured so far", file=sys.stderr)
        code = 130
    except MemoryError as e:                    # (the configs before it are measured and written)
        print(f"error: {e}", file=sys.stderr)
        code = 2
    try:
        write_json(args.out, dict(machine=machine, torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                                  argv=sys.argv[1:], results=results), indent=1)
    except CheckpointError as e:                # a full disk: the rows printed above are all there is
        print(f"error: {e}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)   # `timeout`'s SIGTERM stops a run as Ctrl-C does
    sys.exit(main())
