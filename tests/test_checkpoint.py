"""checkpoint.py: the same tiny weights in every layout load to identical logits; bad files give one clear error."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from checkpoint import CheckpointError, load_components, read_safetensors, write_safetensors
from conftest import ROOT
from hf_fixtures import (hf_llava, to_hf_ids, write_clip, write_liuhaotian, write_llama, write_llava_hf,
                         write_lora, write_stage1)
from model import IMAGE_TOKEN_INDEX as IMG, Llava

IDS = torch.tensor([[1, 10, 11, IMG, 12, 13, 14]])


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """One HF model written in every layout of DESIGN.md §4; returns {name: dir} and the reference logits."""
    hf = hf_llava()
    root = tmp_path_factory.mktemp("layouts")
    d = {n: str(root / n) for n in ("published", "hf5", "clip", "liuhaotian", "liuhaotian_st", "base", "stage1",
                                    "ours")}
    write_llava_hf(hf, d["published"], published=True)
    write_llava_hf(hf, d["hf5"], published=False)
    write_clip(hf, d["clip"])
    write_liuhaotian(hf, d["liuhaotian"], d["clip"], fmt="bin")
    write_liuhaotian(hf, d["liuhaotian_st"], d["clip"], fmt="safetensors", vision_copy=False, inv_freq=False)
    write_llama(hf, d["base"])
    write_stage1(hf, d["stage1"], d["base"], d["clip"])
    Llava.from_pretrained(d["published"], device="cpu").save_pretrained(d["ours"])
    px = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        from hf_fixtures import to_hf_ids
        ref = hf(input_ids=torch.tensor([to_hf_ids(IDS[0].tolist())]), pixel_values=px).logits
    return d, px, ref


@pytest.mark.parametrize("name", ["published", "hf5", "liuhaotian", "liuhaotian_st", "stage1", "ours"])
def test_every_layout_gives_identical_logits(exact_attention, layouts, name):
    d, px, ref = layouts
    m = Llava.from_pretrained(d[name], device="cpu", dtype=torch.float32)
    with torch.no_grad():
        got = m(IDS, px)
    assert (got - ref).abs().max() <= 1e-5
    if name != "published":                    # and bitwise the same as every other layout
        p = Llava.from_pretrained(d["published"], device="cpu", dtype=torch.float32)
        assert torch.equal(got, p(IDS, px))


def test_the_official_lora_layout_loads_on_its_base_with_the_adapters_merged(exact_attention, layouts, tmp_path):
    """liuhaotian/llava-v1.5-7b-lora: on its base LLM (model_base, as the official loader needs), the projector from
    non_lora_trainables.bin, each adapter merged as W + (alpha / r) B A; against transformers with those sums made
    by hand."""
    d, px, _ = layouts
    g = torch.Generator().manual_seed(3)
    shapes = {"model.layers.0.self_attn.q_proj.weight": (64, 64), "model.layers.1.self_attn.v_proj.weight": (32, 64),
              "model.layers.1.mlp.down_proj.weight": (64, 128)}
    adapters = {k: (torch.randn(2, n_in, generator=g) * 0.1, torch.randn(n_out, 2, generator=g) * 0.1)
                for k, (n_out, n_in) in shapes.items()}
    lora = write_lora(hf_llava(), str(tmp_path / "llava-v1.5-lora"), d["clip"], adapters, r=2, alpha=6)
    hf = hf_llava()                                      # the fixture's weights, the adapters added by hand
    params = dict(hf.named_parameters())
    with torch.no_grad():
        for k, (a, b) in adapters.items():
            params["model.language_model." + k[len("model."):]].add_(3 * (b @ a))
        ref = hf(input_ids=torch.tensor([to_hf_ids(IDS[0].tolist())]), pixel_values=px).logits
    with pytest.raises(CheckpointError, match="base LLM 'lmsys/vicuna-7b-v1.5' is not a local directory; pass "
                                             "model_base"):
        Llava.from_pretrained(lora, device="cpu")
    m = Llava.from_pretrained(lora, model_base=d["base"], device="cpu", dtype=torch.float32)
    assert m.cfg.conv_template == "vicuna_v1" and m.tokenizer_path is None      # (the fixture's base has none)
    with torch.no_grad():
        assert (m(IDS, px) - ref).abs().max() <= 1e-5


def test_an_adapter_that_does_not_fit_the_model_is_one_line(layouts, tmp_path):
    d, _, _ = layouts
    lora = write_lora(hf_llava(), str(tmp_path / "lora"), d["clip"], {"model.layers.5.self_attn.q_proj.weight": (
        torch.zeros(2, 64), torch.zeros(64, 2))}, r=2, alpha=4)                  # the fixture has 2 layers
    with pytest.raises(CheckpointError, match=r"adapter_model\.bin: adapter for language_model\.model\.layers\.5\."
                                             r"self_attn\.q_proj\.weight does not fit the model"):
        Llava.from_pretrained(lora, model_base=d["base"], device="cpu")
    # a rank other than the config's r, and PEFT's per-module ranks or alphas: one alpha / r scaled them wrongly,
    # silently
    lora = write_lora(hf_llava(), str(tmp_path / "rank"), d["clip"], {"model.layers.0.self_attn.q_proj.weight": (
        torch.zeros(4, 64), torch.zeros(64, 4))}, r=2, alpha=4)
    with pytest.raises(CheckpointError, match=r"q_proj\.weight does not fit the model"):
        Llava.from_pretrained(lora, model_base=d["base"], device="cpu")
    cfg = json.load(open(os.path.join(lora, "adapter_config.json")))
    for pattern in ("rank_pattern", "alpha_pattern"):
        json.dump(cfg | {pattern: {"q_proj": 4}}, open(os.path.join(lora, "adapter_config.json"), "w"))
        with pytest.raises(CheckpointError, match=r"adapter_config\.json: only plain LoRA \(r, lora_alpha\)"):
            Llava.from_pretrained(lora, model_base=d["base"], device="cpu")


def test_layout_configs(layouts):
    d, _, _ = layouts
    assert Llava.from_pretrained(d["stage1"], device="cpu").cfg.conv_template == "plain"
    lh = Llava.from_pretrained(d["liuhaotian"], device="cpu").cfg
    assert (lh.image_aspect_ratio, lh.projector_type, lh.vision_feature_layer) == ("pad", "mlp2x_gelu", -2)
    ours = Llava.from_pretrained(d["ours"], device="cpu")
    assert ours.cfg == Llava.from_pretrained(d["published"], device="cpu").cfg


def test_vision_tower_argument_and_base_argument_override_the_config(exact_attention, layouts, tmp_path):
    d, px, ref = layouts
    moved = str(tmp_path / "liuhaotian")
    shutil.copytree(d["liuhaotian"], moved)
    cfg = json.load(open(os.path.join(moved, "config.json")))
    cfg["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"         # a hub name, as the released configs say
    json.dump(cfg, open(os.path.join(moved, "config.json"), "w"))
    with pytest.raises(CheckpointError, match="vision tower 'openai/clip-vit-large-patch14-336' is not a local"):
        Llava.from_pretrained(moved, device="cpu")
    m = Llava.from_pretrained(moved, vision_tower=d["clip"], device="cpu", dtype=torch.float32)
    assert (m(IDS, px) - ref).abs().max() <= 1e-5
    stage1 = str(tmp_path / "stage1")
    shutil.copytree(d["stage1"], stage1)
    cfg = json.load(open(os.path.join(stage1, "config.json")))
    cfg["_name_or_path"] = "lmsys/vicuna-7b-v1.5"
    json.dump(cfg, open(os.path.join(stage1, "config.json"), "w"))
    with pytest.raises(CheckpointError, match="base LLM 'lmsys/vicuna-7b-v1.5'"):
        Llava.from_pretrained(stage1, device="cpu")
    m = Llava.from_pretrained(stage1, model_base=d["base"], device="cpu", dtype=torch.float32)
    assert (m(IDS, px) - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("name, arg, holds", [("ours", "vision_tower", "its own vision tower"),
                                              ("published", "vision_tower", "its own vision tower"),
                                              ("ours", "model_base", "its own LLM"),
                                              ("hf5", "model_base", "its own LLM"),
                                              ("liuhaotian", "model_base", "its own LLM")])
def test_a_path_the_checkpoint_does_not_read_is_refused_not_ignored(layouts, name, arg, holds):
    """A vision tower or base LLM passed for a checkpoint that holds its own was ignored without a word: the user
    thought they were using it."""
    d, _, _ = layouts
    with pytest.raises(CheckpointError, match=f"holds {holds}, so {arg} .* would not be used"):
        Llava.from_pretrained(d[name], device="cpu", **{arg: d["clip" if arg == "vision_tower" else "base"]})


def test_dtype_and_meta_free_loading(layouts):
    d, px, _ = layouts
    m = Llava.from_pretrained(d["liuhaotian"], device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in m.parameters())
    assert m(IDS, px).dtype == torch.bfloat16


def test_loading_runs_no_initialiser_and_does_not_import_torch_dynamo(layouts):
    """The model is built on the meta device with its initialisers skipped: torch's normal_ on meta imports
    torch._dynamo, a second of every chat.py start. In a fresh process, as chat.py and train.py --stage 1 load."""
    d, _, _ = layouts
    code = ("import sys; from model import Llava; from checkpoint import load_components; "
            "Llava.from_pretrained(sys.argv[1], device='cpu'); load_components(Llava, sys.argv[2], sys.argv[3]); "
            "print([m for m in sys.modules if m.startswith('torch._dynamo')])")
    r = subprocess.run([sys.executable, "-c", code, d["ours"], d["base"], d["clip"]], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


# ----------------------------------------------------------------------------------------------------- errors
def edit_shard(src, dst, fn, fmt):
    """Copy a checkpoint dir and apply fn to the state dict of its first shard."""
    shutil.copytree(src, dst)
    name = sorted(f for f in os.listdir(dst) if f.endswith(fmt) and "-00001-" in f)[0]
    path = os.path.join(dst, name)
    if fmt == ".bin":
        sd = fn(torch.load(path, weights_only=True))
        torch.save(sd, path)
    else:
        sd = fn(dict(read_safetensors(path)))
        write_safetensors(sd, path)
    return path


def drop(key):
    return lambda sd: {k: v for k, v in sd.items() if k != key}


@pytest.mark.parametrize("fmt", [".bin", ".safetensors"])
def test_missing_key_names_the_checkpoint_and_key(layouts, tmp_path, fmt):
    d, _, _ = layouts
    src = d["liuhaotian" if fmt == ".bin" else "liuhaotian_st"]
    path = edit_shard(src, str(tmp_path / "x"), lambda sd: sd, fmt)
    victim = sorted(k for k, _ in (torch.load(path, weights_only=True).items() if fmt == ".bin"
                                   else read_safetensors(path)) if k.startswith("model.layers.1."))[0]
    shutil.rmtree(tmp_path / "x")
    edit_shard(src, str(tmp_path / "x"), drop(victim), fmt)
    with pytest.raises(CheckpointError, match=r"missing key language_model\." + victim.replace(".", r"\.")) as e:
        Llava.from_pretrained(str(tmp_path / "x"), device="cpu")
    assert str(tmp_path / "x") in str(e.value) and "\n" not in str(e.value)


def test_unexpected_key_names_file_and_key(layouts, tmp_path):
    d, _, _ = layouts
    path = edit_shard(d["liuhaotian"], str(tmp_path / "x"), lambda sd: sd | {"model.layers.0.mlp.extra": torch.ones(2)},
                      ".bin")
    with pytest.raises(CheckpointError, match="unexpected key model.layers.0.mlp.extra") as e:
        Llava.from_pretrained(str(tmp_path / "x"), device="cpu")
    assert str(e.value).startswith(path)


def test_wrong_shape_names_file_key_and_shapes(layouts, tmp_path):
    d, _, _ = layouts
    victim = {}

    def shrink(sd):                            # cut the first 2-D weight of the shard to 10 columns
        victim["key"] = k = next(k for k in sorted(sd) if sd[k].dim() == 2)
        victim["shape"] = list(sd[k].shape)
        return sd | {k: sd[k][:, :10]}
    edit_shard(d["liuhaotian_st"], str(tmp_path / "x"), shrink, ".safetensors")
    k, (rows, cols) = victim["key"], victim["shape"]
    with pytest.raises(CheckpointError, match=rf"key {k} has shape \[{rows}, 10\], expected \[{rows}, {cols}\]"):
        Llava.from_pretrained(str(tmp_path / "x"), device="cpu")


def test_truncated_safetensors_names_file_and_tensor(layouts, tmp_path):
    d, _, _ = layouts
    shutil.copytree(d["ours"], tmp_path / "x")
    path = str(tmp_path / "x" / "model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated: tensor \S+ ends at byte"):
        Llava.from_pretrained(str(tmp_path / "x"), device="cpu")
    open(path, "wb").write(data[:5])
    with pytest.raises(CheckpointError, match="truncated or not a safetensors file"):
        Llava.from_pretrained(str(tmp_path / "x"), device="cpu")


def test_weights_larger_than_the_free_memory_are_refused_before_any_is_read(layouts, tmp_path, monkeypatch):
    """LLaVA-1.5-7B in fp32 on a 24 GB laptop (chat.py's CPU default) met the OOM killer halfway through loading.
    The weights' size is known from the config before a byte is read. Here the device reports one byte less than
    they need, then exactly what they need; the weight file is unreadable, so reading it first is another error."""
    import checkpoint
    from model import LlavaConfig
    d, _, _ = layouts
    shutil.copytree(d["ours"], tmp_path / "x")
    (tmp_path / "x" / "model.safetensors").write_bytes(b"\0" * 9)
    with torch.device("meta"):
        model = Llava(LlavaConfig.from_dict(json.load(open(tmp_path / "x" / "config.json"))))
    n = sum(t.numel() for t in model.state_dict().values())
    for dtype, half in [(torch.float32, " (bfloat16 needs half: --dtype bfloat16 in chat.py and eval.py)"),
                        (torch.bfloat16, "")]:
        monkeypatch.setattr(checkpoint, "free_memory", lambda device: n * dtype.itemsize - 1)
        with pytest.raises(CheckpointError) as e:
            Llava.from_pretrained(str(tmp_path / "x"), device="cpu", dtype=dtype)
        assert str(e.value) == (f"{tmp_path / 'x'}: the weights need {n * dtype.itemsize / 2**30:.1f} GiB in {dtype}; "
                                f"cpu has 0.0 GiB free{half}")
        monkeypatch.setattr(checkpoint, "free_memory", lambda device: n * dtype.itemsize)     # enough: read, and
        with pytest.raises(CheckpointError, match="model.safetensors: not a safetensors file"):              # fail
            Llava.from_pretrained(str(tmp_path / "x"), device="cpu", dtype=dtype)
    monkeypatch.undo()
    assert 2**20 < checkpoint.free_memory(torch.device("cpu")) < float("inf")   # this Linux machine's, read for real


def test_a_write_cut_short_leaves_the_file_that_was_there_whole(layouts, tmp_path, monkeypatch):
    """Every file is written under a temporary name and renamed over the old one (checkpoint.replacing). Here
    torch.save dies halfway through stage 1's mm_projector.bin (Ctrl-C, a full disk, a killed job): the one
    from the run before stays as it was. mm_projector.bin and the adapter files were written in place."""
    import checkpoint
    d, _, _ = layouts
    shutil.copytree(d["stage1"], tmp_path / "x")
    before = (tmp_path / "x" / "mm_projector.bin").read_bytes()
    model = Llava.from_pretrained(str(tmp_path / "x"), device="cpu")
    torch.nn.init.normal_(model.mm_projector[0].weight)                      # new weights to write

    def save_half(obj, path):
        open(path, "wb").write(before[:len(before) // 2])
        raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint.torch, "save", save_half)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_projector(model, str(tmp_path / "x"), d["base"], d["clip"])
    assert (tmp_path / "x" / "mm_projector.bin").read_bytes() == before
    assert not (tmp_path / "x" / "mm_projector.bin.tmp").exists()             # nor is the half-written one left
    monkeypatch.undo()
    checkpoint.save_projector(model, str(tmp_path / "x"), d["base"], d["clip"])        # uncut: replaced
    assert (tmp_path / "x" / "mm_projector.bin").read_bytes() != before
    torch.testing.assert_close(Llava.from_pretrained(str(tmp_path / "x"), device="cpu").mm_projector[0].weight,
                               model.mm_projector[0].weight)


class Evil:
    def __reduce__(self):
        return (print, ("this would run arbitrary code",))


def test_pickle_needing_more_than_weights_only_is_refused(layouts, tmp_path):
    d, _, _ = layouts
    shutil.copytree(d["stage1"], tmp_path / "x")
    path = str(tmp_path / "x" / "mm_projector.bin")
    torch.save({"model.mm_projector.0.weight": torch.ones(1), "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match=r"mm_projector\.bin: refused: it needs more than "
                                              r"torch\.load\(weights_only=True\) allows \(Unsupported global: "
                                              r"GLOBAL (builtins\.)?print was not an allowed global by default\)$"):
        Llava.from_pretrained(str(tmp_path / "x"), device="cpu")    # the cause, not torch's advice (was: its first
    # 160 characters, ANSI bold codes included, cut before the cause)
    open(path, "w").write("<!DOCTYPE html><html>Not Found</html>")   # a download that saved an error page
    with pytest.raises(CheckpointError, match=r"mm_projector\.bin: not a PyTorch file \(neither a zip archive "
                                              r"nor a pickle\)$"):  # was: "refused: it needs more than ..."
        Llava.from_pretrained(str(tmp_path / "x"), device="cpu")


LFS_POINTER = ("version https://git-lfs.github.com/spec/v1\n"
               "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 9976576152\n")


@pytest.mark.parametrize("layout,pointer,broken", [
    ("liuhaotian", "pytorch_model-00002-of-00002.bin", "pytorch_model-00001-of-00002.bin"),
    ("liuhaotian_st", "model-00002-of-00002.safetensors", "model-00001-of-00002.safetensors"),
    ("ours", "tokenizer.model", "model.safetensors")])
def test_a_git_lfs_pointer_is_named_before_any_weights_are_read(layouts, tmp_path, layout, pointer, broken):
    """A Hugging Face repo cloned without git-lfs holds ~130-byte text pointers in place of its weights and
    tokenizer. Each is named with what to do, before any weights are read: the other file is made unreadable,
    so reading it first would give another error (was: "not a sentencepiece tokenizer.model", "truncated or not a
    safetensors file", and for a .bin "it needs more than torch.load(weights_only=True) allows")."""
    d, _, _ = layouts
    shutil.copytree(d[layout], tmp_path / "x")
    assert os.path.exists(tmp_path / "x" / broken) and (os.path.exists(tmp_path / "x" / pointer) or
                                                         pointer == "tokenizer.model")
    (tmp_path / "x" / pointer).write_text(LFS_POINTER)
    (tmp_path / "x" / broken).write_bytes(b"\0" * 9)
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(tmp_path / 'x' / pointer))}: a Git LFS pointer, "
                                              f"not the file itself: run `git lfs pull` in its clone$"):
        Llava.from_pretrained(str(tmp_path / "x"), device="cpu")


def test_known_unused_keys_are_skipped_on_purpose(layouts):
    """The liuhaotian fixture carries the CLIP copy and inv_freq buffers; the CLIP dir carries a text tower."""
    d, _, _ = layouts
    shards = [f for f in os.listdir(d["liuhaotian"]) if f.endswith(".bin")]
    keys = {k for s in shards for k in torch.load(os.path.join(d["liuhaotian"], s), weights_only=True)}
    assert any(k.startswith("model.vision_tower.vision_tower.") for k in keys)
    assert any(k.endswith("rotary_emb.inv_freq") for k in keys)
    clip_keys = {k for k, _ in read_safetensors(os.path.join(d["clip"], "model.safetensors"))}
    assert {"logit_scale", "text_projection.weight", "visual_projection.weight"} <= clip_keys
    Llava.from_pretrained(d["liuhaotian"], device="cpu")     # loads: the fixture above proves the skips


def test_not_a_checkpoint(layouts, tmp_path, monkeypatch):
    d, _, _ = layouts
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(tmp_path / 'nope'))}: no such directory$"):
        Llava.from_pretrained(str(tmp_path / "nope"))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(CheckpointError, match="a-file: not a directory$"):
        Llava.from_pretrained(str(tmp_path / "a-file"))
    monkeypatch.chdir(tmp_path)          # chat.py's default, models/shapes-llava, run outside the repository
    said = f"models/shapes-llava: no such directory (relative to {tmp_path})"
    with pytest.raises(CheckpointError, match=re.escape(said)):
        Llava.from_pretrained("models/shapes-llava")
    with pytest.raises(CheckpointError, match="config.json: missing"):
        Llava.from_pretrained(str(tmp_path))
    with pytest.raises(CheckpointError, match="a plain LLaMA checkpoint"):
        Llava.from_pretrained(d["base"])
    with pytest.raises(CheckpointError, match="a CLIP checkpoint, not a LLaVA"):     # was: "unexpected key ..."
        Llava.from_pretrained(d["clip"])
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="config.json: not a JSON object"):      # was: an AttributeError
        Llava.from_pretrained(str(tmp_path))
    # stage 1's two starting dirs swapped: named as what they are, not an unexpected or missing key
    with pytest.raises(CheckpointError, match=f"^{re.escape(d['clip'])}: a clip checkpoint, not a LLaMA"):
        load_components(Llava, d["clip"], d["base"])
    with pytest.raises(CheckpointError, match=f"^{re.escape(d['base'])}: a llama checkpoint, not a CLIP"):
        load_components(Llava, d["base"], d["base"])
    # a whole LLaVA of ours in either place: was read as a 7B LLaMA config ("needs 25 GiB") or an unexpected key
    with pytest.raises(CheckpointError, match=f"^{re.escape(d['ours'])}: a llava checkpoint, not a LLaMA"):
        load_components(Llava, d["ours"], d["clip"])
    with pytest.raises(CheckpointError, match=f"^{re.escape(d['ours'])}: a llava checkpoint, not a CLIP"):
        load_components(Llava, d["base"], d["ours"])
    for wrong in ("ours", "clip"):                 # and as a stage-1 projector's base LLM
        with pytest.raises(CheckpointError, match=f"^{re.escape(d[wrong])}: a \\w+ checkpoint, not a LLaMA \\("):
            Llava.from_pretrained(d["stage1"], model_base=d[wrong])


@pytest.mark.parametrize("layout,where,edit,message", [
    ("ours", "", lambda c: c["text"].update(vocab_size="1024"), "vocab_size is '1024', not int"),
    ("ours", "", lambda c: c.pop("vision"), "missing or unknown 'vision'"),
    ("published", "", lambda c: c["vision_config"].update(layer_norm_eps="small"),
     "layer_norm_eps is 'small', not float"),
    ("liuhaotian", "", lambda c: c.update(rope_scaling={"type": "linear", "factor": 2.0}), "RoPE scaling"),
    ("liuhaotian", "clip", lambda c: c["vision_config"].update(hidden_size=[64]), "hidden_size is [64], not int"),
    ("stage1", "base", lambda c: c.update(hidden_act="gelu"), "only LLaMA with SiLU"),
    # other LLaVAs, which this code would have run as LLaVA-1.5, answering from wrongly prepared images or
    # failing on an unexpected key: LLaVA-1.6's tiles, a Qwen2 or Mistral language model
    ("liuhaotian", "", lambda c: c.update(image_aspect_ratio="anyres"), "anyres (LLaVA-1.6's tiles) is not"),
    # values the model cannot run: a ValueError traceback at load or at the first image, or run wrongly, silently
    ("ours", "", lambda c: c.update(projector_type="qformer"), "unknown projector type 'qformer'"),
    ("ours", "", lambda c: c.update(vision_feature_select="cls"), "vision_feature_select 'cls': expected patch"),
    ("ours", "", lambda c: c.update(vision_feature_layer=7), "vision_feature_layer 7: expected a ViT layer, -4 to 3"),
    ("liuhaotian", "", lambda c: c.update(mm_vision_select_layer=-40), "vision_feature_layer -40: expected"),
    ("liuhaotian", "", lambda c: c.update(model_type="llava_mistral"), "a llava_mistral checkpoint; only LLaVA on"),
    ("published", "", lambda c: c.update(model_type="llava_next"), "a llava_next checkpoint; only LLaVA-1 and"),
    ("published", "", lambda c: c["text_config"].update(model_type="qwen2"), "a qwen2 language model; only LLaMA")])
def test_a_config_with_a_bad_value_is_one_line_naming_it(layouts, tmp_path, layout, where, edit, message):
    """Hand-edited or foreign config.json files: each of these was a KeyError, TypeError or ValueError traceback."""
    d, _, _ = layouts
    copies = {name: str(tmp_path / name) for name in (layout, "clip", "base")}
    for name, path in copies.items():
        shutil.copytree(d[name], path)
    for name in (layout, "clip", "base"):          # the copies point at each other, not at the fixture's dirs
        c = json.load(open(os.path.join(copies[name], "config.json")))
        for k in ("mm_vision_tower", "_name_or_path"):
            if k in c:
                c[k] = copies["clip" if k == "mm_vision_tower" else "base"]
        if name == (where or layout):
            edit(c)
        json.dump(c, open(os.path.join(copies[name], "config.json"), "w"))
    with pytest.raises(CheckpointError, match=re.escape(message)) as e:
        Llava.from_pretrained(copies[layout], device="cpu")
    assert str(e.value).startswith(os.path.join(copies[where or layout], "config.json") + ": ")


def test_our_safetensors_writer_is_read_by_the_safetensors_library(tmp_path):
    from safetensors.torch import load_file
    sd = {"a": torch.randn(3, 5), "b": torch.randn(7).bfloat16(), "c": torch.tensor(2.5), "d": torch.arange(4)}
    write_safetensors(sd, str(tmp_path / "x.safetensors"))
    back = load_file(str(tmp_path / "x.safetensors"))
    assert all(torch.equal(back[k], v) for k, v in sd.items())
    assert all(torch.equal(v, sd[k]) for k, v in read_safetensors(str(tmp_path / "x.safetensors")))


def test_to_half_keeps_the_model(tmp_path):
    """The bundled tiny models are stored in fp16 (checkpoint.py half); they load back as fp32 models."""
    from checkpoint import to_half
    from model import PRESETS, Llava
    m = Llava(PRESETS["shapes-tiny"])
    m.language_model.init_weights()
    m.save_pretrained(str(tmp_path))
    before = os.path.getsize(tmp_path / "model.safetensors")
    to_half(str(tmp_path))
    assert os.path.getsize(tmp_path / "model.safetensors") < 0.51 * before
    h = Llava.from_pretrained(str(tmp_path), dtype=torch.float32, device="cpu")
    assert all(p.dtype == torch.float32 for p in h.parameters())
    ids, img = torch.tensor([[1, 5, -200, 7]]), torch.randn(1, 3, 72, 72)
    with torch.no_grad():
        torch.testing.assert_close(h(ids, img), m(ids, img), rtol=0, atol=2e-3)


def test_half_refuses_a_missing_directory_before_changing_any(tmp_path):
    write_safetensors({"w": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    r = subprocess.run([sys.executable, "checkpoint.py", "half", str(tmp_path), str(tmp_path / "nope")], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr == f"error: {tmp_path / 'nope'}: no such directory\n", r.stderr
    assert dict(read_safetensors(str(tmp_path / "model.safetensors")))["w"].dtype == torch.float32   # untouched
    (tmp_path / "data").mkdir()                    # a directory without weights (a typo) did nothing, silently
    r = subprocess.run([sys.executable, "checkpoint.py", "half", str(tmp_path), str(tmp_path / "data")], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr == f"error: {tmp_path / 'data'}: no .safetensors file to store in fp16\n"
    assert dict(read_safetensors(str(tmp_path / "model.safetensors")))["w"].dtype == torch.float32
    (tmp_path / "damaged").mkdir()                 # a damaged file (or a full disk while writing): was a traceback
    (tmp_path / "damaged" / "model.safetensors").write_bytes(b"garbage")
    r = subprocess.run([sys.executable, "checkpoint.py", "half", str(tmp_path / "damaged")], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr == (f"error: {tmp_path / 'damaged' / 'model.safetensors'}: truncated or not "
                                              f"a safetensors file (7 bytes)\n"), r.stderr


def test_ctrl_c_in_half_is_one_line_and_leaves_each_file_whole(tmp_path, monkeypatch, capsys):
    """It was a KeyboardInterrupt traceback; the file being written stays as it was (replaced whole or not at all)."""
    import runpy
    write_safetensors({"w": torch.ones(2)}, str(tmp_path / "model.safetensors"))

    def ctrl_c(*a):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", ctrl_c)                 # Ctrl-C as the fp16 file would take its name
    monkeypatch.setattr(sys, "argv", ["checkpoint.py", "half", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(ROOT, "checkpoint.py"), run_name="__main__")
    assert e.value.code == 130 and capsys.readouterr().err == ("interrupted: each file is whole, in fp16 or as it was; "
                                                                "the same command finishes the rest\n")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["model.safetensors"]
    assert dict(read_safetensors(str(tmp_path / "model.safetensors")))["w"].dtype == torch.float32
