"""train.py: what each stage may change, LoRA merging, gradient checkpointing, resuming, DDP, eval.py.

Everything runs on a miniature Shapes world with stage-0 components trained for one step: these tests check
the mechanics, not the quality (the bundled model's accuracy is a figure in the README)."""
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
from dataclasses import asdict, fields

import pytest
import torch

import stage0
import train
from conftest import ROOT
from checkpoint import read_safetensors
from data import Tokenizer
from model import IGNORE_INDEX, PRESETS, Llava


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import shapes
    root = tmp_path_factory.mktemp("train")
    world = shapes.generate(str(root / "world"), seed=5, n_pretrain=48, n_instruct=64, n_eval=6, n_instruct_extra=0)
    tok_path = os.path.join(world, "tokenizer.model")
    stage0.pretrain_clip(str(root / "clip"), Tokenizer(tok_path), steps=1, batch=8)
    stage0.pretrain_llm(str(root / "llama"), tok_path, os.path.join(world, "corpus.txt"), steps=1, batch=4)
    assert train.main(args(root, 1, max_steps=2)) == 0         # a stage-1 projector for the stage-2 tests
    return root


def args(root, stage, name=None, **over):
    """Command-line flags for a short run on the miniature world; outputs under root/<name>."""
    name = name or f"stage{stage}"
    a = dict(stage=stage, image_folder=root / "world", model_base=root / "llama", vision_tower=root / "clip",
             out=root / name, ckpt_dir=root / "ckpt" / name, log_dir=root / "log" / name,
             data=root / "world" / ("pretrain.json" if stage == 1 else "instruct.json"), batch_size=8, micro_batch=4,
             val_samples=8, num_workers=0, eval_every=0, lr=1e-3) | (dict(projector=root / "stage1") if stage == 2
                                                                      else {}) | over
    if "val_data" in over and "val_samples" not in over:
        del a["val_samples"]                       # (refused with --val-data: nothing is held out then)
    flags = []
    for k, v in a.items():
        flags += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return flags


def metrics(root, name):
    return json.load(open(root / "log" / name / "metrics.json"))


def test_stage1_changes_only_the_projector(tiny):
    cfg = train.parse_args(args(tiny, 1, "s1-frozen", max_steps=3))
    model = train.train(cfg)
    torch.manual_seed(cfg.seed)                                  # train() seeds before building: the same init
    start = train.build_model(cfg, torch.device("cpu"), torch.float32)
    after, before = model.state_dict(), start.state_dict()
    assert set(after) == set(before)
    for k in after:
        if k.startswith("mm_projector."):
            assert not torch.equal(after[k], before[k]), f"{k} did not learn"
        else:
            assert torch.equal(after[k], before[k]), f"{k} changed in stage 1"
    assert not model.vision_tower.training
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {f"mm_projector.{n}" for n, _ in
                                                                            model.mm_projector.named_parameters()}
    # the official-style output loads on top of its base LLM and vision tower, as liuhaotian stage-1 dirs do
    train.export(model, cfg, model.tokenizer_path)
    out = tiny / "s1-frozen"
    assert set(torch.load(out / "mm_projector.bin")) == {"model.mm_projector.0.weight", "model.mm_projector.0.bias",
                                                         "model.mm_projector.2.weight", "model.mm_projector.2.bias"}
    loaded = Llava.from_pretrained(str(out), dtype=torch.float32, device="cpu")
    ids = torch.tensor([[1, 5, -200, 7, 9]])
    img = torch.randn(1, 3, 72, 72)
    with torch.no_grad():
        assert torch.equal(loaded(ids, img), model(ids, img))


def test_lora_leaves_the_base_unchanged_and_merges_exactly(tiny):
    cfg = train.parse_args(args(tiny, 2, "s2-lora", lora=True, lora_r=4, lora_alpha=8, max_steps=3, lr=1e-2))
    model = train.train(cfg)
    base = Llava.from_pretrained(str(tiny / "stage1"), dtype=torch.float32, device="cpu").state_dict()
    sd = model.state_dict()
    for k, v in sd.items():
        if "lora_" in k or k.startswith("mm_projector."):
            continue
        assert torch.equal(v, base[k.replace(".base.", ".")]), f"{k} changed under LoRA"
    assert all(sd[k].abs().max() > 0 for k in sd if "lora_B" in k), "an adapter did not learn"
    model.eval()                                                 # no LoRA dropout
    ids = torch.tensor([[1, 5, 6, -200, 7, 9, 11], [1, 4, -200, 8, 3, 2, 2]])
    img = torch.randn(2, 3, 72, 72)
    with torch.no_grad():
        unmerged = model(ids, img)
    train.export(model, cfg, model.tokenizer_path)
    merged = Llava.from_pretrained(str(tiny / "s2-lora"), dtype=torch.float32, device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(merged(ids, img), unmerged, rtol=0, atol=1e-5)
    # the adapter dir on its own (PEFT adapters + non_lora_trainables.bin + a stage-1-style config.json) loads as
    # the official liuhaotian/llava-v1.5-7b-lora does: the base LLM and CLIP its config names, the adapters merged
    adapter = Llava.from_pretrained(str(tiny / "s2-lora" / "adapter"), dtype=torch.float32, device="cpu")
    assert adapter.cfg == merged.cfg and adapter.tokenizer_path.endswith("llama/tokenizer.model")
    assert all(torch.equal(v, merged.state_dict()[k]) for k, v in adapter.state_dict().items())


def test_lr_schedule_is_hf_cosine_with_warmup_and_can_hold_the_peak():
    import math
    from transformers.optimization import get_cosine_schedule_with_warmup
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    for total in (7, 123, 1230):
        # the official runs: HF's Trainer with warmup_ratio 0.03, i.e. ceil(0.03 * total) warmup steps; ours
        # warms up one step ahead (HF's first step has lr 0), then is the same
        w = math.ceil(0.03 * total)
        hf = get_cosine_schedule_with_warmup(opt, w, total).lr_lambdas[0]
        assert [train.lr_factor(s, total, 0.03) for s in range(total)] == pytest.approx(
            [hf(s + 1) for s in range(w)] + [hf(s) for s in range(w, total)], rel=0, abs=1e-12)
        # warmup, then the peak held until 80% of the steps, then HF's cosine (no warmup) over the rest
        hold, tail = int(0.8 * total), get_cosine_schedule_with_warmup(opt, 0, total - int(0.8 * total)).lr_lambdas[0]
        held = [train.lr_factor(s, total, 0.03, 0.8) for s in range(total)]
        assert held[:w] == [hf(s + 1) for s in range(w)]
        assert set(held[w:hold]) <= {1.0}
        assert held[hold:] == pytest.approx([tail(k) for k in range(total - hold)], rel=0, abs=1e-12)


def test_lora_under_autocast_makes_no_fp32_copy_of_its_input():
    # train.py on a GPU: bf16 base weights, fp32 adapters, bf16 autocast. An adapter that cast its input to its
    # own fp32 first kept a 2x-size copy (and dropout's output) per linear layer: ~2.7 GiB more at the peak of a
    # 7B LoRA step at 16 x 2048 (an estimate with fake tensors). Here: the same on a CPU, every op's outputs seen
    from torch.utils._python_dispatch import TorchDispatchMode
    from lora import LoRALinear

    class Outputs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            made.extend(t for t in (out if isinstance(out, (tuple, list)) else [out]) if torch.is_tensor(t))
            return out
    layer = LoRALinear(torch.nn.Linear(64, 96, bias=False).to(torch.bfloat16), 8, 16, 0.05)
    x = torch.randn(4, 10, 64, dtype=torch.bfloat16, requires_grad=True)
    made = []
    with Outputs(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and layer.lora_A.weight.grad.dtype == torch.float32
    assert not [t for t in made if t.shape == x.shape and t.dtype == torch.float32]
    y32 = layer(x)                                    # no autocast: the adapter still casts for its fp32 weights
    assert y32.dtype == torch.bfloat16


def test_gradient_checkpointing_gives_the_same_gradients():
    model = Llava(PRESETS["shapes-tiny"])
    model.language_model.init_weights()
    ids = torch.randint(3, 1000, (2, 20))
    ids[:, 4] = -200
    labels = ids.clone()
    labels[:, :8] = IGNORE_INDEX
    img = torch.randn(2, 3, 72, 72)

    def grads(ckpt):
        model.zero_grad()
        model.language_model.grad_checkpointing = ckpt
        model(ids, img, labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and len(plain) > 20
    assert max((plain[n] - ckpt[n]).abs().max().item() for n in plain) <= 1e-6


def test_a_shared_prefix_computed_once_gives_the_same_loss_and_gradients():
    # Llava.trunk runs the positions every row shares (the system prompt) for one row only; rows here share 12
    # tokens, then differ: an image in different places, different lengths (right padding)
    torch.manual_seed(0)
    model = Llava(PRESETS["shapes-tiny"])
    model.language_model.init_weights(std=0.1)
    ids = torch.randint(3, 1000, (3, 40))
    ids[:, :12] = ids[0, :12]
    ids[0, 14], ids[1, 20], ids[2, 12] = -200, -200, -200
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 30:], mask[2, 25:] = False, False
    labels = torch.where(mask, ids, IGNORE_INDEX)
    labels[:, :6] = IGNORE_INDEX                                  # supervised from inside the shared prefix on
    img = torch.randn(3, 3, 72, 72)
    caches = []
    new_cache = model.language_model.new_cache
    model.language_model.new_cache = lambda *a, **k: caches.append(new_cache(*a, **k)) or caches[-1]

    def run(shared):
        model.zero_grad()
        model.shared_prefix = shared
        out = model(ids, img, labels, mask)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    (plain, g_plain), (once, g_once) = run(False), run(True)
    assert len(caches) == 1 and caches[0].length == 40 + 8       # the prefix path ran, over all 48 positions
    torch.testing.assert_close(once.loss, plain.loss, rtol=1e-6, atol=0)
    for row, n in enumerate([48, 37, 32]):                      # real positions (padding's logits are unused)
        torch.testing.assert_close(once.logits[row, :n], plain.logits[row, :n], rtol=0, atol=1e-5)
    assert g_plain.keys() == g_once.keys() and len(g_plain) > 20
    for n in g_plain:
        # fp32 rounding of differently shaped matmuls: ~3e-6 of a tensor's largest gradient here. The floor is for
        # the ViT's key biases, whose true gradient is 0 (softmax ignores a shift shared by all keys): ~1e-9 noise
        scale = g_plain[n].abs().max().item()
        torch.testing.assert_close(g_once[n], g_plain[n], rtol=0, atol=max(1e-5 * scale, 1e-8), msg=n)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):      # as train.py on a GPU: a bf16 cache
        torch.testing.assert_close(model(ids, img, labels, mask).loss, plain.loss, rtol=2e-2, atol=0)
    assert len(caches) == 2 and caches[1].k[0].dtype == torch.bfloat16


@pytest.mark.parametrize("trainable", ["projector", "llm", "lora"])
def test_step_counts_match_torch_flop_counter(trainable):
    # the FLOPs behind train.py's MFU, against PyTorch's own count of the same forward + backward; attention is
    # run by the math backend, whose matmuls the counter sees (it does not count the CPU flash kernel)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    from lora import apply_lora
    torch.manual_seed(0)
    model = Llava(PRESETS["shapes-tiny"])             # 6 query heads on 2 key-value heads
    model.shared_prefix = False                       # a saving MFU does not count (nor would this batch use it)
    model.requires_grad_(False)
    model.mm_projector.requires_grad_(True)           # stage 1
    if trainable == "llm":
        model.language_model.requires_grad_(True)     # stage 2
    if trainable == "lora":
        apply_lora(model.language_model, 16, 32, 0.05)
    ids = torch.randint(3, 1000, (3, 48))
    ids[:2, 4] = -200                                 # two samples with an image, one text-only, all 48 positions
    mask = torch.ones_like(ids, dtype=torch.bool)     # long after the splice, so nothing is padding
    mask[:2, 40:] = False
    labels = torch.where(mask, ids, IGNORE_INDEX)
    labels[:, :30] = IGNORE_INDEX
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        model(ids, torch.randn(2, 3, 72, 72), labels, mask, return_logits=False).loss.backward()
    n_sup, n_pos, flops = model.step_counts(ids, mask, labels).tolist()
    assert (n_sup, n_pos) == (2 * 10 + 18, 3 * 48)     # labels at 30-39 (image rows), 30-47 (text row)
    assert flops == counter.get_total_flops()


def test_a_fully_masked_sample_gives_no_nan():
    model = Llava(PRESETS["shapes-tiny"])
    ids = torch.randint(3, 1000, (2, 12))
    labels = torch.full_like(ids, IGNORE_INDEX)
    out = model(ids, None, labels)
    assert out.loss.item() == 0 and out.n_tokens.item() == 0
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    labels[1, 5:] = ids[1, 5:]                                   # a masked sample beside a supervised one
    both = model(ids, None, labels).loss
    alone = model(ids[1:], None, labels[1:]).loss
    torch.testing.assert_close(both, alone)


def test_loss_falls_on_shapes(tiny):
    assert train.main(args(tiny, 2, "s2-falls", max_steps=12, lr=2e-3, ckpt_every=0)) == 0   # 0: a snapshot at the end
    losses = [m["loss"] for m in metrics(tiny, "s2-falls")["train"]]
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    assert torch.load(tiny / "ckpt" / "s2-falls" / "ckpt.pt", weights_only=False)["step"] == 12


@pytest.mark.parametrize("flags", [dict(micro_batch=0), dict(batch_size=0), dict(batch_size=6, micro_batch=4),
                                   dict(epochs=0), dict(max_steps=-1), dict(lr=-1e-3), dict(warmup_ratio=2.0),
                                   dict(hold_ratio=1.5), dict(max_length=0), dict(num_workers=-1), dict(grad_clip=-1.0),
                                   dict(lora_dropout=1.5, lora=True), dict(stage=1, projector_type="mlp_gelu"),
                                   dict(stage=1, projector_type="identity")])     # it was a ValueError traceback
def test_bad_flags_are_one_line_and_exit_2(tiny, flags, capsys):
    stage, flags = flags.get("stage", 2), {k: v for k, v in flags.items() if k != "stage"}
    assert train.main(args(tiny, stage, "bad", **{"max_steps": 0, "epochs": 1} | flags)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --") and err.count("\n") == 1, err            # before the model is loaded
    assert f"--{next(iter(flags)).replace('_', '-')} " in err


def test_lora_in_stage_1_is_refused(tiny, capsys):
    """Stage 1 trains the projector alone (paper §4.2). --lora was ignored there, and with --preset llava-1.5 it
    gave stage 1 LoRA's learning rates (2e-4, the projector 2e-5) instead of 1e-3, without a word."""
    assert train.main(args(tiny, 1, "bad", lora=True)) == 2
    assert capsys.readouterr().err == "error: --lora is for stage 2: stage 1 trains the projector alone\n"


def test_no_validation_set_means_no_validation_loss(tiny, capsys):
    assert train.main(args(tiny, 1, "noval", max_steps=2, val_samples=0)) == 0   # it reported "validation 0.0000"
    assert metrics(tiny, "noval")["val"] == [] and "no validation set" in capsys.readouterr().out
    (tiny / "empty.json").write_text("[]")                                        # an empty --val-data is a mistake
    assert train.main(args(tiny, 1, "noval", max_steps=2, val_data=tiny / "empty.json")) == 2
    assert capsys.readouterr().err == f"error: {tiny / 'empty.json'}: no samples to validate on\n"


def test_a_file_too_small_for_a_batch_says_how_many_validation_took(tiny, capsys):
    """The default validation set (--val-samples, 128 in the Shapes presets) is held out of --data first: a small
    file of one's own could lose every sample to it, and the error said only "0 training samples"."""
    samples = json.load(open(tiny / "world" / "pretrain.json"))[:5]
    (tiny / "five.json").write_text(json.dumps(samples))
    assert train.main(args(tiny, 1, "small", data=tiny / "five.json", val_samples=128, batch_size=4,
                           micro_batch=2)) == 2
    assert capsys.readouterr().err == (f"error: {tiny / 'five.json'}: 0 training samples (5 of its 5 held out by "
                                       f"--val-samples), fewer than a batch of 4\n")
    assert train.main(args(tiny, 1, "small", data=tiny / "five.json", val_samples=2, batch_size=4,
                           micro_batch=2)) == 2
    assert capsys.readouterr().err.endswith(": 3 training samples (2 of its 5 held out by --val-samples), fewer "
                                            "than a batch of 4\n")
    (tiny / "none.json").write_text("[]")                     # an empty file: nothing was held out of it
    assert train.main(args(tiny, 1, "small", data=tiny / "none.json", batch_size=4, micro_batch=2)) == 2
    assert capsys.readouterr().err == f"error: {tiny / 'none.json'}: 0 training samples, fewer than a batch of 4\n"


def test_a_full_disk_keeps_the_last_snapshot_and_leaves_no_half_file(tiny, monkeypatch, capsys):
    """The disk fills while the step-4 snapshot is written (a 7B run's are tens of GB): one line and exit 2, the
    step-2 snapshot whole, no half-written temporary left on the full disk; --resume continues from step 2. It was
    an OSError traceback with the temporary file left behind."""
    import errno
    import checkpoint
    save, calls = torch.save, []

    def fills_the_disk(obj, path):
        calls.append(path)
        if len(calls) == 2:
            open(path, "wb").write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        save(obj, path)
    monkeypatch.setattr(checkpoint.torch, "save", fills_the_disk)
    flags = args(tiny, 1, "full-disk", max_steps=6, ckpt_every=2)
    ckpt = tiny / "ckpt" / "full-disk" / "ckpt.pt"
    assert train.main(flags) == 2
    assert capsys.readouterr().err.endswith(f"\nerror: {ckpt}: cannot write (No space left on device)\n")
    assert os.listdir(ckpt.parent) == ["ckpt.pt"]
    assert torch.load(ckpt, weights_only=False)["step"] == 2
    monkeypatch.undo()
    assert train.main(flags + ["--resume"]) == 0 and len(metrics(tiny, "full-disk")["train"]) == 6


def test_a_model_that_cannot_be_written_at_the_end_is_written_by_resume(tiny, monkeypatch, capsys):
    """A full disk, or Ctrl-C, while the trained model is written (a 7B model is 13 GB): one line that says the run
    is kept and how to write it (Ctrl-C was a KeyboardInterrupt traceback); --resume writes it, training nothing."""
    from checkpoint import CheckpointError
    flags, ckpt = args(tiny, 1, "unwritten", max_steps=2), tiny / "ckpt" / "unwritten"

    def full_disk(*a):
        raise CheckpointError("x/mm_projector.bin: cannot write (No space left on device)")

    def ctrl_c(*a):
        raise KeyboardInterrupt
    for fails, code, said in [(full_disk, 2, "error: x/mm_projector.bin: cannot write (No space left on device)"),
                              (ctrl_c, 130, "interrupted while writing the model")]:
        monkeypatch.setattr(train, "export", fails)
        assert train.main(flags + ["--resume"] * (code == 130)) == code        # (the second: the run is done)
        assert capsys.readouterr().err.splitlines()[-1] == (f"{said}; the trained run is in {ckpt}: the same command "
                                                            "with --resume writes the model again")
    monkeypatch.undo()
    assert train.main(flags + ["--resume"]) == 0 and (tiny / "unwritten" / "mm_projector.bin").exists()
    assert len(metrics(tiny, "unwritten")["train"]) == 2                  # no step run again


def test_a_diverged_run_stops_before_the_nan_reaches_the_weights(tiny, capsys):
    """An lr far too high: the loss and gradient went NaN at step 2, and the run went on to the end, overwrote each
    snapshot with NaN weights and exported a NaN model, exit 0. Now it stops before the update; the snapshot of
    step 1 is what it was."""
    assert train.main(args(tiny, 1, "diverged", lr=1e30, max_steps=4, ckpt_every=1)) == 2
    ckpt = tiny / "ckpt" / "diverged" / "ckpt.pt"
    assert capsys.readouterr().err.splitlines()[-1] == ("error: step 2: the gradient norm is nan: the run has "
                                                        "diverged; stopped before the update, so the snapshots so far "
                                                        f"hold none of it (delete {ckpt} and run again with a lower "
                                                        "--lr)")
    state = torch.load(ckpt, weights_only=False)
    assert state["step"] == 1 and all(torch.isfinite(t).all() for t in state["trainable"].values())
    assert not (tiny / "diverged" / "mm_projector.bin").exists()


def test_out_of_gpu_memory_is_one_line_saying_what_to_change(tiny, monkeypatch, capsys):
    """Full fine-tuning of 7B on one GPU (README: out of reach without sharding) ended in a CUDA OOM traceback. CI
    has no GPU, so the error is raised where the run would meet it, inside train(); what is tested is the report."""
    def oom(cfg):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.95 GiB. GPU 0 has a total "
                                          "capacity of 79.1 GiB of which 1.2 GiB is free. Including non-PyTorch ...")
    monkeypatch.setattr(train, "train", oom)
    said = "error: CUDA out of memory. Tried to allocate 1.95 GiB: lower --micro-batch (the global --batch-size stays)"
    for flags, tips in [(dict(), ", or add --grad-checkpointing, or use --lora"),       # only what is not on yet
                        (dict(grad_checkpointing=True, lora=True), ""),
                        (dict(stage=1), ", or add --grad-checkpointing")]:                  # (no LoRA in stage 1)
        stage, flags = flags.get("stage", 2), {k: v for k, v in flags.items() if k != "stage"}
        assert train.main(args(tiny, stage, "oom", max_steps=1, **flags)) == 2
        assert capsys.readouterr().err == said + tips + "\n"


def test_a_validation_batch_of_unreadable_images_does_not_end_the_run(tiny, capsys):
    sample = next(s for s in json.load(open(tiny / "world" / "pretrain.json")))
    (tiny / "broken.png").write_text("not a png")
    (tiny / "val-broken.json").write_text(json.dumps([dict(sample, image=str(tiny / "broken.png"))]))
    # it was an IndexError traceback after the last step, before the model was written
    assert train.main(args(tiny, 1, "valbroken", max_steps=2, val_data=tiny / "val-broken.json")) == 0
    assert math.isnan(metrics(tiny, "valbroken")["val"][-1]["loss"])       # nothing to validate on: not 0.0000
    assert "validation nan" in capsys.readouterr().out and (tiny / "valbroken" / "mm_projector.bin").exists()


def test_samples_cut_before_their_answer_by_max_length_are_skipped_and_said(tiny, capsys):
    """A --max-length that leaves a sample no answer token: the official code trains on nothing for it, silently,
    and so did this (loss 0.0000 for a run that learned nothing). Now each is skipped and named, as an unreadable
    image is. Stage 1's captions start at token 2 (after BOS and the image): 2 cuts every one."""
    assert train.main(args(tiny, 1, "cut", max_steps=2, max_length=2)) == 0
    skipped = metrics(tiny, "cut")["skipped"]
    assert len(skipped) == 2 * 8 and all(re.fullmatch(r"sample \d+ \(id .*\): no answer token within --max-length "
                                                      r"2", w) for w in skipped)
    assert "; 16 sample(s) skipped (unreadable image, tokenization mismatch, no answer within --max-length: " \
           "listed in metrics.json)" in capsys.readouterr().out
    assert train.main(args(tiny, 1, "uncut", max_steps=2, max_length=3)) == 0      # one caption token: trains
    assert metrics(tiny, "uncut")["skipped"] == [] and metrics(tiny, "uncut")["train"][0]["loss"] > 0


@pytest.mark.parametrize("where", ["out", "ckpt_dir", "log_dir"])
def test_an_output_that_cannot_be_written_is_refused_before_training(tiny, where, capsys):
    (tiny / "a-file").write_text("not a directory")
    bad = tiny / "a-file" / "run"                  # under a file: no process can create it, not even root
    assert train.main(args(tiny, 2, "unwritable", max_steps=1, **{where: bad})) == 2   # it used to train, then die
    err = capsys.readouterr().err                                                        # on writing the result
    assert err == f"error: {bad}: not a directory this process can write to\n"
    assert not (tiny / "log" / "unwritable" / "metrics.json").exists()                 # no step was run
    if where == "out":                             # stage 0 writes the CLIP and the LLaMA
        for flag in ("--vision-tower", "--model-base"):
            assert train.main(["--stage", "0", "--data", str(tiny / "world"), flag, str(bad)]) == 2
            assert capsys.readouterr().err == f"error: {bad}: not a directory this process can write to\n"


def test_run_outside_the_repository_says_where_it_looked_before_making_anything(tmp_path, monkeypatch, capsys):
    """The defaults are relative (models/shapes-llama, data/shapes). Run from another directory, train.py generated
    the Shapes data there (~25 s) and made output directories before failing, and said only "config.json: missing";
    eval.py wrote its .partial file first. Now: one line naming the missing model and where it was looked for."""
    import eval as evaluate
    monkeypatch.chdir(tmp_path)
    for main, argv, missing in [(train.main, ["--stage", "1"], "models/shapes-llama"),
                                (train.main, ["--stage", "2"], "models/shapes-stage1"),
                                (evaluate.main, [], "models/shapes-llava")]:
        assert main(argv) == 2
        assert capsys.readouterr().err == f"error: {missing}: no such directory (relative to {tmp_path})\n"
    assert list(tmp_path.iterdir()) == []          # no data, no output directory, no partial answers


@pytest.mark.parametrize("flag,value", [("--stage", "3"), ("--stage", "-1"), ("--stage", "two"),
                                        ("--template", "vicuna"), ("--image-aspect-ratio", "anyres")])
def test_a_value_outside_the_choices_is_refused_before_anything_runs(flag, value, capsys):
    with pytest.raises(SystemExit) as e:            # --stage 3 trained as neither stage, then overwrote the output
        train.parse_args([flag, value])
    assert e.value.code == 2 and f"{flag}: invalid" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["--stage", "2"], ["--preset", "llava-1.5", "--stage", "2"],   # (README's)
                                  ["--preset", "llava-1.5", "--stage", "2", "--lora"]])
def test_help_shows_what_each_flag_is_and_the_default_this_preset_and_stage_would_use(argv, monkeypatch, capsys):
    """--help printed every TrainConfig flag bare ("--lr LR"), with no meaning and no default (they hang on --preset
    and --stage). Each line's default must be what parse_args then gives; llava-1.5's paths are "required"."""
    monkeypatch.setenv("COLUMNS", "400")            # one line per flag
    with pytest.raises(SystemExit):
        train.parse_args(argv + ["--help"])
    text = capsys.readouterr().out
    lines = dict(re.findall(r"^  (--[\w-]+)[^\n]*?(?:  +|\n +)(\S[^\n]*)$", text, re.M))   # {flag: its help}
    required = ["data", "image_folder", "projector", "out"] if "llava-1.5" in argv else []
    cfg = train.parse_args(argv + [a for f in required for a in ("--" + f.replace("_", "-"), "somewhere")])
    for f in fields(cfg):
        flag, value = "--" + f.name.replace("_", "-"), getattr(cfg, f.name)
        if flag in argv:                            # given, not a default
            continue
        if f.name in required:
            assert lines[flag].endswith("required"), (flag, lines[flag])
        elif value != "":
            assert lines[flag].endswith(f"default {value}"), (flag, lines[flag], value)
    assert "default 0.0002" in lines["--lr"] if "--lora" in argv else "a held-out LLaVA JSON" in lines["--val-data"]
    assert lines["--stage"].endswith("; default 1")


@pytest.mark.parametrize("argv, says", [
    (["--stage", "0", "--max-steps", "10"], "--max-steps: stage 0 reads only --data, --model-base, --vision-tower, "
                                            "--seed, --ckpt-dir, --resume, --stop-after"),
    (["--stage", "0", "--preset", "llava-1.5"], "--preset llava-1.5 has no stage 0 (the Shapes world's CLIP and "
                                                "LLaMA)"),
    (["--stage", "1", "--projector", "models/x"], "--projector: stage 1 trains a new projector (into --out)"),
    (["--stage", "2", "--projector-type", "linear"], "--projector-type: stage 2 trains the projector in --projector"),
    (["--stage", "2", "--lora-r", "8"], "--lora-r: only with --lora"),
    (["--val-data", "v.json", "--val-samples", "50"], "--val-samples: --val-data is the validation set: nothing is "
                                                      "held out"),
])
def test_a_flag_the_stage_does_not_read_is_refused_not_ignored(argv, says, capsys):
    """`--stage 0 --max-steps 10` ran all of stage 0's 1,000 steps; --lora-r without --lora trained the whole LLM."""
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv)
    assert e.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(says)
    for ok in (["--stage", "0", "--seed", "3", "--data", "x"], ["--stage", "2", "--lora", "--lora-r", "8"]):
        train.parse_args(ok)


def test_an_interrupted_run_resumes_exactly(tiny):
    # LoRA dropout draws random numbers every step, so this also checks that the RNG state is restored
    common = dict(lora=True, lora_r=4, lora_alpha=8, epochs=1)
    assert train.main(args(tiny, 2, "whole", **common)) == 0
    assert train.main(args(tiny, 2, "split", stop_after=3, **common)) == 130
    assert len(metrics(tiny, "split")["train"]) == 3
    assert train.main(args(tiny, 2, "split", resume=True, **common)) == 0
    whole, split = metrics(tiny, "whole"), metrics(tiny, "split")
    assert len(whole["train"]) == len(split["train"]) > 3
    assert [m["loss"] for m in split["train"]] == [m["loss"] for m in whole["train"]]
    assert split["val"][-1]["loss"] == whole["val"][-1]["loss"]
    # resuming with other settings would not continue the same run: refused in one line
    assert train.main(args(tiny, 2, "split", resume=True, **common | dict(lr=5e-3))) == 2


def test_a_fresh_run_over_an_unfinished_runs_snapshot_is_refused(tiny, capsys):
    """The same command without --resume (a forgotten flag) started over and, at its first snapshot, overwrote the
    unfinished run's: all its steps lost. Refused in one line; a finished run's snapshot may be written over."""
    flags = args(tiny, 1, "forgot", max_steps=3, ckpt_every=1)
    ckpt = tiny / "ckpt" / "forgot" / "ckpt.pt"
    assert train.main(flags + ["--stop-after", "2"]) == 130
    capsys.readouterr()
    assert train.main(flags) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (f"error: {ckpt}: holds the snapshot of a run that has not "
                                                        "finished; --resume continues it, or delete it (or give "
                                                        "another --ckpt-dir) to start over")
    assert torch.load(ckpt, weights_only=False)["step"] == 2
    assert train.main(flags + ["--resume"]) == 0                # finished now
    assert train.main(flags) == 0 and len(metrics(tiny, "forgot")["train"]) == 3     # started over
    assert train.main(flags + ["--stop-after", "1"]) == 130
    state = torch.load(ckpt, weights_only=False)
    del state["finished"]                                       # written before snapshots said: not refused
    torch.save(state, ckpt)
    assert train.main(flags) == 0


def test_resuming_over_changed_data_or_frozen_weights_is_refused(tiny, tmp_path, capsys):
    """--resume reads the data, and the weights the run does not train, again from their paths: the data made
    again or stage 0 run again since the snapshot would give another run under the same name, silently."""
    import shutil
    data, clip = tmp_path / "pretrain.json", tmp_path / "clip"
    shutil.copy(tiny / "world" / "pretrain.json", data)
    shutil.copytree(tiny / "clip", clip)
    common = dict(data=data, vision_tower=clip, max_steps=3)
    assert train.main(args(tiny, 1, "inputs", stop_after=1, **common)) == 130
    original = data.read_text()
    samples = json.loads(original)
    samples[0]["conversations"][1]["value"] += " Again."           # one caption, one word longer
    data.write_text(json.dumps(samples))
    capsys.readouterr()
    assert train.main(args(tiny, 1, "inputs", resume=True, **common)) == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith("other settings or inputs (data_sha1); resume with the "
                                                             "same ones")
    data.write_text(original)
    stage0.pretrain_clip(str(clip), Tokenizer(str(tiny / "world" / "tokenizer.model")), steps=1, batch=8, seed=1)
    assert train.main(args(tiny, 1, "inputs", resume=True, **common)) == 2
    assert "(frozen_weights)" in capsys.readouterr().err
    shutil.rmtree(clip)
    shutil.copytree(tiny / "clip", clip)
    assert train.main(args(tiny, 1, "inputs", resume=True, **common)) == 0       # as they were: it continues
    assert len(metrics(tiny, "inputs")["train"]) == 3


def test_stage_2_from_a_released_projector_takes_the_base_and_vision_tower_as_flags(tiny, capsys):
    """A released stage-1 dir (liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5) names its LLM and CLIP
    by hub ids; finetune.sh passes them as --model_name_or_path and --vision_tower. Stage 2 ignored --model-base and
    --vision-tower, and so could not start from one."""
    import shutil
    released = tiny / "released-stage1"
    shutil.copytree(tiny / "stage1", released)
    cfg = json.loads((released / "config.json").read_text())
    cfg |= dict(_name_or_path="lmsys/vicuna-7b-v1.5", mm_vision_tower="openai/clip-vit-large-patch14-336")
    (released / "config.json").write_text(json.dumps(cfg))
    common = dict(projector=released, max_steps=1)
    capsys.readouterr()
    assert train.main(args(tiny, 2, "from-released", **common) + ["--model-base", "", "--vision-tower", ""]) == 2
    assert "vision tower 'openai/clip-vit-large-patch14-336' is not a local directory" in capsys.readouterr().err
    assert train.main(args(tiny, 2, "from-released", **common)) == 0      # args() gives both, as finetune.sh
    assert train.parse_args(["--stage", "2"]).model_base == ""            # the shapes preset: its stage-1 dir's
    # with --lora the adapter dir loads on its own, the adapters merged onto the LLM and CLIP given (it had no
    # config.json: the stage-1 dir's hub ids were all it knew)
    assert train.main(args(tiny, 2, "from-released-lora", lora=True, lora_r=4, lora_alpha=8, **common)) == 0
    ids, img = torch.tensor([[1, 5, -200, 7, 9]]), torch.randn(1, 3, 72, 72)
    merged, adapter = (Llava.from_pretrained(str(tiny / "from-released-lora" / d), dtype=torch.float32, device="cpu")
                       for d in ("", "adapter"))
    with torch.no_grad():
        assert torch.equal(merged(ids, img), adapter(ids, img))


def test_weight_decay_shrinks_matrices_only_as_the_official_runs(tiny):
    """HF's Trainer, which the official runs use, and nanoGPT decay no bias and no norm gain; this decayed every
    trained weight. One AdamW step on zero gradients is the decay alone: matrices shrink by 1 - lr x wd."""
    cfg = train.parse_args(args(tiny, 2, "decay", lr=0.1, weight_decay=0.5, projector_lr=0.2))
    model = train.build_model(cfg, torch.device("cpu"), torch.float32)
    opt = train.make_optimizer(model, cfg, torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert {p.dim() for p in before.values()} == {1, 2}          # biases and RMSNorm gains learn too
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        if n in before:
            lr = 0.2 if n.startswith("mm_projector.") else 0.1
            assert torch.equal(p, before[n] * (1 - lr * 0.5) if p.dim() >= 2 else before[n]), n


def test_a_snapshot_whose_optimizer_has_other_groups_is_refused_in_one_line(tiny, capsys):
    """As an older train.py wrote them (one group for the projector, before the biases left the decay): it was a
    ValueError traceback from the optimizer."""
    assert train.main(args(tiny, 1, "groups", max_steps=2, stop_after=1)) == 130
    ckpt = tiny / "ckpt" / "groups" / "ckpt.pt"
    state = torch.load(ckpt, weights_only=False)
    groups = state["optimizer"]["param_groups"]
    state["optimizer"]["param_groups"] = [groups[0] | dict(params=[i for g in groups for i in g["params"]])]
    torch.save(state, ckpt)
    capsys.readouterr()
    assert train.main(args(tiny, 1, "groups", max_steps=2, resume=True)) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (f"error: {ckpt}: cannot resume from it (its optimizer has "
                                                        "other parameter groups: an older train.py wrote it, which "
                                                        "can finish the run)")


def test_a_damaged_or_foreign_snapshot_is_refused_in_one_line(tiny, capsys):
    assert train.main(args(tiny, 1, "damaged", max_steps=2, stop_after=1)) == 130
    ckpt = tiny / "ckpt" / "damaged" / "ckpt.pt"
    good = ckpt.read_bytes()
    for content in [good[:len(good) // 2], b"garbage\n", random.Random(0).randbytes(100), None]:
        if content is None:
            torch.save({"step": 1}, ckpt)                  # a torch file, but not ours
        else:
            ckpt.write_bytes(content)                      # the last two were tracebacks
        capsys.readouterr()
        assert train.main(args(tiny, 1, "damaged", max_steps=2, resume=True)) == 2
        err = capsys.readouterr().err                      # (after the model's loading bar)
        assert err.splitlines()[-1].startswith(f"error: {ckpt}: cannot resume from it (") and "Traceback" not in err
        assert err.endswith("(not a snapshot train.py wrote)\n") == (content is None), err


def test_a_snapshot_from_before_a_setting_existed_resumes_only_with_its_default(tmp_path):
    """A setting added later (--hold-ratio, say) is missing from older snapshots, which ran as its default: resuming
    one with another value would change the run half-way, so it is refused like any other changed setting."""
    from checkpoint import CheckpointError, load_snapshot, save_snapshot
    model = torch.nn.Linear(2, 2)
    opt, scaler = torch.optim.AdamW(model.parameters()), torch.amp.GradScaler("cpu", enabled=False)
    defaults = asdict(train.TrainConfig())
    path = str(tmp_path / "ckpt.pt")
    save_snapshot(path, model, opt, scaler, 5, {}, {k: v for k, v in defaults.items() if k != "hold_ratio"})
    assert load_snapshot(path, model, opt, scaler, defaults, defaults)[0] == 5
    with pytest.raises(CheckpointError, match="other settings or inputs \\(hold_ratio\\)"):
        load_snapshot(path, model, opt, scaler, defaults | dict(hold_ratio=0.8), defaults)


def test_micro_batches_do_not_change_the_run(tiny):
    """The Shapes preset splits each batch of 32 into two micro-batches of 16 for speed: the loss is a mean over
    the whole batch's supervised tokens, so how a batch is split may change the rounding, nothing else."""
    common = dict(max_steps=3, eval_every=3, group_by_modality=True)
    assert train.main(args(tiny, 2, "mb8", micro_batch=8, **common)) == 0
    assert train.main(args(tiny, 2, "mb2", micro_batch=2, **common)) == 0
    a, b = metrics(tiny, "mb8"), metrics(tiny, "mb2")
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close([m[key] for m in b["train"]], [m[key] for m in a["train"]], rtol=1e-5, atol=0)
    torch.testing.assert_close(b["val"][-1]["loss"], a["val"][-1]["loss"], rtol=1e-5, atol=0)


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "grad-checkpointing"])
def test_compiled_blocks_train_as_eager_ones(tiny, ckpt):
    """--compile (each decoder block compiled, with symbolic shapes) changes the rounding, not the run; with
    gradient checkpointing the compiled blocks are recomputed in the backward pass. Each block is compiled for
    training and for validation (grad mode), and no more: the shared prefix's calls, off under --compile, had
    made a graph per layer (and kind of call), so on the Shapes world dynamo hit its limit of 8 graphs and ran
    the rest eager (found on an H200; tests/test_llama.py has the per-layer half)."""
    from torch._dynamo.utils import counters
    common = dict(max_steps=3, eval_every=3) | (dict(grad_checkpointing=True) if ckpt else {})
    assert train.main(args(tiny, 2, f"eager-{ckpt}", **common)) == 0
    torch._dynamo.reset()
    counters.clear()
    model = train.train(train.parse_args(args(tiny, 2, f"compiled-{ckpt}", compile=True, **common)))
    assert all(block._compiled_call_impl is not None for block in model.language_model.model.layers)
    assert counters["stats"]["unique_graphs"] == 2                # training, and validation (no grad)
    a, b = metrics(tiny, f"eager-{ckpt}"), model.metrics
    for key in ("loss", "grad_norm"):               # measured: within 1.2e-6 of each other
        torch.testing.assert_close([m[key] for m in b["train"]], [m[key] for m in a["train"]], rtol=1e-5, atol=0)
    torch.testing.assert_close(b["val"][-1]["loss"], a["val"][-1]["loss"], rtol=1e-5, atol=0)


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_the_gpu_precision_path_runs_on_a_cpu(tiny, amp, monkeypatch):
    """On a GPU train.py loads the weights in 16 bits, keeps fp32 masters of what learns, runs under autocast (bf16;
    fp16 with a GradScaler where a GPU lacks bf16) and exports in 16 bits. CI has no GPU, but autocast and the
    GradScaler work on a CPU too: the same code runs here with only autocast_dtype's answer changed."""
    monkeypatch.setattr(train, "autocast_dtype", lambda device: amp)
    name = str(amp).split(".")[1]
    cfg = train.parse_args(args(tiny, 1, f"{name}-s1", max_steps=3))
    model = train.train(cfg)
    torch.manual_seed(cfg.seed)
    start = train.build_model(cfg, torch.device("cpu"), amp).state_dict()
    for k, v in model.state_dict().items():
        learns = k.startswith("mm_projector.")
        assert v.dtype == (torch.float32 if learns else amp), k
        assert torch.equal(v, start[k]) != learns, f"{k}: {'did not learn' if learns else 'changed in stage 1'}"
    assert all(math.isfinite(m["loss"]) for m in model.metrics["train"] + model.metrics["val"])
    train.export(model, cfg, model.tokenizer_path)
    assert {v.dtype for v in torch.load(tiny / f"{name}-s1" / "mm_projector.bin").values()} == {amp}
    # stage 2 from that projector: stopped and resumed (the GradScaler's state with it), then exported in 16 bits
    common = dict(projector=tiny / f"{name}-s1", max_steps=4, eval_every=4)
    cfg = train.parse_args(args(tiny, 2, f"{name}-whole", **common))
    model = train.train(cfg)
    assert train.main(args(tiny, 2, f"{name}-split", stop_after=2, **common)) == 130
    assert train.main(args(tiny, 2, f"{name}-split", resume=True, **common)) == 0
    whole, split = model.metrics, metrics(tiny, f"{name}-split")
    assert [m["loss"] for m in split["train"]] == [m["loss"] for m in whole["train"]]
    assert all(math.isfinite(m["loss"]) for m in whole["train"] + whole["val"])
    train.export(model, cfg, model.tokenizer_path)
    from safetensors import safe_open
    with safe_open(str(tiny / f"{name}-whole" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16" if amp == torch.bfloat16 else "F16"}
    loaded = Llava.from_pretrained(str(tiny / f"{name}-whole"), dtype=amp, device="cpu")
    ids, img = torch.tensor([[1, 5, -200, 7, 9]]), torch.randn(1, 3, 72, 72, dtype=amp)
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids, img), model(ids, img))


def test_lora_on_the_gpu_precision_path(tiny, monkeypatch):
    """The GPU path with --lora, on a CPU as above: the base weights bf16 and unchanged, the adapters and the
    projector fp32 masters that learn; the export merges into a bf16 model and keeps the adapter in fp32."""
    monkeypatch.setattr(train, "autocast_dtype", lambda device: torch.bfloat16)
    cfg = train.parse_args(args(tiny, 1, "lora16-s1", max_steps=2))
    model = train.train(cfg)
    train.export(model, cfg, model.tokenizer_path)
    cfg = train.parse_args(args(tiny, 2, "lora16", projector=tiny / "lora16-s1", max_steps=3, lora=True))
    model = train.train(cfg)
    torch.manual_seed(cfg.seed)
    start = train.build_model(cfg, torch.device("cpu"), torch.bfloat16).state_dict()
    for k, v in model.state_dict().items():
        learns = ".lora_" in k or k.startswith("mm_projector.")
        assert v.dtype == (torch.float32 if learns else torch.bfloat16), k
        assert torch.equal(v, start[k]) != learns, f"{k}: {'did not learn' if learns else 'changed'}"
    assert all(math.isfinite(m["loss"]) for m in model.metrics["train"] + model.metrics["val"])
    train.export(model, cfg, model.tokenizer_path)
    from safetensors import safe_open
    for path, dtype in [("model.safetensors", "BF16"), ("adapter/adapter_model.safetensors", "F32")]:
        with safe_open(str(tiny / "lora16" / path), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {dtype}, path
    loaded = Llava.from_pretrained(str(tiny / "lora16"), dtype=torch.bfloat16, device="cpu")
    ids, img = torch.tensor([[1, 5, -200, 7, 9]]), torch.randn(1, 3, 72, 72, dtype=torch.bfloat16)
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids, img), model(ids, img))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])     # Ctrl-C; a job scheduler's notice
def test_ctrl_c_saves_a_checkpoint_and_exits_130(tiny, sig):
    """Both reach the whole process group, the data worker too: a terminal's Ctrl-C does, and so do Slurm's
    notice at a job's time limit and `timeout`. A worker killed by SIGTERM took the save with it (a traceback)."""
    cmd = [sys.executable, "train.py"] + args(tiny, 2, sig.name, max_steps=10000, num_workers=1)
    p = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True, bufsize=1, start_new_session=True)
    line = ""
    while "stage 2:" not in line or "1/" not in line:            # the bar shows a finished step
        line = p.stderr.read(64)
        assert line or p.poll() is None, "train.py ended before its first step"
    os.killpg(p.pid, sig)                                        # the group: train.py and its data worker
    err = p.stderr.read()
    assert p.wait(timeout=120) == 130, err
    assert "continue with --resume" in err and "Traceback" not in err
    state = torch.load(tiny / "ckpt" / sig.name / "ckpt.pt", weights_only=False)
    assert state["step"] >= 1 and set(state["rng"]) == {"torch", "python", "numpy", "cuda"}


def test_ctrl_c_in_stage_0_saves_a_checkpoint_and_exits_130(tiny):
    out = {"--vision-tower": tiny / "s0-clip", "--model-base": tiny / "s0-llama", "--ckpt-dir": tiny / "s0-ckpt"}
    cmd = [sys.executable, "train.py", "--stage", "0", "--data", str(tiny / "world")]
    p = subprocess.Popen(cmd + [str(x) for kv in out.items() for x in kv], cwd=ROOT, stderr=subprocess.PIPE,
                         text=True, bufsize=1)
    seen = ""
    while "stage 0: CLIP" not in seen or "1/600" not in seen:     # the CLIP's first step is done
        seen += p.stderr.read(64)
        assert p.poll() is None, seen[-2000:]
    p.send_signal(signal.SIGINT)
    err = p.stderr.read()
    assert p.wait(timeout=60) == 130, err               # it was a KeyboardInterrupt traceback, then all was lost
    last = err.splitlines()[-1]
    assert "Traceback" not in err and re.fullmatch(r"stage 0 stopped at the CLIP's step \d+/600: checkpoint saved to "
                                                   f"{re.escape(str(tiny / 's0-ckpt' / 'ckpt.pt'))}; continue with "
                                                   "--resume", last), err
    assert torch.load(tiny / "s0-ckpt" / "ckpt.pt", weights_only=False)["step"] >= 1
    assert not any((out[d] / "model.safetensors").exists() for d in ("--vision-tower", "--model-base"))


def test_stage_0_stopped_and_resumed_makes_the_same_models_to_the_bit(tiny, monkeypatch, capsys):
    """Stopped in its CLIP, then in its LLaMA, and resumed: the models of a run that never stopped. A resume with
    another seed is refused."""
    monkeypatch.setattr(stage0, "CLIP_STEPS", 4)
    monkeypatch.setattr(stage0, "CLIP_BATCH", 8)
    monkeypatch.setattr(stage0, "LLM_STEPS", 3)
    monkeypatch.setattr(stage0, "LLM_BATCH", 4)

    def run(name, *flags):
        return train.main(["--stage", "0", "--data", str(tiny / "world"), "--vision-tower", str(tiny / f"{name}-clip"),
                           "--model-base", str(tiny / f"{name}-llama"), "--ckpt-dir", str(tiny / "ckpt" / name),
                           *flags])
    assert run("s0-whole") == 0 and run("s0-whole") == 0         # a finished run's snapshot may be written over
    capsys.readouterr()
    assert run("s0-split", "--stop-after", "2") == 130
    assert "stage 0 stopped at the CLIP's step 2/4" in capsys.readouterr().err
    assert run("s0-split") == 2                                  # without --resume: it would overwrite the snapshot
    assert "ckpt.pt: holds the snapshot of a run that has not finished" in capsys.readouterr().err
    assert run("s0-split", "--resume", "--stop-after", "6") == 130             # the LLaMA's second step
    assert "stage 0 stopped at the LLaMA's step 2/3" in capsys.readouterr().err
    assert run("s0-split", "--resume", "--seed", "1") == 2
    assert "other settings or inputs (seed)" in capsys.readouterr().err
    assert run("s0-split", "--resume") == 0
    capsys.readouterr()
    os.makedirs(tiny / "ckpt" / "s0-foreign")
    torch.save({"step": 1}, tiny / "ckpt" / "s0-foreign" / "ckpt.pt")            # a torch file, not stage 0's
    assert run("s0-foreign", "--resume") == 2
    assert capsys.readouterr().err.endswith("ckpt.pt: cannot resume from it (not a snapshot stage 0 wrote)\n")
    for part in ("clip", "llama"):
        whole = dict(read_safetensors(str(tiny / f"s0-whole-{part}" / "model.safetensors")))
        split = dict(read_safetensors(str(tiny / f"s0-split-{part}" / "model.safetensors")))
        assert whole.keys() == split.keys() and all(torch.equal(whole[k], split[k]) for k in whole), part


def test_ctrl_c_before_the_first_step_is_one_line(tiny, monkeypatch, capsys):
    def loading(cfg):                              # Ctrl-C before train() sets its handlers: loading, data
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "train", loading)
    assert train.main(args(tiny, 1, "early")) == 130             # it was a traceback
    assert capsys.readouterr().err == "interrupted before the first step\n"


def test_ddp_two_processes_match_one(tiny):
    common = dict(max_steps=3, lr=1e-3, eval_every=3, projector_lr=1e-3)
    assert train.main(args(tiny, 2, "one", **common)) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"] + args(
        tiny, 2, "two", micro_batch=2, **common)
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = metrics(tiny, "one"), metrics(tiny, "two")
    torch.testing.assert_close([m["loss"] for m in two["train"]], [m["loss"] for m in one["train"]], rtol=1e-5, atol=0)
    # the gradient itself, before Adam (which is blind to its scale): a missing all-reduce or a wrong loss scale
    # (DDP averages over ranks, which train.py undoes) shows here even where the weights still agree
    torch.testing.assert_close([m["grad_norm"] for m in two["train"]], [m["grad_norm"] for m in one["train"]],
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(two["val"][-1]["loss"], one["val"][-1]["loss"], rtol=1e-5, atol=0)
    a = Llava.from_pretrained(str(tiny / "one"), dtype=torch.float32, device="cpu").state_dict()
    b = Llava.from_pretrained(str(tiny / "two"), dtype=torch.float32, device="cpu").state_dict()
    # two processes sum gradients in another order, and Adam's first steps move each weight by about lr * g / |g|,
    # so rounding in a near-zero gradient can move that weight by up to lr (measured: 3.3e-5 here, 1.7e-4 at a
    # projector lr of 5e-3). Such weights are few (3 in 100,000 beyond 1e-6); a missing all-reduce moves nearly all
    d = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert (d > 1e-6).float().mean() < 1e-3 and d.max() < 0.1 * common["lr"]


def test_a_run_stopped_on_two_processes_resumes_on_one(tiny):
    """A job preempted on 8 GPUs may come back on 4: a snapshot holds the step, and each step's global batch is
    the same samples on any number of processes, so the run continues as if it had never been split."""
    common = dict(max_steps=4, lr=1e-3, eval_every=4, micro_batch=2)
    assert train.main(args(tiny, 2, "one-throughout", **common)) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"] + args(
        tiny, 2, "two-then-one", stop_after=2, **common)
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert "stopped at step 2/4: checkpoint saved" in r.stderr, r.stderr[-3000:]
    assert train.main(args(tiny, 2, "two-then-one", resume=True, **common)) == 0
    one, split = metrics(tiny, "one-throughout"), metrics(tiny, "two-then-one")
    assert len(split["train"]) == 4
    # the first two steps summed their gradients over two processes: the same up to rounding (as above)
    torch.testing.assert_close([m["loss"] for m in split["train"]], [m["loss"] for m in one["train"]], rtol=1e-5,
                               atol=0)
    torch.testing.assert_close(split["val"][-1]["loss"], one["val"][-1]["loss"], rtol=1e-5, atol=0)


def test_eval_writes_official_answers(tiny, capsys):
    import eval as evaluate
    ans = tiny / "answers.jsonl"
    q = tiny / "world" / "eval.jsonl"
    assert evaluate.main(["--model", str(tiny / "stage1"), "--questions", str(q), "--image-folder",
                          str(tiny / "world"), "--answers", str(ans), "--max-new-tokens", "4"]) == 0
    questions = [json.loads(line) for line in open(q)]
    answers = [json.loads(line) for line in open(ans)]
    assert [a["question_id"] for a in answers] == [x["question_id"] for x in questions]
    assert all(set(a) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"} for a in answers)
    assert [a["prompt"] for a in answers] == [x["text"] for x in questions]   # model_vqa_loader.py's cur_prompt
    acc = json.load(open(tiny / "answers-accuracy.json"))
    assert {"overall", "count"} <= set(acc) and acc["overall"]["n"] == len(questions)
    assert "overall:" in capsys.readouterr().out
    # the same answers twice: answer ids are deterministic; --blind runs too
    assert evaluate.main(["--model", str(tiny / "stage1"), "--questions", str(q), "--image-folder",
                          str(tiny / "world"), "--answers", str(ans), "--max-new-tokens", "4"]) == 0
    assert [json.loads(line) for line in open(ans)] == answers
    assert evaluate.main(["--model", str(tiny / "stage1"), "--questions", str(q), "--image-folder",
                          str(tiny / "world"), "--answers", str(tiny / "blind.jsonl"), "--blind",
                          "--max-new-tokens", "4"]) == 0
    assert evaluate.main(["--model", str(tiny / "stage1"), "--questions", str(q), "--image-folder",
                          str(tiny / "world"), "--answers", str(tiny / "v1.jsonl"), "--conv-mode", "vicuna_v1",
                          "--max-new-tokens", "4"]) == 0
    # what the model was asked: the checkpoint's template (`plain`: a stage-1 model only captions), or --conv-mode's
    model = Llava.from_pretrained(str(tiny / "stage1"), dtype=torch.float32, device="cpu")
    tok = Tokenizer(model.tokenizer_path)
    plain, _ = evaluate.answer(model, tok, questions, str(tiny / "world"), "plain", max_new_tokens=1)
    v1, _ = evaluate.answer(model, tok, questions, str(tiny / "world"), "vicuna_v1", max_new_tokens=1)
    assert plain == ["<image>"] * len(questions)
    assert all(p.startswith("A chat between") and p.endswith(f"USER: <image>\n{x['text']} ASSISTANT:")
               for p, x in zip(v1, questions))


@pytest.mark.parametrize("case", ["not JSON", "no question_id", "null image", "numeric text", "missing image",
                                  "prompt past the context", "numeric answer", "numeric category", "no questions"])
def test_eval_bad_questions_are_one_line_and_exit_2(case, tiny, capsys):
    """Refused before the first answer (a missing image or an over-long prompt used to fail, or be answered from
    garbage, mid-run; a numeric answer or category was an AttributeError or TypeError traceback in the scoring,
    after every answer was made; an empty file wrote an empty answers file, exit 0), in one line that names the
    file and line, or the question."""
    import eval as evaluate
    good = dict(question_id=7, image=json.loads(open(tiny / "world" / "eval.jsonl").readline())["image"], text="hi")
    line = {"not JSON": "{question_id: 7}", "no question_id": json.dumps(dict(image=good["image"], text="hi")),
            "null image": json.dumps(dict(good, image=None)), "numeric text": json.dumps(dict(good, text=5)),
            "missing image": json.dumps(dict(good, image="images/eval/nope.png")),
            "prompt past the context": json.dumps(dict(good, text="circle " * 600)),
            "numeric answer": json.dumps(dict(good, answer=2)), "numeric category": json.dumps(dict(good, category=1)),
            "no questions": ""}[case]
    q, ans = tiny / "bad.jsonl", tiny / "bad-answers.jsonl"
    q.write_text(json.dumps(dict(good, question_id=6)) + "\n\n" + line + "\n")   # the bad one on line 3
    if case == "no questions":
        q.write_text("\n\n")
    assert evaluate.main(["--model", str(tiny / "stage1"), "--questions", str(q), "--image-folder",
                          str(tiny / "world"), "--answers", str(ans), "--max-new-tokens", "4", "--conv-mode",
                          "vicuna_v1"]) == 2                  # (`plain`, the stage-1 model's, drops the text)
    err = capsys.readouterr().err                              # (after the model's loading bar, if it loaded)
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in err, err
    assert ("question_id 7: the prompt is " in last and "the model's context is 512" in last if "context" in case
            else last == f"error: {q}: no questions" if case == "no questions" else f"{q}: line 3" in last), err
    assert not ans.exists()


def test_eval_answers_stop_at_the_end_of_the_context(tiny, monkeypatch):
    """A prompt that fits, with fewer positions left than --max-new-tokens: the answer stops where the context ends,
    as chat.py's does; it went on at positions the model never saw."""
    import eval as evaluate
    from data import tokenizer_image_token
    model = Llava.from_pretrained(str(tiny / "stage1"), dtype=torch.float32, device="cpu")
    tok, t = Tokenizer(model.tokenizer_path), train.CONV_TEMPLATES["vicuna_v1"]
    q = dict(question_id=0, image=json.loads(open(tiny / "world" / "eval.jsonl").readline())["image"])
    for k in range(1, 600):                        # the longest question that leaves fewer than 128 positions
        q["text"] = "circle " * k
        n = len(tokenizer_image_token(t.prompt(["<image>\n" + q["text"], None]), tok)) + model.cfg.image_tokens - 1
        if n > 512 - 128:
            break
    asked, generate = [], Llava.generate
    monkeypatch.setattr(Llava, "generate", lambda self, *a, **kw: asked.append(kw["max_new_tokens"]) or generate(
        self, *a, **kw))
    evaluate.answer(model, tok, [q], str(tiny / "world"), "vicuna_v1", max_new_tokens=128)
    assert n < 512 and asked == [512 - n]


def test_eval_a_literal_image_tag_in_a_question_is_text(tiny):
    image = json.loads(open(tiny / "world" / "eval.jsonl").readline())["image"]
    q = tiny / "tag.jsonl"                                     # with and without an image: were ValueErrors
    q.write_text("".join(json.dumps(dict(question_id=i, text="Is <image> a tag?") | x) + "\n"
                         for i, x in enumerate([dict(image=image), {}])))
    import eval as evaluate
    assert evaluate.main(["--model", str(tiny / "stage1"), "--questions", str(q), "--image-folder", str(tiny / "world"),
                          "--answers", str(tiny / "tag.out"), "--max-new-tokens", "4", "--conv-mode", "vicuna_v1"]) == 0
    assert [json.loads(line)["prompt"] for line in open(tiny / "tag.out")] == ["Is <image> a tag?"] * 2
    model = Llava.from_pretrained(str(tiny / "stage1"), dtype=torch.float32, device="cpu")
    prompts, _ = evaluate.answer(model, Tokenizer(model.tokenizer_path), [json.loads(x) for x in open(q)],
                                 str(tiny / "world"), "vicuna_v1", max_new_tokens=1)
    assert [p.count("<image>") for p in prompts] == [2, 1]      # the image's own, and the question's literal one


def test_eval_continues_an_interrupted_run(tiny, monkeypatch, capsys):
    """Ctrl-C (or a crash) mid-run keeps the answers made so far; the same command makes only the rest, and the
    result is the uninterrupted run's. A continuation with other settings is refused."""
    import eval as evaluate
    q, out = tiny / "world" / "eval.jsonl", tiny / "split.jsonl"
    flags = ["--model", str(tiny / "stage1"), "--questions", str(q), "--image-folder", str(tiny / "world"),
             "--max-new-tokens", "4", "--batch-size", "4"]
    assert evaluate.main(flags + ["--answers", str(tiny / "whole.jsonl")]) == 0
    calls, generate = [], Llava.generate

    def counted(self, *a, **k):
        calls.append(len(a[0]))
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return generate(self, *a, **k)
    monkeypatch.setattr(Llava, "generate", counted)
    stop_at = 3
    assert evaluate.main(flags + ["--answers", str(out)]) == 130
    assert "the same command continues" in capsys.readouterr().err
    partial = open(f"{out}.partial").read().splitlines()
    assert len(partial) == 1 + 2 * 4                           # the settings, then two batches of answers
    with open(f"{out}.partial", "a") as f:
        f.write('{"i": 0, "te')                                # a line the crash cut short
    n, calls[:], stop_at = len(open(q).readlines()), [], 0
    assert evaluate.main(flags[:-1] + ["8", "--answers", str(out)]) == 0      # another batch size may continue it
    assert sum(calls) == n - 8 and f"8 of {n} answered" in capsys.readouterr().err
    assert open(out).read() == open(tiny / "whole.jsonl").read() and not os.path.exists(f"{out}.partial")
    calls[:], stop_at = [], 2                      # one batch answered, then Ctrl-C
    assert evaluate.main(flags + ["--answers", str(out)]) == 130
    assert evaluate.main(flags[:-3] + ["5", "--answers", str(out)]) == 2       # --max-new-tokens 5: other answers
    assert capsys.readouterr().err.endswith(f"error: {out}.partial: left by an interrupted run with other settings "
                                            "or weights; run it again with those, or delete the file to start over\n")
    os.remove(f"{out}.partial")
    assert evaluate.main(flags + ["--answers", str(out), "--model", str(tiny / "nope")]) == 2
    assert not os.path.exists(f"{out}.partial")    # a --model typo is refused before anything is written
    calls[:], stop_at = [], 1                      # a run stopped before its first answer: the settings alone
    assert evaluate.main(flags + ["--answers", str(out)]) == 130
    assert len(open(f"{out}.partial").readlines()) == 1
    calls[:], stop_at = [], 0                      # then one with other settings: nothing is lost, so it starts over
    assert evaluate.main(flags[:-3] + ["5", "--answers", str(out)]) == 0 and sum(calls) == n


def test_eval_does_not_continue_over_a_model_trained_again(tiny, monkeypatch, capsys):
    """An evaluation stopped, the model trained again into the same directory, the same command: the answers kept
    came from the old weights, and continuing would mix two models' answers into one accuracy."""
    import shutil

    import eval as evaluate
    model, out = tiny / "eval-retrained", tiny / "retrained.jsonl"
    shutil.copytree(tiny / "stage1", model)
    flags = ["--model", str(model), "--questions", str(tiny / "world" / "eval.jsonl"), "--image-folder",
             str(tiny / "world"), "--max-new-tokens", "4", "--batch-size", "4", "--answers", str(out)]
    calls, generate = [], Llava.generate

    def stop_on_second(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return generate(self, *a, **k)
    monkeypatch.setattr(Llava, "generate", stop_on_second)
    assert evaluate.main(flags) == 130 and len(open(f"{out}.partial").readlines()) == 1 + 4
    m = Llava.from_pretrained(str(model), dtype=torch.float32, device="cpu")
    with torch.no_grad():
        m.mm_projector[0].weight.add_(0.01)                    # "trained again"
    m.save_pretrained(str(model), tokenizer_path=m.tokenizer_path)
    capsys.readouterr()
    assert evaluate.main(flags) == 2
    assert capsys.readouterr().err.endswith(f"error: {out}.partial: left by an interrupted run with other settings "
                                            "or weights; run it again with those, or delete the file to start over\n")


def test_eval_out_of_gpu_memory_keeps_the_answers_and_a_smaller_batch_continues(tiny, monkeypatch, capsys):
    """A batch too large for the GPU ended eval.py in a CUDA OOM traceback, its answers so far kept but not said
    so. CI has no GPU: the error is raised where generation would meet it, on the third batch."""
    import eval as evaluate
    q, out = tiny / "world" / "eval.jsonl", tiny / "oom.jsonl"
    flags = ["--model", str(tiny / "stage1"), "--questions", str(q), "--image-folder", str(tiny / "world"),
             "--max-new-tokens", "4", "--answers", str(out), "--batch-size"]
    calls, generate = [], Llava.generate

    def oom_on_third(self, *a, **k):
        calls.append(len(a[0]))
        if len(calls) == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB.")
        return generate(self, *a, **k)
    monkeypatch.setattr(Llava, "generate", oom_on_third)
    assert evaluate.main(flags + ["4"]) == 2
    assert capsys.readouterr().err.endswith("\nerror: CUDA out of memory. Tried to allocate 20.00 MiB.; the answers "
                                            "so far are kept: run again with a smaller --batch-size\n")
    assert len(open(f"{out}.partial").readlines()) == 1 + 2 * 4          # the settings, two batches of answers
    calls[:] = [0, 0, 0]                                                  # (no more OOM)
    assert evaluate.main(flags + ["2"]) == 0 and sum(calls) == len(open(q).readlines()) - 8


def test_eval_a_full_disk_at_the_end_keeps_every_answer_for_the_next_run(tiny, monkeypatch, capsys):
    """Writing the answers file fails (a full disk): one line and exit 2, the answers still in .partial, and the
    same command writes them without answering again. It was an OSError traceback."""
    import errno
    import eval as evaluate
    q, out = tiny / "world" / "eval.jsonl", tiny / "disk.jsonl"
    flags = ["--model", str(tiny / "stage1"), "--questions", str(q), "--image-folder", str(tiny / "world"),
             "--max-new-tokens", "4", "--answers", str(out)]
    replace = os.replace

    def full(src, dst):
        if dst == str(out):
            raise OSError(errno.ENOSPC, "No space left on device")
        replace(src, dst)
    monkeypatch.setattr(os, "replace", full)
    assert evaluate.main(flags) == 2
    assert capsys.readouterr().err.endswith(f"error: {out}: cannot write (No space left on device)\n")
    assert not out.exists() and not os.path.exists(f"{out}.tmp")
    n = len(open(q).readlines())
    assert len(open(f"{out}.partial").readlines()) == 1 + n               # the settings, every answer
    monkeypatch.undo()
    calls, generate = [], Llava.generate
    monkeypatch.setattr(Llava, "generate", lambda self, *a, **k: calls.append(1) or generate(self, *a, **k))
    assert evaluate.main(flags) == 0 and calls == [] and len(open(out).readlines()) == n
    accuracy = f"{os.path.splitext(out)[0]}-accuracy.json"                 # the disk full after the answers

    def full_after_answers(src, dst):
        if dst == accuracy:
            raise OSError(errno.ENOSPC, "No space left on device")
        replace(src, dst)
    monkeypatch.setattr(os, "replace", full_after_answers)
    capsys.readouterr()
    assert evaluate.main(flags) == 2 and len(open(out).readlines()) == n      # it was a CheckpointError traceback
    assert capsys.readouterr().err.endswith(f"error: {accuracy}: cannot write (No space left on device)\n")


def test_eval_a_full_disk_mid_run_is_one_line_and_the_same_command_continues(tiny, monkeypatch, capsys):
    """The disk fills while a batch's answers are appended to .partial: it was an OSError traceback."""
    import errno
    import eval as evaluate
    q, out = tiny / "world" / "eval.jsonl", tiny / "fills.jsonl"
    flags = ["--model", str(tiny / "stage1"), "--questions", str(q), "--image-folder", str(tiny / "world"),
             "--max-new-tokens", "4", "--batch-size", "4", "--answers", str(out)]
    appends = []

    def full_at_third(path, mode="r", *a, **k):
        appends.append(mode == "a")
        if sum(appends) == 3 and mode == "a":
            raise OSError(errno.ENOSPC, "No space left on device")
        return open(path, mode, *a, **k)
    monkeypatch.setattr(evaluate, "open", full_at_third, raising=False)
    assert evaluate.main(flags) == 2
    assert capsys.readouterr().err.endswith(f"error: {out}.partial: cannot write (No space left on device); the "
                                            "answers before are kept\n")
    assert len(open(f"{out}.partial").readlines()) == 1 + 2 * 4          # the settings, two batches of answers
    monkeypatch.undo()
    calls, generate = [], Llava.generate
    monkeypatch.setattr(Llava, "generate", lambda self, *a, **k: calls.append(len(a[0])) or generate(self, *a, **k))
    n = len(open(q).readlines())
    assert evaluate.main(flags) == 0 and sum(calls) == n - 8 and len(open(out).readlines()) == n


def test_eval_answers_that_cannot_be_written_are_refused_before_answering(tiny, capsys):
    import eval as evaluate                                    # was a traceback after every answer was made
    (tiny / "a-file").write_text("not a directory")
    assert evaluate.main(["--model", str(tiny / "stage1"), "--questions", str(tiny / "world" / "eval.jsonl"),
                          "--image-folder", str(tiny / "world"), "--answers", str(tiny / "a-file" / "a.jsonl")]) == 2
    assert capsys.readouterr().err == f"error: {tiny / 'a-file'}: not a directory this process can write to\n"
    (tiny / "a-dir").mkdir()                                   # answered everything, then failed to write
    assert evaluate.main(["--model", str(tiny / "stage1"), "--questions", str(tiny / "world" / "eval.jsonl"),
                          "--image-folder", str(tiny / "world"), "--answers", str(tiny / "a-dir")]) == 2
    assert capsys.readouterr().err == f"error: {tiny / 'a-dir'}: a directory; --answers names the answers file\n"
    assert not (tiny / "a-dir.partial").exists()


def test_stage0_region_word_loss_trains_the_patches_llava_reads():
    """Stage 0's region-word loss acts on the penultimate layer's patch of each object (what LLaVA reads): the last
    ViT block gets no gradient from it, the blocks before it and the text tower do, and a fixed batch is learned."""
    import random
    import llama
    import shapes
    import vit
    from data import process_image
    torch.manual_seed(0)
    rng = random.Random(0)
    tok = Tokenizer(os.path.join(ROOT, "models", "shapes-llama", "tokenizer.model"))
    vcfg = vit.PRESETS["shapes-tiny"]
    tcfg = llama.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    model = stage0.TinyCLIP(vcfg, tcfg, 32)
    scenes = [shapes.random_scene(rng) for _ in range(8)]
    pixels = torch.stack([process_image(shapes.render(s, rng), vcfg.image_size, "pad") for s in scenes])
    objects = [(b, o) for b, s in enumerate(scenes) for o in s]
    cells = torch.tensor([(b, o["cell"]) for b, o in objects])
    words = [(*stage0.pad([tok.encode(w) + [tok.eos_id] for w in shapes.SHAPES], tok.pad_id),
              torch.tensor([shapes.SHAPES.index(o["shape"]) for _, o in objects]))]
    loss = model.word_loss(pixels, cells, words)
    loss.backward()
    last = model.vision_model.encoder.layers[-1]
    assert all(p.grad is None for p in last.parameters())
    assert model.vision_model.encoder.layers[0].mlp.fc1.weight.grad.abs().sum() > 0
    assert model.text_model.model.embed_tokens.weight.grad.abs().sum() > 0
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(40):
        opt.zero_grad()
        model.word_loss(pixels, cells, words).backward()
        opt.step()
    assert model.word_loss(pixels, cells, words).item() < 0.1 * loss.item()
