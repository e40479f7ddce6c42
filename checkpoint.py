"""
Reading and writing LLaVA checkpoints in every layout people have on disk (DESIGN.md §4).

No weights are ever held twice: the model is built on the meta device (shapes only, no memory), then each
tensor is read from disk, cast to the target dtype and placed on the target device one at a time, so a 7B
model loads in about its own size of RAM. Every key is checked: an unexpected, missing or mis-shaped key is
an error naming the file and the key. Only keys known to be unused are skipped, on purpose.

    layout        config.json                     weights
    ours          "format": "llava-from-scratch"  model.safetensors (everything, CLIP included)
    liuhaotian    LLaMA keys + mm_* keys          LLaMA + model.mm_projector.* shards; CLIP from its own dir
    stage 1       same, no LLM weights            mm_projector.bin, on top of a base LLM dir and a CLIP dir
    LoRA          same, + adapter_config.json     PEFT adapter_model.* (merged on load) + non_lora_trainables.bin,
                                                  on top of a base LLM dir and a CLIP dir
    llava-hf      text_config + vision_config     language_model.* / vision_tower.* / multi_modal_projector.*
"""
import contextlib
import ctypes
import hashlib
import json
import math
import mmap
import os
import pickle
import random
import shutil
import sys
import zipfile
from dataclasses import fields, is_dataclass

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

import vit
from llama import LlamaConfig
from projector import build_projector
from vit import VisionConfig


class CheckpointError(Exception):
    """A checkpoint that cannot be loaded; the message is one line naming the file (and key)."""


# ----------------------------------------------------------------------------------------------- file formats
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


def read_safetensors(path):
    """Yield (key, tensor) from a .safetensors file, reading one tensor at a time (no mmap of the whole file).
    Format: 8-byte little-endian header length, a JSON header {key: {dtype, shape, data_offsets}}, raw bytes."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or 8 + n > size:
            raise CheckpointError(f"{path}: truncated or not a safetensors file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise CheckpointError(f"{path}: not a safetensors file (unreadable header)") from None
        header.pop("__metadata__", None)
        for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            start, end = info["data_offsets"]
            if 8 + n + end > size:
                raise CheckpointError(f"{path}: truncated: tensor {key} ends at byte {8 + n + end}, file has {size}")
            buf = torch.empty(end - start, dtype=torch.uint8)
            f.seek(8 + n + start)
            f.readinto(memoryview(buf.numpy()))
            yield key, buf.view(DTYPES[info["dtype"]]).reshape(info["shape"])


@contextlib.contextmanager
def replacing(path, suffix=".tmp"):
    """Write to a temporary name, then rename it over `path` (atomic): a crash mid-write never leaves a half-written
    file under its name, nor destroys the good one that was there. Weights, configs, snapshots, records and eval
    answers are all written so. A write that fails (a full disk) removes its temporary file and is one line."""
    tmp = path + suffix
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)                     # a 10 GB half-snapshot must not stay on the disk it filled
        if isinstance(e, OSError):
            raise CheckpointError(f"{path}: cannot write ({e.strerror or e})") from None
        raise


def write_json(path, obj, indent=2):
    with replacing(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=indent)


def write_safetensors(tensors: dict, path, metadata=None):
    """Write tensors one at a time (safetensors.torch.save_file would first copy them all into one buffer)."""
    names = {v: k for k, v in DTYPES.items()}
    header, offset = {"__metadata__": metadata or {"format": "pt"}}, 0
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[k] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)                               # pad so the data starts 8-byte aligned
    with replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for t in tensors.values():
            f.write(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))


def read_bin(path):
    """Yield (key, tensor) from a pickled PyTorch state dict, only through torch.load(weights_only=True)."""
    with open(path, "rb") as f:                    # torch.save writes a zip archive (PK...), before 1.6 a pickle
        if f.read(1) not in (b"P", b"\x80"):
            raise CheckpointError(f"{path}: not a PyTorch file (neither a zip archive nor a pickle)")
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)   # lazily paged in
        except RuntimeError as e:                  # pre-1.6 (non-zip) files cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:           # torch's text is advice; the cause follows "WeightsUnpickler error:"
        why = str(e).split("WeightsUnpickler error:")[-1].strip().split(". ")[0].splitlines()[0][:160]
        raise CheckpointError(f"{path}: refused: it needs more than torch.load(weights_only=True) allows "
                              f"({why})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path}: unreadable PyTorch file ({str(e).splitlines()[0][:160]})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: not a flat state dict of tensors")
    for key, t in sd.items():
        yield key, t                              # the caller copies it out of the mapping...
        release_pages(t)                          # ...so the pages behind it may go


def release_pages(t):
    """Let the kernel drop the memory-mapped file pages behind t. Pages read from a mapping count towards the
    process's memory until the mapping closes: without this, loading a 9.9 GB shard would hold all of it
    resident on top of the copies already made (peak 1.43x the model's size for LLaVA-1.5-7B instead of
    1.05x). Safe: the pages are clean, and are simply re-read from the file if touched again."""
    if sys.platform != "linux" or t.numel() == 0:
        return
    page = mmap.PAGESIZE
    start = t.data_ptr() // page * page
    ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(t.data_ptr() + t.nbytes - start),
                              4)  # MADV_DONTNEED


def read_tensors(path):
    return read_safetensors(path) if path.endswith(".safetensors") else read_bin(path)


def no_lfs_pointer(path):
    """A Hugging Face repo cloned without git-lfs has ~130-byte text pointers in place of its large files."""
    with open(path, "rb") as f:
        if f.read(23) == b"version https://git-lfs":
            raise CheckpointError(f"{path}: a Git LFS pointer, not the file itself: run `git lfs pull` in its clone")
    return path


def tokenizer_for(path, cfg):
    """A tokenizer.model that can serve this model, else one line before the weights load: one with more pieces
    than the embedding has rows (another model's) gives ids past it, an IndexError at the first prompt."""
    import sentencepiece as spm
    try:
        n = spm.SentencePieceProcessor(model_file=no_lfs_pointer(path)).vocab_size()
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a sentencepiece tokenizer.model ({str(e).splitlines()[0]})") from None
    if n > cfg.text.vocab_size:
        raise CheckpointError(f"{path}: {n:,} tokens, but the model's vocabulary has {cfg.text.vocab_size:,}: "
                              f"another model's tokenizer")
    return path


def weight_files(d):
    """The weight files of an HF-style checkpoint dir: one file, or the shards an index names."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if os.path.exists(os.path.join(d, index)):
            shards = sorted(set(read_json(os.path.join(d, index))["weight_map"].values()))
            return [os.path.join(d, s) for s in shards]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if os.path.exists(os.path.join(d, single)):
            return [os.path.join(d, single)]
    raise CheckpointError(f"{d}: no model.safetensors, pytorch_model.bin or shard index")


def read_json(path):                      # every JSON file of a checkpoint holds one object
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return d


# -------------------------------------------------------------------------------------- key maps per layout
# Each maps a checkpoint key to our parameter name, or to None for a key that is unused on purpose.
def clip_key(k):                          # HF CLIP (CLIPModel or CLIPVisionModel) -> vision_tower.*
    sub = vit.hf_key(k)
    return None if sub is None else "vision_tower." + sub


def liuhaotian_key(k):                    # LLaVA repo shards, mm_projector.bin, and plain HF LLaMA/Vicuna
    if k.endswith(".inv_freq") or k.startswith("model.vision_tower."):
        return None   # RoPE buffers old checkpoints saved; the frozen CLIP copy in self-trained shards (#672)
    if "mm_projector." in k:              # strip everything up to "mm_projector.", as the official loader does
        return "mm_projector." + k.split("mm_projector.", 1)[1]
    return "language_model." + k if k.startswith(("model.", "lm_head.")) else k


def llava_hf_key(k):                      # llava-hf: published layout and the transformers-5 save layout
    for old, new in (("model.language_model.", "language_model.model."), ("language_model.model.", None),
                     ("language_model.lm_head.", "language_model.lm_head."), ("lm_head.", "language_model.lm_head.")):
        if k.startswith(old):
            return (new or old) + k[len(old):]
    for old in ("model.vision_tower.", "vision_tower."):
        if k.startswith(old):
            return clip_key(k[len(old):])
    for old in ("model.multi_modal_projector.", "multi_modal_projector."):
        if k.startswith(old):
            return "mm_projector." + k[len(old):].replace("linear_1.", "0.").replace("linear_2.", "2.")
    return None if k.endswith(".inv_freq") else k


# ------------------------------------------------------------------------------------------------- loading
def load_weights(model, sources, dtype, device, fresh=()):
    """sources: [(files, key_map)]. Fill the meta-device `model` tensor by tensor, checking every key.
    Keys under the `fresh` prefixes are not expected: the caller initialises those modules itself."""
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.startswith(fresh)}
    tied = model.cfg.text.tie_word_embeddings
    head = "language_model.lm_head.weight"
    if tied:
        expected.pop(head)                # tied to the embedding: checkpoints store it once, or not at all
    seen = set()
    files = [(no_lfs_pointer(f), key_map) for fs, key_map in sources for f in fs]    # all, before reading one
    where = ", ".join(sorted({os.path.dirname(f) or "." for f, _ in files}))
    need = sum(math.prod(s) for s in expected.values()) * dtype.itemsize
    if need > (free := free_memory(torch.device(device))):   # refused now, not by the OOM killer halfway through
        half = " (bfloat16 needs half: --dtype bfloat16 in chat.py and eval.py)" if dtype.itemsize == 4 else ""
        raise CheckpointError(f"{where}: the weights need {need / 2**30:.1f} GiB in {dtype}; {device} has "
                              f"{free / 2**30:.1f} GiB free{half}")
    # progress in bytes, so that one large file shows it too (ours is one model.safetensors); quiet under 1 GiB
    bar = tqdm(total=need, desc="loading weights", unit="B", unit_scale=True, unit_divisor=1024, disable=need < 2**30)
    for path, key_map in files:
        for key, t in read_tensors(path):
            name = key_map(key)
            if name is None or (tied and name == head):
                continue
            if name not in expected:
                raise CheckpointError(f"{path}: unexpected key {key}")
            if tuple(t.shape) != tuple(expected[name]):
                raise CheckpointError(f"{path}: key {key} has shape {list(t.shape)}, expected {list(expected[name])}")
            module_name, _, leaf = name.rpartition(".")
            module = model.get_submodule(module_name)
            # always a copy: a parameter must never stay backed by a memory-mapped checkpoint file
            t = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype, copy=True)
            if leaf in module._parameters:
                setattr(module, leaf, nn.Parameter(t, requires_grad=module._parameters[leaf].requires_grad))
            else:
                module._buffers[leaf] = t
            seen.add(name)
            bar.update(t.numel() * t.element_size())
    bar.close()
    missing = [k for k in expected if k not in seen]
    if missing:
        raise CheckpointError(f"{where}: missing key {missing[0]}" +
                              (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if tied:
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight


def free_memory(device):
    """Bytes that can still be allocated on the device: on a GPU what CUDA reports free, on Linux the memory the
    kernel can give (MemAvailable) and free swap; elsewhere (macOS, MPS) unknown, and nothing is checked."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return float("inf")
    try:
        info = {x.split(":")[0]: int(x.split()[1]) * 1024 for x in open("/proc/meminfo")}   # kB
        return info["MemAvailable"] + info.get("SwapFree", 0)
    except (OSError, KeyError, ValueError, IndexError):
        return float("inf")


def find_dir(name, base, what, arg):
    """A component directory named by a config (relative to the cwd or to the checkpoint) or an argument."""
    for cand in (name, os.path.join(base, name or "")):
        if name and os.path.isdir(cand):
            return cand
    raise CheckpointError(f"{base}/config.json: {what} {name!r} is not a local directory; pass {arg}=<dir>")


def config_from(path, make):
    """make(): a config parsed from the JSON at path. A missing key, a value of the wrong type or a setting this
    code does not support is one line naming the file (a hand-edited "hidden_size": "128" was a TypeError deep
    in torch)."""
    def check(cfg):                 # each field holds its annotated type; a float field may hold an int
        for f in fields(cfg):
            v = getattr(cfg, f.name)
            if is_dataclass(v):
                check(v)
                continue
            ok = (int, float) if f.type is float else f.type
            if not isinstance(v, ok) or (isinstance(v, bool) and f.type is not bool):
                raise TypeError(f"{f.name} is {v!r}, not {f.type.__name__}")
        return cfg
    try:
        return check(make())
    except KeyError as e:
        raise CheckpointError(f"{path}: missing or unknown {e}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


CLIP_TYPES = ("clip", "clip_vision_model")     # a CLIP dir's model_type: the whole CLIP, or its vision half


def need_dirs(*paths):
    """Refuse, in one line, a model path that is not a directory; for a relative one (a default such as
    models/shapes-llava, run from outside the repository) say where it was looked for."""
    for p in map(str, paths):
        if not os.path.isdir(p):
            where = "" if os.path.isabs(p) else f" (relative to {os.getcwd()})"
            raise CheckpointError(f"{p}: {'not a directory' if os.path.exists(p) else 'no such directory'}{where}")


def of_type(path, types, what):
    """A dir's config.json, refused in one line if it names another kind of model (CLIP and LLM dirs swapped)."""
    need_dirs(path)
    d = read_json(os.path.join(path, "config.json"))
    kind = "llava" if d.get("format") == "llava-from-scratch" else d.get("model_type", types[0])   # ours has none
    if kind not in types:               # (ours read as a LLaMA config: 7B defaults, "needs 25 GiB")
        raise CheckpointError(f"{path}: a {kind} checkpoint, not {what}")
    return d


def clip_config(d):
    pre = os.path.join(d, "preprocessor_config.json")
    return config_from(os.path.join(d, "config.json"), lambda: VisionConfig.from_hf(
        of_type(d, CLIP_TYPES, "a CLIP (the vision tower)"),
        read_json(pre) if os.path.exists(pre) else None))


def liuhaotian_config(d, vision, config_cls, conv_template):
    if d.get("mm_use_im_start_end") or d.get("mm_patch_merge_type", "flat") != "flat":   # (config_from names the file)
        raise ValueError("image start/end tokens and LLaVA-1.6 anyres are not supported")
    if d.get("model_type", "llava") not in ("llava", "llava_llama", "llama"):    # llava_mistral, llava_mpt ...
        raise ValueError(f"a {d['model_type']} checkpoint; only LLaVA on LLaMA (Vicuna) is supported")
    return config_cls(vision=vision, text=LlamaConfig.from_hf(d), projector_type=d.get("mm_projector_type", "linear"),
                      vision_feature_layer=d.get("mm_vision_select_layer", -1),   # official defaults
                      vision_feature_select=d.get("mm_vision_select_feature", "patch"),
                      image_aspect_ratio=d.get("image_aspect_ratio", "square"),  # missing: crop, as official
                      conv_template=conv_template)


def llava_hf_config(d, config_cls):
    if d.get("model_type", "llava") != "llava":   # llava_next (1.6), llava_onevision...: other image handling
        raise ValueError(f"a {d['model_type']} checkpoint; only LLaVA-1 and LLaVA-1.5 (model_type llava) are supported")
    if (d.get("text_config") or {}).get("model_type", "llama") != "llama":       # qwen2, mistral ...
        raise ValueError(f"a {d['text_config']['model_type']} language model; only LLaMA (Vicuna) is supported")
    layer = d.get("vision_feature_layer", -2)
    if not isinstance(layer, int) or d.get("projector_hidden_act", "gelu") != "gelu" or \
            not d.get("multimodal_projector_bias", True):
        raise CheckpointError("config.json: only one feature layer and a biased GELU projector are supported")
    vc = d.get("vision_config")        # absent: CLIP-L/336, as LlavaConfig's default (hf-parity.md §3)
    return config_cls(vision=VisionConfig() if vc is None else VisionConfig.from_hf(vc),
                      text=LlamaConfig.from_hf(d.get("text_config") or {}), projector_type="mlp2x_gelu",
                      vision_feature_layer=layer,
                      vision_feature_select={"default": "patch", "full": "cls_patch"}[
                          d.get("vision_feature_select_strategy", "default")])


class SkipInit(torch.overrides.TorchFunctionMode):
    """Inside it, torch.nn.init's functions leave their tensor as it is."""
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def skeleton(cls, cfg):
    """cls(cfg) on the meta device: shapes only, nothing allocated. Its initialisers are skipped, as meta tensors
    hold no values to fill, and torch runs normal_ on meta through code that imports torch._dynamo, a second of
    every start: a one-shot `python chat.py` took 3.0-3.2 s with them, 1.5-1.7 s without (BENCHMARKS.md)."""
    with torch.device("meta"), SkipInit():
        return cls(cfg)


def load_llava(cls, path, vision_tower=None, dtype=None, device=None, model_base=None):
    from model import LlavaConfig, default_device, default_dtype
    path = str(path)
    need_dirs(path)
    d = read_json(cfg_path := os.path.join(path, "config.json"))
    base = path                                                        # where tokenizer.model is looked for
    # a LoRA dir (liuhaotian/llava-v1.5-7b-lora, or train.py's <out>/adapter): adapters, and the projector they
    # trained (non_lora_trainables.bin) where a stage-1 dir has mm_projector.bin, on top of a base LLM
    lora = os.path.exists(os.path.join(path, "adapter_config.json"))

    def unused(arg, value, holds):             # a path for what the checkpoint holds itself: refused, not ignored
        if value:
            raise CheckpointError(f"{path}: holds {holds}, so {arg} ({value}) would not be used; leave it out")
    if d.get("format") == "llava-from-scratch" or ("text_config" in d or "vision_config" in d) and d.get(
            "model_type") not in CLIP_TYPES:                           # ours and llava-hf hold both
        unused("vision_tower", vision_tower, "its own vision tower")
        unused("model_base", model_base, "its own LLM")
    if d.get("format") == "llava-from-scratch":                        # ours
        cfg, sources = config_from(cfg_path, lambda: LlavaConfig.from_dict(d)), [(weight_files(path), lambda k: k)]
    elif d.get("model_type") in CLIP_TYPES:                           # (it has a vision_config too)
        raise CheckpointError(f"{path}: a CLIP checkpoint, not a LLaVA; it is a vision tower: pass it as "
                              f"vision_tower (`train.py --stage 1 --vision-tower`)")
    elif "text_config" in d or "vision_config" in d:                   # llava-hf
        cfg, sources = config_from(cfg_path, lambda: llava_hf_config(d, LlavaConfig)), [(weight_files(path),
                                                                                           llava_hf_key)]
    elif any(k.startswith("mm_") for k in d):                          # liuhaotian: full model or stage-1 dir
        clip = find_dir(vision_tower or d.get("mm_vision_tower") or d.get("vision_tower"), path, "vision tower",
                        "vision_tower")
        projector = [os.path.join(path, f) for f in ("mm_projector.safetensors", "mm_projector.bin",
                                                     "non_lora_trainables.bin")
                     if os.path.exists(os.path.join(path, f))][:1]
        has_llm = any(os.path.exists(os.path.join(path, f)) for f in (
            "model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json"))
        if has_llm:                        # a full LLaVA, trained with the vicuna_v1 template
            unused("model_base", model_base, "its own LLM")
            vision = clip_config(clip)
            cfg = config_from(cfg_path, lambda: liuhaotian_config(d, vision, LlavaConfig, "vicuna_v1"))
            sources = [(weight_files(path), liuhaotian_key)]
        elif projector:                    # on top of a base LLM: stage 1 (trained with `plain`) or LoRA
            base = find_dir(model_base or d.get("_name_or_path"), path, "base LLM", "model_base")
            mm = {k: v for k, v in d.items() if k.startswith(("mm_", "image_"))}
            vision, base_cfg = clip_config(clip), of_type(base, ("llama",), "a LLaMA (the base LLM)")
            cfg = config_from(os.path.join(base, "config.json"), lambda: liuhaotian_config(
                base_cfg | mm, vision, LlavaConfig, "vicuna_v1" if lora else "plain"))
            sources = [(weight_files(base), liuhaotian_key), (projector, liuhaotian_key)]
        else:
            raise CheckpointError(f"{path}: no weights (no model files and no mm_projector.bin)")
        sources.append((weight_files(clip), clip_key))
    elif d.get("model_type") == "llama":
        raise CheckpointError(f"{path}: a plain LLaMA checkpoint, not a LLaVA; start from it with "
                              f"`train.py --stage 1`, or pass it as model_base for a stage-1 projector")
    else:
        raise CheckpointError(f"{path}/config.json: not a LLaVA checkpoint layout this loader knows")
    tok = [t for t in (os.path.join(p, "tokenizer.model") for p in (path, base)) if os.path.exists(t)]
    tok = tokenizer_for(tok[0], cfg) if tok else None                  # (refused before the weights load)
    device = device or default_device()
    model = skeleton(cls, cfg)
    load_weights(model, sources, dtype or default_dtype(device), device)
    if lora:
        merge_adapters(model, path)
    model.tokenizer_path = tok
    return model.eval()


def merge_adapters(model, path):
    """Fold a LoRA dir's PEFT adapters into the loaded weights, W += (alpha / r) B A, as the official loader's
    merge_and_unload (keys: base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight)."""
    a = read_json(os.path.join(path, "adapter_config.json"))
    if a.get("use_rslora") or a.get("use_dora") or a.get("rank_pattern") or a.get("alpha_pattern") or not {
            "r", "lora_alpha"} <= set(a):     # (per-module ranks or alphas: one alpha / r would scale them wrongly)
        raise CheckpointError(f"{path}/adapter_config.json: only plain LoRA (r, lora_alpha) is supported")
    files = [os.path.join(path, f) for f in ("adapter_model.safetensors", "adapter_model.bin")
             if os.path.exists(os.path.join(path, f))][:1]
    if not files:
        raise CheckpointError(f"{path}: adapter_config.json but no adapter_model.safetensors or adapter_model.bin")
    pairs = {}
    for key, t in read_tensors(no_lfs_pointer(files[0])):     # (load_weights checked the weight files)
        half = next((h for h in (".lora_A.", ".lora_B.") if h in key), None)
        name = half and liuhaotian_key(key.replace("base_model.model.", "", 1).replace(half, ".", 1))
        if name is None:
            raise CheckpointError(f"{files[0]}: unexpected key {key}")
        pairs.setdefault(name, {})["A" if half == ".lora_A." else "B"] = t      # A (r, in), B (out, r)
    params = dict(model.named_parameters())
    for name, ab in pairs.items():
        w = params.get(name)
        if w is None or len(ab) != 2 or (ab["B"].shape[0], ab["A"].shape[1]) != tuple(w.shape) or {
                ab["A"].shape[0], ab["B"].shape[1]} != {a["r"]}:       # (a rank other than r: alpha / r is wrong)
            raise CheckpointError(f"{files[0]}: adapter for {name} does not fit the model")
        delta = (ab["B"].float() @ ab["A"].float()) * (a["lora_alpha"] / a["r"])      # (out, in), as lora.py
        w.data = (w.data.float() + delta.to(w.device)).to(w.dtype)


def load_components(cls, llm_dir, vision_dir, projector_type="mlp2x_gelu", dtype=None, device=None, **kw):
    """Stage 1's starting point: a base LLM (HF LLaMA/Vicuna dir) and a vision tower (HF CLIP dir), each from
    its own checkpoint, and a freshly initialised projector between them."""
    from model import LlavaConfig, default_device, default_dtype
    d, vision = of_type(llm_dir, ("llama",), "a LLaMA (the base LLM)"), clip_config(vision_dir)
    cfg_path = os.path.join(llm_dir, "config.json")
    cfg = config_from(cfg_path, lambda: LlavaConfig(vision=vision, text=LlamaConfig.from_hf(d),
                                                    projector_type=projector_type, **kw))
    tok = os.path.join(llm_dir, "tokenizer.model")
    tok = tokenizer_for(tok, cfg) if os.path.exists(tok) else None
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    model = skeleton(cls, cfg)
    load_weights(model, [(weight_files(llm_dir), liuhaotian_key), (weight_files(vision_dir), clip_key)], dtype, device,
                 fresh=("mm_projector.",))
    with torch.device(device):
        model.mm_projector = build_projector(projector_type, cfg.vision.hidden_size, cfg.text.hidden_size).to(dtype)
    model.tokenizer_path = tok
    return model


def save_llava(model, directory, tokenizer_path=None):
    os.makedirs(directory, exist_ok=True)
    sd = model.state_dict()
    if model.cfg.text.tie_word_embeddings:
        sd.pop("language_model.lm_head.weight")
    write_safetensors(sd, os.path.join(directory, "model.safetensors"))
    write_json(os.path.join(directory, "config.json"), model.cfg.to_dict())
    target = os.path.join(directory, "tokenizer.model")
    if tokenizer_path and os.path.abspath(tokenizer_path) != os.path.abspath(target):
        with replacing(target) as tmp:
            shutil.copyfile(tokenizer_path, tmp)


def save_projector(model, directory, model_base, vision_tower):
    """Stage 1's output: the projector as ours and as the official mm_projector.bin, with the official-style
    config.json (paths relative to the directory) that lets from_pretrained stack it on its base LLM and CLIP."""
    os.makedirs(directory, exist_ok=True)
    sd = {"mm_projector." + k: v.detach().cpu().contiguous() for k, v in model.mm_projector.state_dict().items()}
    write_safetensors(sd, os.path.join(directory, "mm_projector.safetensors"))
    with replacing(os.path.join(directory, "mm_projector.bin")) as tmp:
        torch.save({"model." + k: v for k, v in sd.items()}, tmp)
    write_llava_config(model, directory, model_base, vision_tower, tune_mm_mlp_adapter=True)


def write_llava_config(model, directory, model_base, vision_tower, **extra):
    """The official-style config.json of a dir that holds only part of a LLaVA (a stage-1 projector, LoRA
    adapters): the base LLM's config plus model.cfg's mm_* settings, the base LLM and CLIP named relative to it."""
    c = model.cfg
    write_json(os.path.join(directory, "config.json"), read_json(os.path.join(model_base, "config.json")) | dict(
        _name_or_path=os.path.relpath(model_base, directory), model_type="llava",
        mm_vision_tower=os.path.relpath(vision_tower, directory), mm_hidden_size=c.vision.hidden_size,
        mm_projector_type=c.projector_type, mm_vision_select_layer=c.vision_feature_layer,
        mm_vision_select_feature=c.vision_feature_select, image_aspect_ratio=c.image_aspect_ratio,
        mm_use_im_start_end=False, mm_use_im_patch_token=False) | extra)


# ------------------------------------------------------------------------------- resumable training snapshots
def save_snapshot(path, model, opt, scaler, step, metrics, config: dict, finished=False):
    """Everything train.py needs to continue exactly: trainable weights, optimizer, loss scaler, step (which
    fixes the data position), RNG states, the records so far; written atomically. `finished`: the last step's."""
    state = dict(step=step, finished=finished, config=config, metrics=metrics, optimizer=opt.state_dict(),
                 scaler=scaler.state_dict(),
                 trainable={n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
                 rng=dict(torch=torch.get_rng_state(), python=random.getstate(), numpy=np.random.get_state(),
                          cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with replacing(path) as tmp:                   # a crash mid-write never corrupts the last good snapshot
        torch.save(state, tmp)


def text_sha1(text):              # of a data file's text, 16M characters at a time: no bytes copy of a 1 GB file
    h = hashlib.sha1()
    for k in range(0, len(text), 1 << 24):
        h.update(text[k:k + (1 << 24)].encode())
    return h.hexdigest()


def fingerprint(named_tensors):
    """A sha1 of weights over each tensor's first and last 1,024 values, for a run to tell, before it continues,
    whether the weights it reads again are the ones it started with: another model, or this one retrained, differs
    there, and hashing a 7B model whole would cost seconds on every run."""
    h = hashlib.sha1()
    for name, t in named_tensors:
        flat = t.detach().reshape(-1)
        h.update(name.encode() + torch.cat([flat[:1024], flat[-1024:]]).double().cpu().numpy().tobytes())
    return h.hexdigest()


def check_start(path, resume):
    """Before a run (train.py's, stage 0's) loads anything: --resume needs the snapshot at `path`. Without it, a run
    starts afresh and writes its first snapshot over that one: if that run had not finished, its hours are lost to a
    forgotten --resume, so that is refused in one line. A finished run's snapshot may be overwritten, and so may one
    that cannot be read (it could not be resumed either) or one from before snapshots said whether they finished."""
    if resume:
        if not os.path.exists(path):
            raise CheckpointError(f"{path}: no checkpoint to resume from")
        return
    try:                                           # mmap: the weights and optimizer state are not read
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:                              # none there, damaged, or not a zip-format torch file
        return
    if isinstance(state, dict) and state.get("finished") is False:
        raise CheckpointError(f"{path}: holds the snapshot of a run that has not finished; --resume continues it, "
                              f"or delete it (or give another --ckpt-dir) to start over")


def read_snapshot(path, keys, writer, config: dict, defaults: dict):
    """A snapshot's state (train.py's, stage 0's), refused in one line if it is damaged, lacks `keys` (another
    program wrote it), or was written with other settings than `config` (see load_snapshot for `defaults`)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)   # our own file: optimizer + RNG state
    except Exception as e:     # a damaged file fails as unpickling can: UnpicklingError, ValueError, MemoryError...
        raise CheckpointError(f"{path}: cannot resume from it ({str(e).splitlines()[0].split('. ')[0]})") from None
    if not (isinstance(state, dict) and keys <= set(state)):
        raise CheckpointError(f"{path}: cannot resume from it (not a snapshot {writer} wrote)")
    free = ("resume", "max_steps", "stop_after", "ckpt_every", "eval_every", "num_workers")   # may change
    if diff := [k for k, v in (defaults | state["config"]).items() if k not in free and config.get(k) != v]:
        raise CheckpointError(f"{path}: was written with other settings or inputs ({', '.join(diff)}); resume with the "
                              f"same ones")
    return state


def load_snapshot(path, model, opt, scaler, config: dict, defaults: dict):
    """Restore save_snapshot's state in place; returns (step, metrics). Refuses a run with other settings (train.py
    counts its data's sha1 and its frozen weights' fingerprint among them). `defaults` are the settings' default
    values: a setting added after the snapshot was written is compared as the default, which is what the older
    code ran as (new settings default to the old behaviour)."""
    saved = {"config", "trainable", "optimizer", "scaler", "rng", "step", "metrics"}    # what save_snapshot writes
    state = read_snapshot(path, saved, "train.py", config, defaults)
    params = dict(model.named_parameters())
    for n, t in state["trainable"].items():
        params[n].data.copy_(t)
    try:
        opt.load_state_dict(state["optimizer"])
    except ValueError:            # (before weight decay left biases and norm gains out, the groups were others)
        raise CheckpointError(f"{path}: cannot resume from it (its optimizer has other parameter groups: an older "
                              f"train.py wrote it, which can finish the run)") from None
    scaler.load_state_dict(state["scaler"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state["step"], state["metrics"]


def to_half(directory):
    """Store every floating-point weight of a directory's .safetensors files in fp16 (the bundled tiny models:
    half the bytes in git; from_pretrained casts back to the dtype it loads in)."""
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            path = os.path.join(directory, name)
            write_safetensors({k: v.half() if v.is_floating_point() else v for k, v in read_safetensors(path)}, path)


def build_parser():
    import argparse
    p = argparse.ArgumentParser(description="checkpoint tools")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("half", help="store a model directory's weights in fp16, in place").add_argument(
        "dirs", nargs="+", help="model directories (their .safetensors files)")
    return p


if __name__ == "__main__":
    dirs = build_parser().parse_args().dirs
    for d in dirs:                                 # all checked before any is changed
        if not os.path.isdir(d) or not any(n.endswith(".safetensors") for n in os.listdir(d)):
            why = "no .safetensors file to store in fp16" if os.path.isdir(d) else "no such directory"
            print(f"error: {d}: {why}", file=sys.stderr)
            sys.exit(2)
    try:
        for d in dirs:
            to_half(d)
    except CheckpointError as e:                   # a damaged file, a full disk: each file is replaced whole or not
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:                      # the same: each file is whole, in fp16 or as it was
        print("interrupted: each file is whole, in fp16 or as it was; the same command finishes the rest",
              file=sys.stderr)
        sys.exit(130)
