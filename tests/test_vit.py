"""vit.py against transformers' CLIPVisionModel (eager attention, fp32)."""
import pytest
import torch
from transformers import CLIPVisionModel

from hf_fixtures import vision_config
from vit import VisionConfig, VisionTransformer, hf_key


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    hf = CLIPVisionModel._from_config(vision_config(layers=3), attn_implementation="eager").eval()
    ours = VisionTransformer(VisionConfig.from_hf(hf.config.to_dict())).eval()
    ours.load_state_dict({hf_key(k): v for k, v in hf.state_dict().items() if hf_key(k)}, strict=True)
    return hf, ours


def test_penultimate_patch_features_match_hf(exact_attention, pair):
    hf, ours = pair
    px = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        ref = hf(px, output_hidden_states=True).hidden_states[-2][:, 1:]    # what LLaVA's feature_select takes
        got = ours(px)                                                      # defaults: layer -2, "patch"
    assert got.shape == (3, 4, 64)
    assert (got - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("layer", [0, 1, 2, 3, -1, -2, -3, -4])
def test_every_layer_and_cls_patch_match_hf(exact_attention, pair, layer):
    hf, ours = pair
    px = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        ref = hf(px, output_hidden_states=True).hidden_states[layer]
        got = ours(px, layer=layer, select="cls_patch")
    assert got.shape == ref.shape == (2, 5, 64)
    assert (got - ref).abs().max() <= 1e-5


def test_pooled_output_matches_hf(exact_attention, pair):
    hf, ours = pair
    px = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert (ours.pooled(px) - hf(px).pooler_output).abs().max() <= 1e-5


def test_layers_past_the_selected_one_are_not_run(pair):
    _, ours = pair
    ran = []
    hooks = [b.register_forward_hook(lambda m, i, o, n=n: ran.append(n)) for n, b in enumerate(ours.encoder.layers)]
    ours(torch.randn(1, 3, 28, 28), layer=-2)
    for h in hooks:
        h.remove()
    assert ran == [0, 1]                        # a 3-layer ViT: hidden_states[-2] is the output of block 1


def test_out_of_range_layer_is_an_error(pair):
    with pytest.raises(ValueError, match="out of range"):
        pair[1](torch.randn(1, 3, 28, 28), layer=5)


def test_images_of_another_size_are_an_error_that_says_so(pair):
    ours = pair[1]                                 # was "The size of tensor a (5) must match the size of tensor b (10)"
    S = ours.cfg.image_size
    with pytest.raises(ValueError, match=rf"^images of \(20, 20\) pixels; this vision tower takes {S} x {S} "):
        ours(torch.randn(1, 3, 20, 20))


def test_hf_keys_map_and_text_tower_is_skipped():
    assert hf_key("vision_model.encoder.layers.3.mlp.fc1.weight") == "encoder.layers.3.mlp.fc1.weight"
    assert hf_key("embeddings.class_embedding") == "embeddings.class_embedding"      # transformers-5 layout
    for unused in ("text_model.encoder.layers.0.mlp.fc1.weight", "text_projection.weight", "visual_projection.weight",
                   "logit_scale", "vision_model.embeddings.position_ids"):
        assert hf_key(unused) is None


def test_clip_l_336_geometry():
    from vit import PRESETS
    cfg = PRESETS["clip-vit-large-patch14-336"]
    assert (cfg.num_patches, cfg.hidden_size, cfg.num_hidden_layers) == (576, 1024, 24)
