"""Tiny random reference models from `transformers`, and the same weights written in every checkpoint layout.

Nothing is downloaded: each model is built from a config with a fixed seed, and saved with save_pretrained or
re-keyed to the layouts of the published checkpoints (reference/hf-parity.md §2, llava-recipe.md §6)."""
import json
import os

import torch
from transformers import (CLIPConfig, CLIPModel, CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig,
                          LlavaForConditionalGeneration)
from transformers.utils import logging as hf_logging

from checkpoint import write_safetensors

hf_logging.set_verbosity_error()
IMG = 319                                       # the HF image token id in the tiny vocabulary


def vision_config(layers=3, init=0.2):
    return CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                            image_size=28, patch_size=14, initializer_range=init)     # 2 x 2 = 4 patches


def text_config(kv_heads=2, init=0.2, vocab=320):
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=kv_heads, vocab_size=vocab, rms_norm_eps=1e-5, initializer_range=init,
                       pad_token_id=0, max_position_embeddings=256)


def hf_llava(seed=0):
    """initializer_range 0.2: logits of order 1-10, so greedy choices are never near-ties."""
    torch.manual_seed(seed)
    cfg = LlavaConfig(vision_config=vision_config(), text_config=text_config(), image_token_index=IMG,
                      image_seq_length=4)
    return LlavaForConditionalGeneration._from_config(cfg, attn_implementation="eager").eval()


def hf_llama(kv_heads=2, seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM._from_config(text_config(kv_heads), attn_implementation="eager").eval()


def to_hf_ids(ids, n=4):
    """Our ids (one -200 per image) -> HF's (the image token repeated once per patch)."""
    return [t for i in ids for t in ([IMG] * n if i == -200 else [i])]


def _parts(hf):
    """The HF LLaVA's weights split into (vision, projector, llm), with the published checkpoints' key names."""
    vision, projector, llm = {}, {}, {}
    for k, v in hf.state_dict().items():
        if k.startswith("model.vision_tower."):
            vision["vision_model." + k[len("model.vision_tower."):]] = v
        elif k.startswith("model.multi_modal_projector."):
            projector[k[len("model.multi_modal_projector."):].replace("linear_1", "0").replace("linear_2", "2")] = v
        elif k.startswith("model.language_model."):
            llm["model." + k[len("model.language_model."):]] = v
        else:
            llm[k] = v                          # lm_head.weight
    return vision, projector, llm


def _json(path, d):
    with open(path, "w") as f:
        json.dump(d, f, indent=1)


def write_llava_hf(hf, d, published=True):
    """published: keys as llava-hf/llava-1.5-7b-hf has them; else transformers 5's own save of a fresh model."""
    hf.save_pretrained(d)
    if published:                               # 5.x writes `vision_tower.embeddings...`; the Hub files say
        path = os.path.join(d, "model.safetensors")  # `vision_tower.vision_model.embeddings...`
        from checkpoint import read_safetensors
        sd = {("vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.") else k): v
              for k, v in read_safetensors(path)}
        write_safetensors(sd, path)
    return d


def write_clip(hf, d, seed=1):
    """A full CLIPModel directory (vision + text tower + projections), as openai/clip-vit-large-patch14-336 is."""
    torch.manual_seed(seed)
    cfg = CLIPConfig(vision_config=hf.config.vision_config.to_dict(), projection_dim=16,
                     text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, vocab_size=99, bos_token_id=0, eos_token_id=1))
    clip = CLIPModel(cfg)
    vision, _, _ = _parts(hf)
    missing, unexpected = clip.load_state_dict(vision, strict=False)
    assert not unexpected and all(not k.startswith("vision_model.") for k in missing)
    clip.save_pretrained(d)
    _json(os.path.join(d, "preprocessor_config.json"), dict(
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
        crop_size=28, size=28))
    return d


def _llama_config(hf):
    return {k: v for k, v in hf.config.text_config.to_dict().items() if k != "dtype"} | {"model_type": "llama"}


def _shard(sd, d, fmt, n_shards=2):
    """Write a state dict as n shards + the index HF and the LLaVA repo use."""
    keys = sorted(sd)
    chunks = [keys[i::n_shards] for i in range(n_shards)]
    ext, stem = (".bin", "pytorch_model") if fmt == "bin" else (".safetensors", "model")
    weight_map = {}
    for i, chunk in enumerate(chunks):
        name = f"{stem}-{i + 1:05d}-of-{n_shards:05d}{ext}"
        part = {k: sd[k].contiguous() for k in chunk}
        torch.save(part, os.path.join(d, name)) if fmt == "bin" else write_safetensors(part, os.path.join(d, name))
        weight_map.update({k: name for k in chunk})
    _json(os.path.join(d, f"{stem}{ext}.index.json"), {"metadata": {}, "weight_map": weight_map})


def write_liuhaotian(hf, d, clip_dir, fmt="bin", vision_copy=True, inv_freq=True):
    """liuhaotian/llava-v1.5-7b: LLaMA keys + model.mm_projector.*, .bin shards with an index, CLIP elsewhere.
    vision_copy: a self-trained, non-consolidated checkpoint also carries model.vision_tower.vision_tower.*."""
    os.makedirs(d, exist_ok=True)
    vision, projector, llm = _parts(hf)
    sd = dict(llm) | {"model.mm_projector." + k: v for k, v in projector.items()}
    if vision_copy:
        sd |= {"model.vision_tower.vision_tower." + k: v for k, v in vision.items()}
    if inv_freq:
        sd |= {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(8) for i in range(2)}
    _shard(sd, d, fmt)
    _json(os.path.join(d, "config.json"), _llama_config(hf) | dict(
        architectures=["LlavaLlamaForCausalLM"], model_type="llava", mm_vision_tower=clip_dir, mm_hidden_size=64,
        mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_vision_select_feature="patch",
        image_aspect_ratio="pad", mm_use_im_start_end=False, mm_use_im_patch_token=False))
    return d


def write_llama(hf, d, fmt="safetensors"):
    """A plain HF LLaMA/Vicuna directory (the base LLM of stage 1), sharded."""
    os.makedirs(d, exist_ok=True)
    _, _, llm = _parts(hf)
    _shard(llm, d, fmt)
    _json(os.path.join(d, "config.json"), _llama_config(hf) | {"architectures": ["LlamaForCausalLM"]})
    return d


def write_stage1(hf, d, base_dir, clip_dir):
    """The official stage-1 output: config.json + mm_projector.bin (keys model.mm_projector.*)."""
    os.makedirs(d, exist_ok=True)
    _, projector, _ = _parts(hf)
    torch.save({"model.mm_projector." + k: v for k, v in projector.items()}, os.path.join(d, "mm_projector.bin"))
    _json(os.path.join(d, "config.json"), _llama_config(hf) | dict(
        _name_or_path=base_dir, model_type="llava", mm_vision_tower=clip_dir, mm_hidden_size=64,
        mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2))
    return d


def write_lora(hf, d, clip_dir, adapters, r, alpha):
    """liuhaotian/llava-v1.5-7b-lora (llava-recipe.md §6): config.json, PEFT adapter_config.json + adapter_model.bin
    (keys base_model.model.<LLaMA key with .lora_A/.lora_B>), and the projector in non_lora_trainables.bin (keys
    base_model.model.model.mm_projector.*). adapters: {LLaMA weight key: (A (r, in), B (out, r))}."""
    os.makedirs(d, exist_ok=True)
    _, projector, _ = _parts(hf)
    torch.save({"base_model.model.model.mm_projector." + k: v for k, v in projector.items()},
               os.path.join(d, "non_lora_trainables.bin"))
    torch.save({"base_model.model." + k.replace(".weight", f".lora_{ab}.weight"): t for k, pair in adapters.items()
                for ab, t in zip("AB", pair)}, os.path.join(d, "adapter_model.bin"))
    _json(os.path.join(d, "adapter_config.json"), dict(peft_type="LORA", task_type="CAUSAL_LM", r=r, lora_alpha=alpha,
                                                       lora_dropout=0.05, bias="none",
                                                       base_model_name_or_path="lmsys/vicuna-7b-v1.5"))
    _json(os.path.join(d, "config.json"), _llama_config(hf) | dict(
        _name_or_path="lmsys/vicuna-7b-v1.5", architectures=["LlavaLlamaForCausalLM"], model_type="llava",
        mm_vision_tower=clip_dir, mm_hidden_size=64, mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
        mm_vision_select_feature="patch", image_aspect_ratio="pad", mm_use_im_start_end=False))
    return d
