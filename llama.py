"""
The LLaMA decoder that LLaVA-1.5 builds on (Vicuna v1.5 has the LLaMA-2 architecture), in plain PyTorch.

    tokens ─embed─▶ N × [ x += Attn(RMSNorm(x)) ; x += SwiGLU(RMSNorm(x)) ] ─RMSNorm─▶ lm_head ─▶ logits

Module and parameter names follow Hugging Face's LlamaForCausalLM (`model.layers.3.self_attn.q_proj.weight`),
so every HF LLaMA/Vicuna checkpoint, and the LLM half of every LLaVA checkpoint, loads without renaming.
RoPE uses HF's rotate-half layout, the one those checkpoints are stored in, so q/k need no permutation.
References: Touvron et al. 2023 (LLaMA-2); transformers/models/llama/modeling_llama.py.
"""
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32        # < num_attention_heads means grouped-query attention (GQA)
    head_dim: int = 0                    # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False    # LLaMA-2/Vicuna/LLaVA keep a separate lm_head
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0                # LLaVA pads with <unk> (id 0), train.py's `pad_token = unk_token`

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, d: dict) -> "LlamaConfig":
        """From an HF llama config.json (or a LLaVA one, which is a LlamaConfig with extra keys)."""
        # Missing keys take HF's LlamaConfig class defaults, not Vicuna's: HF config.json files list only
        # non-default values (reference/hf-parity.md §3).
        hf = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, rms_norm_eps=1e-6, max_position_embeddings=2048,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2) | d
        if hf.get("hidden_act", "silu") != "silu" or hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ValueError("only LLaMA with SiLU and bias-free linears is supported")
        rope = hf.get("rope_parameters") or {}           # transformers 5 keeps RoPE settings here
        scaling = hf.get("rope_scaling") or rope
        if scaling.get("rope_type", scaling.get("type", "default")) != "default":
            raise ValueError(f"RoPE scaling {scaling} is not supported (LLaVA-1.5 uses none)")
        eos, pad = hf["eos_token_id"], hf.get("pad_token_id")
        kw = {f.name: hf[f.name] for f in fields(cls) if hf.get(f.name) is not None}
        kw.update(num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                  rope_theta=rope.get("rope_theta") or hf.get("rope_theta") or 10000.0,
                  eos_token_id=eos[0] if isinstance(eos, list) else eos, pad_token_id=0 if pad is None else pad)
        return cls(**kw)


PRESETS = {
    "vicuna-7b-v1.5": LlamaConfig(),
    "vicuna-13b-v1.5": LlamaConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                   num_attention_heads=40, num_key_value_heads=40),
    # the Shapes world's language model (DESIGN.md §5), pretrained by `train.py --stage 0`
    # 6 query heads share 2 key-value heads (with 6, a key-value head each: the same accuracy over 7 draws, FINDINGS.md)
    "shapes-tiny": LlamaConfig(vocab_size=1024, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                               num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512),
}


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32, cast back *before* the weight multiply: the op order HF uses, which is what makes
        # bf16/fp16 outputs match it bitwise (reference/hf-parity.md §4)
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_cos_sin(positions, head_dim, theta, dtype):
    """cos/sin of the rotary angles for integer positions (B, T) -> two (B, T, head_dim) tensors."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    freqs = positions[..., None].float() * inv_freq                   # (B, T, hd/2), in fp32 as HF does
    emb = torch.cat([freqs, freqs], dim=-1)                            # (B, T, hd): rotate-half layout
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    # x: (B, nh, T, hd). Rotate-half pairs dimension i with i + hd/2 (HF layout); Meta's original code pairs
    # neighbours (2i, 2i+1) instead, which is why its q/k weights need permuting before HF can use them.
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat([-x2, x1], dim=-1) * sin[:, None]


class KVCache:
    """Preallocated keys/values, one (B, n_kv, max_len, hd) tensor per layer. Nothing grows during decoding.

    Slots are filled left to right for the whole batch at once. With left-padded batches some slots hold
    padding; `valid` marks the real ones and doubles as the attention mask (future slots are not valid yet).
    `pos` is each sample's next RoPE position, which skips padding, so a sample's positions do not depend
    on what it was batched with. `slot` is `length` as a tensor, for the decode step (Llama.decode)."""

    def __init__(self, cfg: LlamaConfig, batch, max_len, dtype, device):
        # a tensor per layer, not one (layers, ...) tensor: a compiled step that writes into a view of one big
        # tensor copies all of it every step (torch.compile's functionalization); into a whole tensor it does not
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.length, self.max_len, self.padded = 0, max_len, False      # slots used; any holes in `valid`?

    def reserve(self, valid_new):
        """Claim the next T slots for a chunk of tokens; valid_new (B, T) marks the real ones, which advance pos."""
        start, T = self.length, valid_new.shape[1]
        if start + T > self.max_len:
            raise ValueError(f"KV cache is full: {start} + {T} tokens > max_len {self.max_len}")
        self.valid[:, start:start + T] = valid_new
        self.padded = self.padded or not bool(valid_new.all())
        self.length = start + T
        self.slot.fill_(self.length)
        self.pos += valid_new.sum(1)
        return start


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg, nh, nkv, hd = cfg, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, nh * hd, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, nkv * hd, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, nkv * hd, bias=False)
        self.o_proj = nn.Linear(nh * hd, cfg.hidden_size, bias=False)
        self.gqa = nkv != nh               # GQA: each k/v head serves nh/n_kv query heads, which SDPA broadcasts

    def forward(self, x, cos, sin, mask, kv=None, start=0, last=False):
        # kv: this layer's cache (keys, values), each (B, n_kv, max_len, hd), or None. Not (cache, layer index):
        # torch.compile would specialise a compiled block on the index, a graph per layer (train.py --compile)
        (B, T, _), hd = x.shape, self.cfg.head_dim
        # last: a prefill's final block needs its output at the last position only (the next-token logits), but
        # keys and values at every position, for the cache: it saves most of that block's matmuls
        xq, cq, sq = (x[:, -1:], cos[:, -1:], sin[:, -1:]) if last else (x, cos, sin)
        Tq = xq.shape[1]
        q = self.q_proj(xq).view(B, Tq, -1, hd).transpose(1, 2)         # (B, nh, Tq, hd)
        k = self.k_proj(x).view(B, T, -1, hd).transpose(1, 2)           # (B, n_kv, T, hd)
        v = self.v_proj(x).view(B, T, -1, hd).transpose(1, 2)           # (B, n_kv, T, hd)
        q, k = apply_rope(q, cq, sq), apply_rope(k, cos, sin)
        if isinstance(start, torch.Tensor):     # Llama.decode: one token into slot `start`, a (1,) tensor, then
            kv[0].index_copy_(2, start, k)      # attend over all max_len slots, the unfilled ones masked:
            kv[1].index_copy_(2, start, v)      # shapes that never change, so the step compiles once
            k, v = kv                                                            # (B, n_kv, max_len, hd)
        elif kv is not None:                                             # write this chunk, read all so far
            kv[0][:, :, start:start + T], kv[1][:, :, start:start + T] = k, v
            if start:           # a first chunk has nothing earlier to read (and may be one row for all B)
                k, v = kv[0][:, :, :start + T], kv[1][:, :, :start + T]            # views, no copy
        # both flags plain bools, also where torch.compile traces shapes as symbols (compile_inference's prefill):
        # SDPA wants bools (torch 2.6 rejects an enable_gqa computed from k's and q's traced shapes); GQA: no copies
        causal = True if mask is None and Tq > 1 and start == 0 else False     # the last query sees all keys
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, :, -Tq:],
                                           is_causal=causal, enable_gqa=self.gqa)                 # (B,nh,Tq,hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, Tq, -1))        # (B, Tq, nh*hd) -> (B, Tq, D)


class MLP(nn.Module):                    # SwiGLU (Shazeer 2020), as in LLaMA
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, kv=None, start=0, last=False):
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, start, last)
        x = (x[:, -1:] if last else x) + h                              # last: (B, 1, D) from here on
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            layers=nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers)),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.grad_checkpointing = False  # recompute each block in backward: activation memory O(layers), not O(ops)
        self.compiled, self.caches = False, {}                                  # see compile_inference

    def new_cache(self, batch, max_len, dtype=None):
        w = self.lm_head.weight
        if not self.compiled:
            return KVCache(self.cfg, batch, max_len, dtype or w.dtype, w.device)
        # compiled: a new shape would mean a new compile and a new tensor a new CUDA graph, so round max_len up
        # to a multiple of 256 (the extra slots stay masked) and hand out the same tensors again, emptied
        key = (batch, -(-max_len // 256) * 256, dtype or w.dtype)
        if key not in self.caches:
            c = self.caches[key] = KVCache(self.cfg, *key[:2], key[2], w.device)
            for t in (*c.k, *c.v, c.valid, c.pos, c.slot):   # one address for life, so a CUDA graph may bake it
                torch._dynamo.mark_static_address(t)          # in (as transformers' StaticCache does)
        cache = self.caches[key]
        cache.valid.zero_(), cache.pos.zero_(), cache.slot.zero_()
        cache.length, cache.padded = 0, False
        return cache

    def init_weights(self, std=0.02):
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, positions=None, cache=None,
                return_hidden=False, last_only=False):
        """input_ids (B, T) or inputs_embeds (B, T, D) -> logits (B, T, V), or the final hidden states (B, T, D);
        T = 1, the last position, with last_only (a prefill: the final block then computes only that position).

        attention_mask (B, T): 1 for real tokens, 0 for padding (right padding for training, left padding for
        batched generation). RoPE positions count real tokens only, so padding never shifts a sample's
        positions; with a cache they continue from where the sample's previous chunk ended."""
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        real = (torch.ones(B, T, dtype=torch.bool, device=x.device) if attention_mask is None
                else attention_mask.bool())
        if positions is None:
            positions = real.long().cumsum(1) - 1                               # (B, T): 0, 1, 2 ... per sample
            positions = positions.clamp(min=0) + (cache.pos[:, None] if cache is not None else 0)
        start = 0 if cache is None else cache.reserve(real)             # after `positions`: it moves cache.pos
        mask = make_mask(real, cache, start, T)
        return self._trunk(x, positions, mask, cache, start, last_only, return_hidden)

    def _trunk(self, x, positions, mask, cache, start, last_only=False, return_hidden=False):
        """Everything after the bookkeeping: the rotary angles, the decoder blocks (where the work is), the final
        norm and the vocab projection. compile_inference compiles this for prefill."""
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        for i, block in enumerate(self.model.layers):
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            else:
                kv = None if cache is None else (cache.k[i], cache.v[i])
                x = block(x, cos, sin, mask, kv, start, last_only and i == len(self.model.layers) - 1)
        x = self.model.norm(x)
        return x if return_hidden else self.lm_head(x)

    def decode(self, tokens, cache):
        """One new token per sample, tokens (B,) -> logits (B, V): generation's inner loop. Unlike forward() it
        has the same shapes at every step (the token attends over all max_len slots, those not yet written masked
        out by `valid`) and keeps its state in tensors, so torch.compile traces it once (`compile_inference`)."""
        if cache.length >= cache.max_len:
            raise ValueError(f"KV cache is full: {cache.length} + 1 tokens > max_len {cache.max_len}")
        cache.length += 1                                    # Python's count; the step advances cache.slot itself
        return self._decode(tokens, cache)

    def _decode(self, tokens, cache):
        cache.valid.index_fill_(1, cache.slot, True)
        x = self.model.embed_tokens(tokens[:, None])                                   # (B, 1, D)
        cos, sin = rope_cos_sin(cache.pos[:, None], self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        mask = cache.valid[:, None, None, :]                                           # (B, 1, 1, max_len)
        for i, block in enumerate(self.model.layers):
            x = block(x, cos, sin, mask, (cache.k[i], cache.v[i]), cache.slot)
        cache.pos += 1
        cache.slot += 1
        return self.lm_head(self.model.norm(x))[:, 0]

    def compile_inference(self, compile_fn=torch.compile):
        """torch.compile for generation (gpt-fast's recipe): a static decode step per (batch, max_len), the prefill."""
        if self.compiled:
            return
        if self.lm_head.weight.is_cuda:
            step = compile_fn(self._decode, mode="reduce-overhead", fullgraph=True, dynamic=False)

            def cuda_step(tokens, cache):
                torch.compiler.cudagraph_mark_step_begin()   # a new step: the graph may overwrite its last outputs,
                return step(tokens, cache).clone()           # so hand out a copy
            self._decode, trunk_kw = cuda_step, {}
        else:   # a batch-1 step of a model whose weights stay in cache is call overhead: inductor writes its matrix-
            # vector products as fused C++ loops (decompose_mm_pass; tiny model: 0.65 -> 0.57 ms); else MKL, packed
            trunk_kw = {"options": {"cpp_wrapper": True}}    # the prefill is not frozen: see model.compile_frozen
            gemv = torch.compile(self._decode, fullgraph=True, dynamic=False, options={
                "cpp_wrapper": True, "post_grad_fusion_options": {"decompose_mm_pass": {}}})
            gemm = compile_fn(self._decode, fullgraph=True, dynamic=False)
            small = sum(p.numel() * p.element_size() for p in self.parameters()) <= 2**26    # 64 MB
            self._decode = lambda tokens, cache: (gemv if small and len(tokens) == 1 else gemm)(tokens, cache)
        self._trunk, self.compiled = torch.compile(self._trunk, fullgraph=True, dynamic=True, **trunk_kw), True


def make_mask(real, cache, start, T):
    """The boolean attention mask (B, 1, T, L) for SDPA, or None where `is_causal` (or nothing) is exact.
    real (B, T) marks real tokens of the new chunk, which occupies slots start..start+T-1 of L = start+T."""
    if cache is None:
        if bool(real[:, 0].all()):      # no left padding: right padding comes after every real token, so
            return None                 # plain causal attention never sees it, and the loss ignores it
        keys = real                                                             # (B, L)
    else:
        if not cache.padded and (start == 0 or T == 1):
            return None                 # a first chunk is plain causal; one new token may see every slot
        keys = cache.valid[:, :start + T]                                       # (B, L), a view
    if T == 1:
        return keys[:, None, None, :]                                           # (B, 1, 1, L), still a view
    i = start + torch.arange(T, device=real.device)[:, None]                    # (T, 1) query slots
    j = torch.arange(start + T, device=real.device)                             # (L,) key slots
    # every query also sees its own slot: a padding query would otherwise have no key at all, its softmax
    # would be NaN, and 0 * NaN in the next layer's P @ V would leak the NaN into real tokens
    return (keys[:, None, None, :] & (j <= i)) | (j == i)                       # (B, 1, T, L)
