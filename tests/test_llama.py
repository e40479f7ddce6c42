"""llama.py against transformers' LlamaForCausalLM (eager attention, fp32), and its KV cache."""
import pytest
import torch

from hf_fixtures import hf_llama
from llama import Llama, LlamaConfig, PRESETS


def pair(kv_heads):
    hf = hf_llama(kv_heads)
    ours = Llama(LlamaConfig.from_hf(hf.config.to_dict())).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)       # HF names load as they are
    return hf, ours


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
def test_logits_match_hf(exact_attention, kv_heads):
    hf, ours = pair(kv_heads)
    ids = torch.randint(0, 320, (2, 23))
    with torch.no_grad():
        ref, got = hf(ids).logits, ours(ids)
    assert ref.abs().max() > 1                                 # non-trivial logits
    assert (got - ref).abs().max() <= 1e-5


def test_left_padding_matches_hf_with_position_ids(exact_attention):
    hf, ours = pair(2)
    ids = torch.randint(3, 320, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :7] = 0
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
        got = ours(ids, attention_mask=mask)
    assert (got - ref)[mask.bool()].abs().max() <= 1e-5
    assert torch.isfinite(got).all()                           # padding rows do not produce NaN


def test_greedy_generation_matches_hf():
    hf, ours = pair(2)
    ids = torch.randint(3, 320, (1, 7))
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24,
                      min_new_tokens=24)[0, 7:]
    seq = ids
    with torch.no_grad():
        for _ in range(24):
            seq = torch.cat([seq, ours(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert seq[0, 7:].tolist() == ref.tolist()


def test_prefill_plus_single_steps_equal_full_forward():
    _, ours = pair(2)
    ids = torch.randint(0, 320, (2, 20))
    with torch.no_grad():
        full = ours(ids)
        cache = ours.new_cache(2, 32)
        steps = [ours(ids[:, :8], cache=cache)] + [ours(ids[:, t:t + 1], cache=cache) for t in range(8, 20)]
    assert cache.length == 20 and cache.k[0].shape[2] == 32        # preallocated once, never grown
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-5


def test_chunked_prefill_with_left_padding_equals_full_forward():
    _, ours = pair(2)
    ids = torch.randint(3, 320, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, :5] = 0
    with torch.no_grad():
        full = ours(ids, attention_mask=mask)
        cache = ours.new_cache(2, 16)
        parts = [ours(ids[:, :9], attention_mask=mask[:, :9], cache=cache), ours(ids[:, 9:13], cache=cache),
                 ours(ids[:, 13:], cache=cache)]
    assert (torch.cat(parts, 1) - full)[mask.bool()].abs().max() <= 1e-5


def test_a_compiled_block_is_one_graph_for_every_layer():
    """A block gets its own cache tensors, not (cache, layer index), so a block compiled on its own (train.py
    --compile) is traced once per kind of call, not once per layer: dynamo specialises on an int argument, which on
    the Shapes world's 4 blocks had made 8 graphs, its limit, and the rest ran eager (found on an H200)."""
    from torch._dynamo.utils import counters
    _, ours = pair(2)
    ids = torch.randint(3, 320, (2, 12))
    with torch.no_grad():
        cache = ours.new_cache(2, 12)
        eager = [ours(ids[:, :7], cache=cache), ours(ids[:, 7:], cache=cache)]
        torch._dynamo.reset()
        counters.clear()
        for block in ours.model.layers:
            block.compile(dynamic=True)
        cache = ours.new_cache(2, 12)
        compiled = [ours(ids[:, :7], cache=cache), ours(ids[:, 7:], cache=cache)]   # a first chunk, then a later one
    assert len(ours.model.layers) > 1
    assert counters["stats"]["unique_graphs"] == 2
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)


def test_last_only_gives_the_last_logits_and_still_fills_the_cache():
    """last_only (Llava.prefill): the final block computes only the last position, yet every position's keys and
    values reach the cache, so the next chunk sees the same past. Plain causal, left-padded and cached chunks."""
    _, ours = pair(2)
    ids = torch.randint(3, 320, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, :5] = 0
    with torch.no_grad():
        full, causal = ours(ids, attention_mask=mask), ours(ids)
        cache = ours.new_cache(2, 16)
        first = ours(ids[:, :9], attention_mask=mask[:, :9], cache=cache, last_only=True)
        second = ours(ids[:, 9:], cache=cache, last_only=True)
        alone = ours(ids, last_only=True)
    assert first.shape == second.shape == alone.shape == (2, 1, 320)
    assert (first[:, 0] - full[:, 8]).abs().max() <= 1e-5
    assert (second[:, 0] - full[:, -1]).abs().max() <= 1e-5
    assert (alone[:, 0] - causal[:, -1]).abs().max() <= 1e-5


def test_cache_overflow_is_an_error():
    _, ours = pair(2)
    cache = ours.new_cache(1, 4)
    with pytest.raises(ValueError, match="KV cache is full"):
        ours(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_config_from_hf_defaults_and_rope_parameters():
    cfg = LlamaConfig.from_hf({"rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}, "vocab_size": 7})
    assert (cfg.rope_theta, cfg.vocab_size, cfg.rms_norm_eps, cfg.hidden_size) == (5e5, 7, 1e-6, 4096)
    assert LlamaConfig.from_hf({"rope_theta": 1e4, "num_attention_heads": 8}).num_key_value_heads == 8
    with pytest.raises(ValueError, match="RoPE scaling"):
        LlamaConfig.from_hf({"rope_scaling": {"type": "linear", "factor": 2.0}})


def test_vicuna_presets():
    assert PRESETS["vicuna-7b-v1.5"].head_dim == 128
    assert PRESETS["vicuna-13b-v1.5"].hidden_size == 5120
