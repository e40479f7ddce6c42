"""bench.py keeps working: one iteration on the bundled tiny model (the figures themselves are in BENCHMARKS.md)."""
import json
import subprocess
import sys

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


def test_bench_trains_ours_alone_with_lora(tmp_path):
    """The GPU training run's flags (--only training --lora --grad-checkpointing): our two steps alone, no HF column."""
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "bench.py", "--config", "tiny", "--iters", "1", "--train-batch", "2",
                        "--only", "training", "--lora", "--grad-checkpointing", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(out))["results"]["tiny"]["results"]
    assert set(res) == {"stage 1 train step (tok/s)", "stage 2 train step (tok/s)"}    # no inference, no HF
    for ours, hf in res.values():
        assert ours > 0 and hf is None
