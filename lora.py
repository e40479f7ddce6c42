"""
LoRA (Hu et al. 2021): fine-tune W as W + (alpha / r) * B @ A with A (r, in) and B (out, r) trained and W frozen.

LLaVA-1.5's single-GPU stage 2 (scripts/v1_5/finetune_lora.sh): r 128, alpha 256, dropout 0.05 on every linear
layer of the LLM (q, k, v, o, gate, up, down; not lm_head), lr 2e-4, the projector trained fully at 2e-5.
Adapters are written in PEFT's layout (`adapter_model.safetensors` + `adapter_config.json`), as the official
code does, with the projector in `non_lora_trainables.bin`.
"""
import json
import math
import os

import torch
import torch.nn as nn

from checkpoint import replacing, write_json, write_llava_config, write_safetensors

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r, alpha, dropout):
        super().__init__()
        self.base, self.r, self.scale = base, r, alpha / r
        self.base.weight.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))   # PEFT's init; B = 0, so W is unchanged at
        nn.init.zeros_(self.lora_B.weight)                             # step 0 and the model starts where it was
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        y = self.base(x)
        if not torch.is_autocast_enabled(x.device.type):    # fp32 adapters on a bf16 model; under autocast the
            x = x.to(self.lora_A.weight.dtype)              # matmul casts anyway, and an fp32 copy of x costs memory
        return y + self.lora_B(self.lora_A(self.dropout(x))).to(y.dtype) * self.scale

    def merged(self) -> nn.Linear:
        w = self.base.weight
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scale        # (out, in)
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=False, device=w.device, dtype=w.dtype)
        out.weight = nn.Parameter((w.float() + delta).to(w.dtype), requires_grad=False)
        return out


def apply_lora(llm: nn.Module, r=128, alpha=256, dropout=0.05, targets=TARGETS):
    """Wrap every target linear of the LLM in place; returns the names of the wrapped modules."""
    names = [n for n, m in llm.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in targets]
    for n in names:
        parent, _, leaf = n.rpartition(".")
        module = llm.get_submodule(parent)
        setattr(module, leaf, LoRALinear(getattr(module, leaf), r, alpha, dropout))
    return names


def merge_lora(llm: nn.Module):
    """Fold every adapter into its base weight (W += scale * B @ A) and drop the LoRA modules."""
    for n, m in list(llm.named_modules()):
        if isinstance(m, LoRALinear):
            parent, _, leaf = n.rpartition(".")
            setattr(llm.get_submodule(parent), leaf, m.merged())


def save_adapter(model, directory, r, alpha, dropout, base_path="", llm=None, clip=None):
    """PEFT layout, as the official LoRA checkpoints (liuhaotian/llava-v1.5-7b-lora) are written. Where stage 2
    began from a stage-1 dir (base_path), a config.json comes along, pointing at the base LLM and CLIP (`llm` and
    `clip` where given, else those the stage-1 dir's config names), so that from_pretrained loads the adapter dir on
    its own (the adapters merged), as it loads the official one."""
    os.makedirs(directory, exist_ok=True)
    src = os.path.join(base_path, "config.json") if base_path else ""
    c = json.load(open(src)) if src and os.path.exists(src) else {}
    where = lambda given, key: given or (os.path.join(base_path, c[key]) if key in c else "")   # relative to it
    llm, clip = where(llm, "_name_or_path"), where(clip, "mm_vision_tower")
    if c and os.path.isdir(llm) and os.path.isdir(clip):
        write_llava_config(model, directory, llm, clip, tune_mm_mlp_adapter=False)
    sd = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    # ours: language_model.model.layers.0.self_attn.q_proj.lora_A.weight
    # PEFT: base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
    write_safetensors({"base_model.model." + k[len("language_model."):]: v for k, v in sd.items()},
                      os.path.join(directory, "adapter_model.safetensors"))
    projector = {"base_model.model.model.mm_projector." + k: v.detach().cpu()
                 for k, v in model.mm_projector.state_dict().items()}
    with replacing(os.path.join(directory, "non_lora_trainables.bin")) as tmp:
        torch.save(projector, tmp)
    write_json(os.path.join(directory, "adapter_config.json"), dict(
        peft_type="LORA", task_type="CAUSAL_LM", r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
        target_modules=list(TARGETS), base_model_name_or_path=base_path))
