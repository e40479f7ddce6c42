"""
LLaVA: a CLIP vision encoder, a projector, and a LLaMA decoder, glued by splicing image embeddings into the text.

    image ─vit.py─▶ patch features (N, Dv) ─projector.py─▶ (N, D) ┐
    "USER: <image>\\nWhat is it? ASSISTANT:" ─▶ ids, one -200 ┴─▶ [text, N image embeds, text] ─llama.py─▶ logits

Paper: Liu et al. 2023 "Visual Instruction Tuning" §4.1 (architecture); Liu et al. 2023 "Improved Baselines
with Visual Instruction Tuning" (LLaVA-1.5). Official code: llava/model/llava_arch.py
(`prepare_inputs_labels_for_multimodal` is `Llava.splice` here). `from_pretrained` / `save_pretrained` hand over
to checkpoint.py, which reads every published layout (DESIGN.md §4).
"""
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import llama
import vit
from llama import Llama, LlamaConfig
from projector import build_projector
from vit import VisionConfig, VisionTransformer

IMAGE_TOKEN_INDEX = -200  # the placeholder id for "<image>" (llava/constants.py): not in the vocabulary
IGNORE_INDEX = -100       # labels with this value get no loss (PyTorch cross_entropy's default ignore_index)


@dataclass
class LlavaConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: LlamaConfig = field(default_factory=LlamaConfig)
    projector_type: str = "mlp2x_gelu"
    vision_feature_layer: int = -2        # penultimate ViT layer (see vit.py)
    vision_feature_select: str = "patch"  # "patch": drop CLS (LLaVA); "cls_patch": keep it
    image_aspect_ratio: str = "pad"       # "pad": pad to square first (LLaVA-1.5); anything else: center crop
    conv_template: str = "vicuna_v1"      # the conversation template the model was trained with (data.py)

    def __post_init__(self):
        # what the model cannot run is refused here, where checkpoint.py names the config file in one line, not at
        # the first image (or never: run wrongly)
        L = self.vision.num_hidden_layers
        build_projector(str(self.projector_type), 1, 1)             # a ValueError for a type it does not know
        if self.vision_feature_select not in ("patch", "cls_patch"):     # (the official encoder raises too)
            raise ValueError(f"vision_feature_select {self.vision_feature_select!r}: expected patch or cls_patch")
        if not (isinstance(self.vision_feature_layer, int) and -L - 1 <= self.vision_feature_layer <= L):
            raise ValueError(f"vision_feature_layer {self.vision_feature_layer!r}: expected a ViT layer, -{L + 1} to "
                             f"{L}")
        if str(self.image_aspect_ratio).startswith("anyres"):       # official: anything but pad/anyres crops
            raise ValueError("image_aspect_ratio anyres (LLaVA-1.6's tiles) is not supported")

    @property
    def image_tokens(self):               # LLM positions one image occupies: 576 for CLIP-L/336
        return self.vision.num_patches + (self.vision_feature_select == "cls_patch")

    def to_dict(self):
        return {"format": "llava-from-scratch", **asdict(self)}

    @classmethod
    def from_dict(cls, d):                # unknown keys are ignored, so older/newer config.json files still load
        known = lambda c, x: {k: v for k, v in x.items() if k in {f.name for f in fields(c)}}
        vision = VisionConfig(**{k: tuple(v) if isinstance(v, list) else v
                                 for k, v in known(VisionConfig, d["vision"]).items()})
        rest = known(cls, {k: v for k, v in d.items() if k not in ("vision", "text")})
        return cls(vision=vision, text=LlamaConfig(**known(LlamaConfig, d["text"])), **rest)


PRESETS = {
    "llava-1.5-7b": LlavaConfig(vision=vit.PRESETS["clip-vit-large-patch14-336"], text=llama.PRESETS["vicuna-7b-v1.5"]),
    "llava-1.5-13b": LlavaConfig(vision=vit.PRESETS["clip-vit-large-patch14-336"],
                                 text=llama.PRESETS["vicuna-13b-v1.5"]),
    "shapes-tiny": LlavaConfig(vision=vit.PRESETS["shapes-tiny"], text=llama.PRESETS["shapes-tiny"]),
}


class Output(NamedTuple):
    loss: torch.Tensor         # mean cross-entropy over supervised tokens (0 if there are none)
    logits: torch.Tensor       # (B, T', V), or None with return_logits=False
    n_tokens: torch.Tensor     # number of supervised tokens: for token-weighted means across micro-batches


def default_device():
    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


def default_dtype(device):
    # bf16 where the GPU has it; fp16 on other GPUs; fp32 on CPU, where half precision is slow or unsupported
    if str(device).startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16 if str(device).startswith("mps") else torch.float32


class Llava(nn.Module):
    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = VisionTransformer(cfg.vision)
        self.mm_projector = build_projector(cfg.projector_type, cfg.vision.hidden_size, cfg.text.hidden_size)
        self.language_model = Llama(cfg.text)
        self.tokenizer_path = None         # set by from_pretrained when the checkpoint has a tokenizer.model
        self.shared_prefix = True          # training: compute the rows' common prefix once (see trunk)

    def encode_images(self, images):
        """images (n, 3, S, S) -> LLM input embeddings (n, N, D)."""
        frozen = not any(p.requires_grad for p in self.vision_tower.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):  # frozen in every LLaVA-1.5 stage
            feats = self.vision_tower(images, self.cfg.vision_feature_layer, self.cfg.vision_feature_select)
        return self.mm_projector(feats.to(next(self.mm_projector.parameters(), feats).dtype))

    def splice(self, input_ids, image_embeds=None, attention_mask=None, labels=None, pad_left=False):
        """Replace each -200 in input_ids (B, T) by the N embeddings of the next image, in batch order.

        Returns embeds (B, T', D), attention mask (B, T') and labels (B, T') or None. Padding in the input is
        dropped and re-added (zero embeddings, label -100) on the right for training or on the left for
        batched generation, so the input may be padded on either side."""
        embed = self.language_model.model.embed_tokens
        if len(input_ids) == 1 and attention_mask is None and labels is None:   # one prompt (chat.py) is a concat:
            at = [i for i, t in enumerate(input_ids[0].tolist()) if t == IMAGE_TOKEN_INDEX]   # text, image, text
            if len(at) == (0 if image_embeds is None else len(image_embeds)):   # (else the error below)
                # why a path of its own: right after the vision tower each small op costs ~10 us (caches cold),
                # and 5 ops for the scatter's ~25 take 0.19 ms off the tiny model's 2.5 ms prefill (BENCHMARKS.md)
                text, pieces, prev = embed(input_ids.clamp(min=0)), [], 0                 # (1, T, D)
                for i, p in enumerate(at):
                    pieces += [text[:, prev:p], image_embeds[i:i + 1].to(text.dtype)]    # (1, p - prev, D), (1, N, D)
                    prev = p + 1
                out = torch.cat(pieces + [text[:, prev:]], 1)                             # (1, T', D)
                return out, torch.ones(out.shape[:2], dtype=torch.bool, device=out.device), None
        B, T = input_ids.shape
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        is_img = (input_ids == IMAGE_TOKEN_INDEX) & real
        n_img, N = int(is_img.sum()), self.cfg.image_tokens
        if n_img != (0 if image_embeds is None else len(image_embeds)):
            raise ValueError(f"{n_img} image placeholders in input_ids but "
                             f"{0 if image_embeds is None else len(image_embeds)} images")
        # every real token gets a width in the output (N for a placeholder, 1 for text); a running sum of the
        # widths gives each token's end offset in its spliced sequence: one scatter, no loop over the tokens
        width = torch.where(is_img, N, 1) * real                                        # (B, T)
        end = width.cumsum(1)                                                           # (B, T)
        lengths = end[:, -1]                                                            # (B,)
        T2 = int(lengths.max())
        shift = (T2 - lengths) if pad_left else torch.zeros_like(lengths)               # (B,)
        text_embeds = embed(input_ids.clamp(min=0))                                     # -200 -> row 0, unused
        out = text_embeds.new_zeros(B, T2, text_embeds.shape[-1])                       # padding embeds are 0
        b, t = (real & ~is_img).nonzero(as_tuple=True)
        dst = end[b, t] - 1 + shift[b]
        out[b, dst] = text_embeds[b, t]
        new_labels = None
        if labels is not None:
            new_labels = labels.new_full((B, T2), IGNORE_INDEX)    # image positions are never supervised
            new_labels[b, dst] = labels[b, t]
        if n_img:
            bi, ti = is_img.nonzero(as_tuple=True)                  # row-major: images are used in batch order
            dst = (end[bi, ti] - N + shift[bi])[:, None] + torch.arange(N, device=out.device)   # (n_img, N)
            out[bi[:, None], dst] = image_embeds.to(out.dtype)
        slot = torch.arange(T2, device=out.device)
        mask = (slot >= shift[:, None]) & (slot < (shift + lengths)[:, None])           # (B, T2)
        return out, mask, new_labels

    def forward(self, input_ids, images=None, labels=None, attention_mask=None, return_logits=True):
        """Logits (B, T', V) over the spliced sequence, T' = T - n_placeholders + n_images * N per sample.
        With labels: an Output(loss, logits, n_tokens), the loss a token-weighted mean as in the official code."""
        image_embeds = None if images is None or len(images) == 0 else self.encode_images(images)
        embeds, mask, labels = self.splice(input_ids, image_embeds, attention_mask, labels)
        lm = self.language_model
        if labels is None:
            return lm(inputs_embeds=embeds, attention_mask=mask)
        hidden = self.trunk(embeds, mask)                                                 # (B, T', D)
        # position t predicts token t+1; run the vocab projection only where there is a label, which saves the
        # (B, T', V) fp32 logits in training (0.26 GB per 2048-token sample at V = 32000)
        targets = labels[:, 1:]
        sel = targets != IGNORE_INDEX
        logits_sel = lm.lm_head(hidden[:, :-1][sel]).float()                          # (n_tokens, V)
        n = sel.sum()
        # clamp: a sample whose labels are all masked (e.g. truncated away) gives loss 0, not 0/0 = NaN
        loss = F.cross_entropy(logits_sel, targets[sel], reduction="sum") / n.clamp(min=1)
        return Output(loss, lm.lm_head(hidden) if return_logits else None, n)

    def trunk(self, embeds, mask):
        """The LLM's final hidden states (B, T', D) for a training batch, its shared prefix computed once.

        Every sample opens with the same system prompt ("A chat between a curious user and ... USER:", 32 tokens
        in vicuna_v1). Under causal attention those positions do not depend on what follows, so they are the same
        in every row: run them for one row, then the rest of every row attends to their keys and values through
        a KV cache (autograd sums their gradients over the rows). Exact but for rounding (tests/test_train.py);
        on the Shapes world, where a sample is ~100 tokens, it saves a fifth of stage 2's time (FINDINGS.md). On
        real data (~1,000 tokens a sample) it would save ~3% and cost a boolean mask (no flash attention), so it is
        used only where the prefix is at least an eighth of the batch, and not with gradient checkpointing
        (which would recompute the cache writes) or train.py's --compile (a graph per kind of call, see there)."""
        lm, (B, T, _), dev = self.language_model, embeds.shape, embeds.device
        p = 0
        if self.shared_prefix and B > 1 and not lm.grad_checkpointing:
            same = (embeds == embeds[:1]).all(-1).all(0) & mask.all(0)      # (T',) position t alike in all rows
            p = int(same.int().cumprod(0).sum())
        if 8 * p < T or p == T:
            return lm(inputs_embeds=embeds, attention_mask=mask, return_hidden=True)
        # the cache holds keys/values as the projections make them: in the autocast dtype under autocast
        autocast = torch.is_autocast_enabled(dev.type)
        cache = lm.new_cache(B, T, torch.get_autocast_dtype(dev.type) if autocast else embeds.dtype)
        head = lm(inputs_embeds=embeds[:1, :p], positions=torch.arange(p, device=dev)[None], cache=cache,
                  return_hidden=True)                        # (1, p, D); its keys/values broadcast into all B rows
        rest = lm(inputs_embeds=embeds[:, p:], attention_mask=mask[:, p:], cache=cache, return_hidden=True)
        return torch.cat([head.expand(B, -1, -1), rest], 1)                                # (B, T', D)

    def step_counts(self, input_ids, attention_mask, labels):
        """[supervised tokens, LLM positions, FLOPs] of a training forward + backward on this batch (0-dim int
        tensors stacked), for train.py's loss mean, tokens/s and MFU; the trainable set is read as it is now.

        The FLOPs are the model's matmuls as MFU counts them (PaLM, appendix B; nanoGPT's estimate_mfu): real
        positions only (padding is waste), no recomputation (--grad-checkpointing), no saving (trunk's shared
        prefix). A linear layer of W weights costs 2W per row forward, 2W for the gradient w.r.t. its input
        (every one above the projector needs it) and 2W for its own gradient if it learns; attention 4 T x T per
        query-head dimension forward and twice that backward, T the sample's length; the vocab projection runs
        at supervised positions only (forward); the frozen CLIP runs forward only, up to the layer LLaVA reads.
        Exact against torch.utils.flop_counter (tests/test_train.py)."""
        c, v, t = self.cfg, self.cfg.vision, self.cfg.text
        lin = lambda mod: [(m.weight.numel(), m.weight.requires_grad)         # (weights, learns?) per nn.Linear
                           for m in mod.modules() if isinstance(m, nn.Linear)]
        real = attention_mask.bool()
        n_img = ((input_ids == IMAGE_TOKEN_INDEX) & real).sum(1)                           # (B,)
        T = real.sum(1) + (c.image_tokens - 1) * n_img                                     # (B,) spliced lengths
        n_sup = (labels[:, 1:] != IGNORE_INDEX).sum()
        k, S = c.vision_feature_layer % (v.num_hidden_layers + 1), v.num_patches + 1       # ViT blocks run, tokens
        vit = (2 * self.vision_tower.embeddings.patch_embedding.weight.numel() * v.num_patches
               + sum(2 * w * S for w, _ in lin(self.vision_tower.encoder.layers[:k])) + 4 * k * S * S * v.hidden_size)
        proj = lin(self.mm_projector)    # its first layer's input is CLIP's (frozen): no gradient to compute there
        per_img = vit + c.image_tokens * sum(2 * w + 2 * w * g + 2 * w * (i > 0) for i, (w, g) in enumerate(proj))
        per_pos = sum(4 * w + 2 * w * g for w, g in lin(self.language_model.model.layers))
        per_sup = sum(4 * w + 2 * w * g for w, g in lin(self.language_model.lm_head))
        per_t2 = 12 * t.num_hidden_layers * t.num_attention_heads * t.head_dim
        flops = T.sum() * per_pos + (T * T).sum() * per_t2 + n_sup * per_sup + n_img.sum() * per_img
        return torch.stack([n_sup, T.sum(), flops])

    # ---------------------------------------------------------------------------------------------- inference
    def prefill(self, input_ids, images=None, cache=None, attention_mask=None):
        """Append a (left-padded) chunk, images spliced in, to the KV cache; return next-token logits (B, V)."""
        image_embeds = None if images is None or len(images) == 0 else self.encode_images(images)
        embeds, mask, _ = self.splice(input_ids, image_embeds, attention_mask, pad_left=True)
        return self.language_model(inputs_embeds=embeds, attention_mask=mask, cache=cache, last_only=True)[:, -1]

    def decode(self, tokens, cache):
        """One step: tokens (B,) -> logits (B, V). The image is already in the cache; only text goes in."""
        return self.language_model.decode(tokens, cache)

    @torch.inference_mode()
    def generate_stream(self, input_ids, images=None, attention_mask=None, max_new_tokens=128, temperature=0.0,
                        top_p=1.0, top_k=0, eos_token_id=None, generator=None, cache=None, use_cache=True):
        """Yield the next token of every sample, (B,), until all have emitted EOS or max_new_tokens is reached.
        A sample that has finished yields the pad id. Pass a cache (Llava.new_cache) to continue a
        conversation that is already in it: then input_ids holds only the new tokens."""
        eos = self.cfg.text.eos_token_id if eos_token_id is None else eos_token_id
        pad = self.cfg.text.pad_token_id
        if not use_cache:                  # the slow reference path: re-run the whole sequence every step
            return (yield from self._generate_uncached(input_ids, images, attention_mask, max_new_tokens,
                                                       temperature, top_p, top_k, eos, generator))
        if cache is None:
            T = int((input_ids != IMAGE_TOKEN_INDEX).sum(1).max()) + int(
                (input_ids == IMAGE_TOKEN_INDEX).sum(1).max()) * self.cfg.image_tokens
            cache = self.new_cache(len(input_ids), T + max_new_tokens)
        logits = self.prefill(input_ids, images, cache, attention_mask)
        done = [False] * len(input_ids)    # kept on the host: one copy a step, not five tiny tensor ops (~20 us)
        for step in range(max_new_tokens):
            tok = sample(logits, temperature, top_p, top_k, generator)
            if any(done):                      # a sample that has finished yields the pad id
                tok = tok.masked_fill(torch.tensor(done, device=tok.device), pad)
            yield tok
            done = [d or t == eos for d, t in zip(done, tok.tolist())]
            if step == max_new_tokens - 1 or all(done):
                break
            # from the second step on, a compiled step is called with the very objects whose guards (the checks
            # that its inputs still match what it was compiled for) the first step passed: the steady state in
            # which torch.compile lets them be skipped (~50 us a token on a CPU)
            steady = step > 0 and self.language_model.compiled
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True) if steady else nullcontext():
                logits = self.decode(tok, cache)

    def _generate_uncached(self, input_ids, images, attention_mask, max_new_tokens, temperature, top_p, top_k,
                           eos, generator):
        image_embeds = None if images is None or len(images) == 0 else self.encode_images(images)
        embeds, mask, _ = self.splice(input_ids, image_embeds, attention_mask, pad_left=True)
        done = torch.zeros(len(input_ids), dtype=torch.bool, device=embeds.device)
        for _ in range(max_new_tokens):
            logits = self.language_model(inputs_embeds=embeds, attention_mask=mask)[:, -1]
            tok = sample(logits, temperature, top_p, top_k, generator).masked_fill(done, self.cfg.text.pad_token_id)
            yield tok
            done |= tok == eos
            if bool(done.all()):
                break
            embeds = torch.cat([embeds, self.language_model.model.embed_tokens(tok)[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)

    def generate(self, input_ids, images=None, **kw):
        """New tokens only, (B, n): n = the longest answer; samples that stopped earlier are padded."""
        steps = list(self.generate_stream(input_ids, images, **kw))
        return torch.stack(steps, 1) if steps else input_ids.new_zeros(len(input_ids), 0)

    def new_cache(self, batch, max_len):
        return self.language_model.new_cache(batch, max_len)

    def compile_inference(self):
        """torch.compile for generation: the LLM's decode step and prefill (llama.py: Llama.compile_inference)
        and the image encoding (vision tower + projector), whose input shape (n, 3, S, S) changes only with n."""
        lm = self.language_model
        compile_fn = torch.compile if lm.lm_head.weight.is_cuda else compile_frozen
        if not lm.compiled:
            self.encode_images = compile_fn(self.encode_images)
        lm.compile_inference(compile_fn)

    # ------------------------------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(cls, path, vision_tower=None, dtype=None, device=None, model_base=None):
        from checkpoint import load_llava      # the loaders for every published layout live in checkpoint.py
        return load_llava(cls, path, vision_tower=vision_tower, dtype=dtype, device=device, model_base=model_base)

    def save_pretrained(self, directory, tokenizer_path=None):
        from checkpoint import save_llava
        save_llava(self, directory, tokenizer_path)


def compile_frozen(fn, **kw):
    """torch.compile for generation on a CPU, with inductor's "freezing": the weights become constants, packed
    once for oneDNN/MKL instead of in every matmul (a second copy; later changes to them do not reach the graph).
    Llava.compile_inference uses it for what has static shapes: the image encoding and the decode step. Not for
    the prefill (symbolic shapes: frozen, its linears become oneDNN calls of ~66 us each for the tiny model) nor
    for a small model's batch-1 decode step (llama.py, Llama.compile_inference)."""
    compiled = torch.compile(fn, **kw, options={
        "cpp.enable_concat_linear": True,   # one matmul for q/k/v and one for gate/up (each set shares its input)
        "cpp_wrapper": True})               # the code calling the kernels in C++, not Python: ~0.2 ms less a call

    def run(*args, **kwargs):
        # freezing is read when dynamo traces, so it cannot be one of the options above; it is set around each
        # call only, so that no other compile in the process (train.py's validation, say) freezes changing weights
        cfg = torch._inductor.config
        old, cfg.freezing = cfg.freezing, True
        try:
            return compiled(*args, **kwargs)
        finally:
            cfg.freezing = old
    return run


def sample(logits, temperature=0.0, top_p=1.0, top_k=0, generator=None):
    """logits (B, V) -> token ids (B,). temperature 0 is greedy (argmax), as every LLaVA eval script uses."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:                              # keep the k most likely tokens
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p < 1.0:                        # nucleus: the smallest set of tokens whose probability reaches top_p
        p, idx = probs.sort(-1, descending=True)
        p = p.masked_fill(p.cumsum(-1) - p > top_p, 0.0)     # drop a token once the ones before it reach top_p
        return idx.gather(-1, torch.multinomial(p, 1, generator=generator))[:, 0]
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
