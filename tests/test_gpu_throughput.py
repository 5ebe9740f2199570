"""benchmarks/gpu_throughput.py runs (so it cannot rot): the project's training step on a
synthetic corpus, on CPU with a small model and batch, eager (the compiled mode is the same
trainer with run.compile=true, tested in test_compile.py)."""

from __future__ import annotations

import json

from benchmarks import gpu_throughput
from mt4ssl.utils.precision import resolve_precision

SMALL = ["model.preset=tiny", "model.embed_dim=32", "model.ffn_dim=64", "model.num_heads=4", "model.num_layers=2",
         "model.pos_conv_groups=4", "model.teacher.top_k=2",
         "model.conv_layers=[[32,10,5],[32,3,2],[32,3,2],[32,3,2],[32,3,2],[32,2,2],[32,2,2]]"]


def test_gpu_throughput_on_cpu(tmp_path):
    out = tmp_path / "r.json"
    results = gpu_throughput.main(["--device", "cpu", "--modes", "eager", "--batch-samples", "64000",
                                   "--seconds", "2", "--updates", "2", "--warmup", "1", "--threads", "1",
                                   "--no-write", "--json", str(out), "--set", *SMALL])
    (r,) = results
    assert json.loads(out.read_text()) == results
    assert r["mode"] == "eager" and r["device"] == "cpu" and r["preset"] == "tiny"
    assert r["precision"] == resolve_precision("auto", "cpu")[0]  # auto, never bf16 forced
    assert r["batch"] == [2, 32000] and r["samples"] == 64000  # 2 utterances of 2 s fill the batch
    assert r["audio_s_per_s"] > 0 and r["peak_gb"] > 0 and r["compilations"] == 0
    body = gpu_throughput.report(results, {"config_name": "x.yaml", "set": SMALL, "batch_samples": 64000,
                                           "precision": "auto", "warmup": 1, "updates": 2, "load": "0"})
    assert "| eager |" in body and "1,760" in body and "not measured here" in body
