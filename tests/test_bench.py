"""bench.py keeps working: one iteration on the bundled tiny model (the figures themselves are in BENCHMARKS.md)."""
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT


def test_bench_runs_on_the_tiny_model(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "bench.py", "--config", "tiny", "--iters", "1", "--train-batch", "2",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(out))["results"]["tiny"]["results"]
    assert res["max |logit diff| vs HF"][0] < 1e-4          # the two sides really hold the same weights
    for k in ("time to first token (ms)", "decode, batch 1 (tok/s)", "decode, batch 8 (tok/s)",
              "stage 1 train step (tok/s)", "stage 2 train step (tok/s)"):
        ours, hf = res[k]
        assert ours > 0 and hf > 0, k
    assert "ours/HF" in r.stdout
    projector, llm = trainable_counts()
    assert res["stage 1 trainable (M)"] == [projector / 1e6] * 2           # both sides train the same weights
    assert res["stage 2 trainable (M)"] == [(projector + llm) / 1e6] * 2


def trainable_counts(lora_r=None):
    """The bundled model's projector (mlp2x_gelu) and LLM parameter counts, from its config alone; with lora_r, the
    LLM's LoRA adapters' instead (A: r x in, B: out x r on q/k/v/o/gate/up/down)."""
    cfg = json.load(open(os.path.join(ROOT, "models", "shapes-llava", "config.json")))
    c, m = cfg["text"], cfg["vision"]["hidden_size"]
    d, f, n_layers, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = c["num_key_value_heads"] * c["head_dim"]
    projector = m * d + d + d * d + d
    if lora_r:
        return projector, n_layers * lora_r * ((d + d) * 2 + (d + kv) * 2 + (d + f) * 2 + (f + d))
    return projector, 2 * v * d + d + n_layers * (2 * d * d + 2 * d * kv + 3 * d * f + 2 * d)


def test_bench_trains_ours_alone_with_lora(tmp_path):
    """The GPU training run's flags (--only training --lora --grad-checkpointing): our two steps alone, no HF column."""
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "bench.py", "--config", "tiny", "--iters", "1", "--train-batch", "2",
                        "--only", "training", "--lora", "--grad-checkpointing", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(out))["results"]["tiny"]["results"]
    assert set(res) == {f"stage {s} {k}" for s in (1, 2) for k in ("train step (tok/s)", "trainable (M)")}
    for ours, hf in res.values():                                            # no inference, no HF column
        assert ours > 0 and hf is None
    projector, adapters = trainable_counts(lora_r=128)
    assert res["stage 2 trainable (M)"][0] == (projector + adapters) / 1e6   # the adapters learn, not the LLM


def test_counts_below_one_are_refused_in_one_line(capsys):
    import bench                                              # "--iters 0" was a StatisticsError traceback
    for flag, value in [("--iters", "0"), ("--train-batch", "-1")]:
        with pytest.raises(SystemExit) as e:
            bench.build_parser().parse_args([flag, value])
        assert e.value.code == 2 and f"{flag}: '{value}' is not a whole number >= 1" in capsys.readouterr().err


def test_a_bad_load_path_or_out_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    for argv, said in [(["--load", str(tmp_path / "nope")], f"{tmp_path / 'nope'}: no such directory"),
                       (["--load", str(tmp_path)], f"{tmp_path / 'config.json'}: missing"),       # were tracebacks
                       (["--out", str(tmp_path / "a-file" / "b.json")],                          # after the whole run
                        f"{tmp_path / 'a-file'}: not a directory this process can write to"),
                       (["--out", str(tmp_path)], f"{tmp_path}: a directory; --out names the JSON file")]:
        r = subprocess.run([sys.executable, "bench.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stderr == f"error: {said}\n" and r.stdout == "", (argv, r.stderr)


def test_load_takes_the_vision_tower_a_released_config_names_by_hub_id(tmp_path):
    """liuhaotian/llava-v1.5-7b's config names openai/clip-vit-large-patch14-336: chat.py and eval.py take the local
    CLIP as --vision-tower; `bench.py --load` had no such flag, so it could not load a released checkpoint."""
    from hf_fixtures import hf_llava, write_clip, write_liuhaotian
    hf, clip, model = hf_llava(), str(tmp_path / "clip"), str(tmp_path / "llava")
    write_clip(hf, clip)
    write_liuhaotian(hf, model, clip)
    cfg = json.load(open(os.path.join(model, "config.json")))
    json.dump(cfg | dict(mm_vision_tower="openai/clip-vit-large-patch14-336"), open(os.path.join(model, "config.json"),
                                                                                    "w"))
    run = lambda *a: subprocess.run([sys.executable, "bench.py", "--load", model, *a], cwd=ROOT, capture_output=True,
                                    text=True, timeout=120)
    r = run()
    assert r.returncode == 2 and "pass vision_tower=<dir>" in r.stderr, r.stderr
    r = run("--vision-tower", clip)
    assert r.returncode == 0 and f"{model}: 0.00 B parameters" in r.stdout, r.stderr


def test_a_full_disk_at_the_end_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    """The figures are printed as they are measured; writing --out at the end on a full disk was a traceback."""
    import bench
    from checkpoint import CheckpointError

    def full(path, *a, **k):
        raise CheckpointError(f"{path}: cannot write (No space left on device)")
    monkeypatch.setattr(bench, "build", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))   # no rows
    monkeypatch.setattr(bench, "write_json", full)
    assert bench.main(["--config", "tiny", "--out", str(tmp_path / "b.json")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"error: {tmp_path / 'b.json'}: cannot write (No space left " \
                                                       "on device)"


def test_a_stopped_run_keeps_the_rows_it_measured(tmp_path):
    """`timeout`'s SIGTERM (a GPU lease ending, say) mid-run: the rows already printed are in --out, exit 130."""
    import signal
    out = tmp_path / "bench.json"
    p = subprocess.Popen([sys.executable, "bench.py", "--config", "tiny", "--iters", "200", "--out", str(out)],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    printed = []
    for line in p.stdout:                       # rows come as they are measured, not all at the end
        printed.append(line)
        if line.startswith("image encoding"):   # the second row; 200 iterations of each later row take a while
            p.send_signal(signal.SIGTERM)
            break
    rest, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-3000:]
    assert f"interrupted: {out} holds the rows measured so far" in err
    res = json.load(open(out))["results"]["tiny"]["results"]
    assert list(res)[:2] == ["max |logit diff| vs HF", "image encoding (ms)"]
    assert "decode, batch 8 (tok/s)" not in res and "stage 1 train step (tok/s)" not in res
    assert all(k in "".join(printed) + rest for k in res)     # every row written was printed first



def test_a_config_too_large_for_the_device_is_one_line_before_anything_is_allocated(tmp_path, monkeypatch, capsys):
    """`python bench.py --config 7b` without `--device cuda`: 7B in fp32, ours and HF's copy, is 53 GiB, and on a
    24 GB machine it met the OOM killer minutes in. The weights (and a full stage 2's gradients and AdamW moments)
    are counted on the meta device first. Here the device reports 10 MiB free, so that the test does not depend
    on the machine it runs on."""
    import torch
    import bench
    from model import Llava
    with torch.device("meta"):
        m = Llava(bench.CONFIGS["100m"][0])
    n, n_llm = sum(p.numel() for p in m.parameters()), sum(p.numel() for p in m.language_model.parameters())
    monkeypatch.setattr(bench, "free_memory", lambda device: 10 * 2**20)
    out = tmp_path / "bench.json"
    for flags, nbytes, who in [([], 2 * 4 * (n + 3 * n_llm), "ours and transformers"),     # fp32: 4 bytes
                               (["--only", "inference"], 2 * 4 * n, "ours and transformers"),
                               (["--only", "training", "--lora"], 4 * n, "ours")]:
        assert bench.main(["--config", "100m", "--out", str(out), *flags]) == 2
        assert capsys.readouterr().err == (f"error: --config 100m needs at least {nbytes / 2**30:.1f} GiB in "
                                           f"torch.float32 ({who}); cpu has 0.0 GiB free\n")
        assert json.load(open(out))["results"] == {}          # written: the configs before it would be in it
    assert bench.free_memory(torch.device("cpu")) > 2**20     # the real one reads this machine


@pytest.mark.parametrize("argv,says", [
    (["--load", "models/shapes-llava", "--dtype", "float16"], "--dtype: --load measures loading alone, in bf16"),
    (["--load", "models/shapes-llava", "--out", "x.json"], "--out: --load measures loading alone"),   # none written
    (["--vision-tower", "models/shapes-clip"], "--vision-tower: only --load reads it"),
    (["--only", "inference", "--lora"], "--lora: --only inference trains nothing")])
def test_a_flag_the_run_would_ignore_is_refused(argv, says, capsys):
    """Each ran without it, silently: --load measured a bf16 load whatever --dtype said and wrote no --out."""
    import bench
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2 and f": error: {says}" in capsys.readouterr().err.splitlines()[-1]
