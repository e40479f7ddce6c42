"""
CLIP's vision transformer (Radford et al. 2021), LLaVA's image encoder (paper §4.1; LLaVA-1.5: ViT-L/14, 336 px).

    pixels (B, 3, S, S) ─conv: (S/P)² patches─▶ [CLS; patches] + positions ─pre-LN─▶ L × pre-LN block ─▶ ...

LLaVA takes the hidden states of the *penultimate* layer, not the output: the last layer of a contrastively
trained ViT specialises in the global CLS summary used for the image-text loss, while the layer before keeps
more local detail per patch (LLaVA paper §4.1; `mm_vision_select_layer = -2` in llava/model/multimodal_encoder/
clip_encoder.py). So forward() stops there and never computes the last layer or `post_layernorm`.
Parameter names follow HF's CLIPVisionModel (minus its `vision_model.` prefix), so CLIP checkpoints load as-is.
"""
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)     # OpenAI CLIP's pixel statistics (CLIPImageProcessor)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionConfig:
    image_size: int = 336
    patch_size: int = 14
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    projection_dim: int = 768            # CLIP's joint image-text space (stage-0 training only; LLaVA ignores it)
    image_mean: tuple = CLIP_MEAN        # preprocessing belongs to the encoder it was trained with
    image_std: tuple = CLIP_STD

    @property
    def num_patches(self):
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf(cls, d: dict, preprocessor: dict | None = None) -> "VisionConfig":
        """From an HF CLIPConfig (`vision_config` nested) or CLIPVisionConfig config.json."""
        v = d.get("vision_config", d)
        # missing keys take HF CLIPVisionConfig's class defaults (ViT-B/32 at 224), not CLIP-L's
        v = dict(image_size=224, patch_size=32, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, projection_dim=d.get("projection_dim", 512)) | v
        kw = {f.name: v[f.name] for f in fields(cls) if v.get(f.name) is not None}
        if preprocessor:                 # preprocessor_config.json, if the checkpoint has one
            kw.update(image_mean=tuple(preprocessor["image_mean"]), image_std=tuple(preprocessor["image_std"]))
        return cls(**kw)


PRESETS = {
    "clip-vit-large-patch14-336": VisionConfig(),                  # LLaVA-1.5: 24 x 24 = 576 patches
    "clip-vit-large-patch14": VisionConfig(image_size=224),        # LLaVA v0/v1: 16 x 16 = 256 patches
    # the Shapes world's encoder (DESIGN.md §5), trained CLIP-style by `train.py --stage 0`: 3 x 3 patches of
    # 24 pixels, one per cell of the Shapes grid, so each image becomes 9 LLM tokens
    "shapes-tiny": VisionConfig(image_size=72, patch_size=24, hidden_size=128, intermediate_size=512,
                                num_hidden_layers=4, num_attention_heads=4, projection_dim=128),
}


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)  # OpenAI CLIP's sigmoid approximation of GELU; its weights expect it


class Embeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        # a conv with stride = kernel = patch size is "cut into patches, flatten, project"; CLIP has no bias here
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, cfg.hidden_size)   # learned, +1 for CLS

    def forward(self, pixels):
        x = self.patch_embedding(pixels)                        # (B, D, S/P, S/P)
        x = x.flatten(2).transpose(1, 2)                        # (B, N, D), patches in row-major order
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight   # (B, N+1, D)


class Attention(nn.Module):              # bidirectional multi-head attention, with biases (unlike LLaMA)
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_head = cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            nn.Linear(cfg.hidden_size, cfg.hidden_size) for _ in range(4))

    def forward(self, x, need_weights=False):
        B, T, D = x.shape
        q, k, v = (p(x).view(B, T, self.n_head, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        if need_weights:                 # the explicit form, for the notebook's attention maps: (B, nh, T, T)
            self.attn_weights = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)
        y = F.scaled_dot_product_attention(q, k, v)                         # (B, nh, T, hd)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.act = quick_gelu if cfg.hidden_act == "quick_gelu" else F.gelu
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):                  # pre-LN: x += Attn(LN(x)); x += MLP(LN(x))
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, need_weights=False):
        x = x + self.self_attn(self.layer_norm1(x), need_weights)
        return x + self.mlp(self.layer_norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)   # (sic) HF's spelling
        self.encoder = nn.ModuleDict(dict(layers=nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))))
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # only for the pooled CLS

    def forward(self, pixels, layer=-2, select="patch", need_weights=False):
        """pixels (B, 3, S, S) -> features of hidden state `layer` (B, N, D) for select="patch", N+1 with CLS
        for "cls_patch". Layers count as HF's `hidden_states`: 0 is the embeddings (after pre_layrnorm), i is
        the output of block i, -1 the last block, -2 (LLaVA's default) the one before it."""
        L = self.cfg.num_hidden_layers
        if not -L - 1 <= layer <= L:
            raise ValueError(f"feature layer {layer} out of range for a {L}-layer ViT")
        if pixels.shape[-2:] != (S := self.cfg.image_size, S):      # (the position table would fail, cryptically)
            raise ValueError(f"images of {tuple(pixels.shape[-2:])} pixels; this vision tower takes {S} x {S} "
                             f"(data.process_image makes them)")
        x = self.pre_layrnorm(self.embeddings(pixels.to(self.embeddings.patch_embedding.weight.dtype)))
        for block in self.encoder.layers[:layer % (L + 1)]:    # blocks past the selected layer are never run
            x = block(x, need_weights)
        # LLaVA-1.5 drops CLS ("patch"): the projector maps each of the 24 x 24 patches to one LLM token
        return x[:, 1:] if select == "patch" else x

    def pooled(self, pixels):
        """CLIP's image embedding before its projection: post_layernorm(CLS of the last layer), (B, D)."""
        return self.post_layernorm(self.forward(pixels, layer=-1, select="cls_patch")[:, 0])


def hf_key(key: str) -> str | None:
    """Name of an HF CLIP checkpoint key in VisionTransformer, or None for keys deliberately not used.

    Published CLIP files are full CLIPModels (`vision_model.*` plus a text tower); transformers 5 saves a
    CLIPVisionModel built from scratch without the `vision_model.` prefix (reference/hf-parity.md §2a)."""
    if key.startswith("vision_model."):
        key = key[len("vision_model."):]
    elif key.startswith(("text_model.", "text_projection.", "visual_projection.", "logit_scale")):
        return None                      # the text tower and the joint-space projections: not LLaVA's business
    return None if key == "embeddings.position_ids" else key            # a buffer old checkpoints stored
