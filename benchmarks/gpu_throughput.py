"""Pretraining throughput of base MT4SSL at the paper's batch (3.8 M samples per GPU) through the
project's own training step, eager and compiled, on whatever device is there.

    python benchmarks/gpu_throughput.py [--device auto|cpu|cuda] [--config recipes/librispeech/mt4ssl_base.yaml]
        [--batch-samples 3800000] [--seconds 15] [--modes eager compiled] [--precision auto]
        [--updates 20] [--warmup 3] [--set KEY=VALUE ...] [--no-write]

What runs is `mt4ssl.train.pretrain.Trainer.train_step` (the loop of `mt4ssl pretrain`: the
Pretraining task's mask sampling, student forward and backward, EMA-teacher forward, the
loop's gradient normalisation, AdamW step, EMA step) on batches from the trainer's own
DataLoader and collation, with the recipe's config (`--config`, default the paper's base
recipe) and these overrides: run.device, run.precision (default `auto`: bf16 where the device
has native bf16, else fp32; never bf16 forced on a CPU that would emulate it), run.compile
(per mode), data.max_tokens = --batch-samples, one local process, no validation. The AdamW is
the trainer's: fused on CUDA, torch's default (foreach) on CPU.

Data: a synthetic corpus in a temporary folder: utterances of equal length (--seconds,
adjusted so that a whole number of them fill --batch-samples, then rounded down to the crop
multiple) with random 500-class k-means labels, so every batch has the same shape (the
steady state of a compiled model). Each mode runs in a fresh process (the compile cache and
the memory peak start empty): --warmup untimed updates (the compiled mode compiles in the
first), then --updates timed ones, each ended by a device synchronisation.

Reported: audio seconds per device-second (audio of a batch / median time of an update),
the first update's time (compile time, for the compiled mode), dynamo's compilations and
graph breaks, and peak memory (CUDA: torch.cuda.max_memory_allocated; CPU: peak RSS of the
process). The CPU run uses the tiny preset and a small batch (`--set model.preset=tiny
--batch-samples ...`); on a GPU the defaults are the measurement of issue 11. Writes its
section of results/perf.md unless --no-write (or prints only with --json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import in_fresh_process, write_section  # noqa: E402

from mt4ssl.config import load_config  # noqa: E402
from mt4ssl.data.dataset import bucket_length  # noqa: E402
from mt4ssl.data.labels import write_dict  # noqa: E402
from mt4ssl.models.cnn import SAMPLE_RATE, num_frames  # noqa: E402
from mt4ssl.train import distributed  # noqa: E402
from mt4ssl.train.config import COMPILE_CROP_MS, PretrainConfig  # noqa: E402
from mt4ssl.train.loop import peak_memory_gb  # noqa: E402
from mt4ssl.train.pretrain import Trainer, crop_multiple  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LABELS, NUM_CLASSES = "hubert500", 500
SECTION = "GPU path: pretraining throughput at the paper's batch (eager and compiled)"
PUBLISHED = """Published figures (not measured here; other code, their own hardware and settings):

| system | what | audio s per GPU-s | source |
|---|---|---:|---|
| SpidR | student + EMA teacher, H100 | ~1,760 | published (issue 11) |
| minimal_hubert | HuBERT Base, H100 | ~1,900 | published (issue 11) |
| MT4SSL base (ours) | goal on H100/H200 | >= 1,500 | goal, **not measured here (no GPU)** |
"""


def make_corpus(root: Path, batch_samples: int, seconds: float, multiple: int, batches: int) -> tuple[int, int]:
    """Equal-length noise utterances and random labels filling `batches` batches of
    `batch_samples`; returns (utterance samples, utterances per batch)."""
    per_batch = max(1, round(batch_samples / (seconds * SAMPLE_RATE)))
    n = bucket_length(batch_samples // per_batch, multiple)
    rng = np.random.default_rng(0)
    wav_dir, lab_dir = root / "wav", root / "labels"
    wav_dir.mkdir(parents=True)
    lab_dir.mkdir()
    lines, labels = [str(wav_dir)], []
    for u in range(per_batch * batches):
        sf.write(wav_dir / f"{u}.wav", (0.1 * rng.standard_normal(n)).astype(np.float32), SAMPLE_RATE,
                 subtype="FLOAT")
        lines.append(f"{u}.wav\t{n}")
        labels.append(" ".join(map(str, rng.integers(0, NUM_CLASSES, num_frames(n)))))
    (root / "train.tsv").write_text("\n".join(lines) + "\n")
    (lab_dir / "train.km").write_text("\n".join(labels) + "\n")
    write_dict(lab_dir / "dict.km.txt", NUM_CLASSES)
    return n, per_batch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_mode(mode: str, args: dict) -> dict:
    """One mode in this (fresh) process: build the trainer, warm up, time --updates updates."""
    from torch._dynamo.utils import counters

    torch.set_num_threads(args["threads"]) if args["threads"] else None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = load_config(PretrainConfig, args["config"], ["run.out_dir=unused", *args["set"]])
        ms = base.data.crop_multiple_ms
        multiple = crop_multiple(COMPILE_CROP_MS if ms is None else ms)  # equal-length utterances of it
        n, per_batch = make_corpus(tmp / "data", args["batch_samples"], args["seconds"], multiple, batches=2)
        cfg = load_config(PretrainConfig, args["config"], [
            f"data.manifest_dir={tmp / 'data'}", f"data.labels={{{LABELS}: {tmp / 'data' / 'labels'}}}",
            f"data.max_tokens={max(args['batch_samples'], n)}", f"data.min_samples={min(n, 32000)}",
            f"data.max_samples={n}", "data.num_workers=0", "data.train_split=train",
            f"run.out_dir={tmp / 'run'}", f"run.device={args['device']}", f"run.precision={args['precision']}",
            f"run.compile={mode == 'compiled'}", "run.valid_interval=0", "run.max_updates=1000000",
            "run.update_freq=1", "launch.launcher=local", "run.collapse_after=1000000", *args["set"]])
        d = distributed.setup(cfg.run.device)
        trainer = Trainer(cfg, d)
        try:
            device = d.device
            data = trainer._batches()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times, samples = [], []
            for i in range(args["warmup"] + args["updates"]):
                batches = trainer._next_batches(data)
                sync(device)
                t0 = time.perf_counter()
                stats = trainer.train_step(batches)
                sync(device)
                times.append(time.perf_counter() - t0)
                samples.append(stats["samples"])
                print(f"  {mode} update {i + 1}: {times[-1]:.3f} s, loss/frame "
                      f"{stats['loss'] / max(stats['sample_size'], 1):.4f}", flush=True)
            opt = trainer.optimizer.defaults
            timed = times[args["warmup"]:]
            median = statistics.median(timed)
            return {
                "mode": mode, "device": str(device),
                "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "precision": trainer.precision, "preset": cfg.model.get("preset", "base"),
                "params_m": trainer.model.num_parameters() / 1e6,
                "optimizer": "fused" if opt.get("fused") else ("foreach" if opt.get("foreach") in (True, None) else "for-loop"),
                "batch": [per_batch, n], "samples": statistics.median(samples[args["warmup"]:]),
                "first_s": times[0], "median_s": median, "min_s": min(timed), "max_s": max(timed),
                "audio_s_per_s": statistics.median(samples[args["warmup"]:]) / SAMPLE_RATE / median,
                "peak_gb": peak_memory_gb(device), "threads": torch.get_num_threads(),
                # dynamo has no recompile counter: each compilation of a frame counts in frames.ok;
                # one compiled forward without breaks = 1, every recompile adds 1
                "compilations": counters["frames"]["ok"],
                "graph_breaks": sum(counters["graph_break"].values()),
                "unique_graphs": counters["stats"]["unique_graphs"],
            }
        finally:
            trainer.stop_workers()
            distributed.teardown(d)


def report(results: list[dict], args: dict) -> str:
    r0 = results[0]
    eager = next((r for r in results if r["mode"] == "eager"), None)
    rows = []
    for r in results:
        speedup = f"{eager['median_s'] / r['median_s']:.2f}x" if eager else "n/a"
        rows.append(f"| {r['mode']} | {r['precision']} | {r['audio_s_per_s']:.1f} | {r['median_s']:.3f} "
                    f"({r['min_s']:.3f}-{r['max_s']:.3f}) | {r['first_s']:.1f} | {speedup} | {r['compilations']} "
                    f"| {r['graph_breaks']} | {r['peak_gb']:.2f} |")
    memory = "torch.cuda.max_memory_allocated" if r0["device"].startswith("cuda") else "peak RSS of the process (VmHWM)"
    return f"""The project's training step (`Trainer.train_step` of `mt4ssl pretrain`) with `{args['config_name']}`
{' '.join(args['set']) or '(no overrides)'}: preset **{r0['preset']}** ({r0['params_m']:.1f} M trainable
parameters), device `{r0['device']}` ({r0['device_name']}), {r0['threads']} threads, torch {torch.__version__},
`torch.backends.cpu.get_cpu_capability()` = {torch.backends.cpu.get_cpu_capability()}, load average before
the run {args['load']}. Batch: {r0['batch'][0]} utterances x {r0['batch'][1]:,} samples = {r0['samples']:,.0f}
samples ({r0['samples'] / SAMPLE_RATE:.1f} s of audio; --batch-samples {args['batch_samples']:,}); precision
`{args['precision']}` resolved to {r0['precision']}; AdamW {r0['optimizer']}. {args['warmup']} untimed then
{args['updates']} timed updates per mode, each mode in a fresh process.

| mode | precision | audio s per device-s | time/update, s: median (min-max) | first update, s (compile) | speed-up vs eager | compilations (1 = no recompile) | graph breaks | peak memory (GB) |
|---|---|---:|---|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

- Peak memory: {memory}, over building the model and all updates.
- Compilations / graph breaks: torch._dynamo counters `frames.ok` and `graph_break` of the process (0 for eager).

{PUBLISHED}"""


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda[:N]")
    p.add_argument("--config", type=Path, default=ROOT / "recipes/librispeech/mt4ssl_base.yaml")
    p.add_argument("--batch-samples", type=int, default=3_800_000, help="samples per batch (the paper: 3.8 M per GPU)")
    p.add_argument("--seconds", type=float, default=15.0, help="about this long utterances")
    p.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--updates", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. model.preset=tiny")
    p.add_argument("--no-write", action="store_true", help="do not write results/perf.md")
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    a = p.parse_args(argv)
    if a.updates < 1 or a.warmup < 1:
        p.error("--updates and --warmup must be at least 1")
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    config_name = str(a.config.resolve().relative_to(ROOT)) if a.config.resolve().is_relative_to(ROOT) else str(a.config)
    args = {"device": a.device, "config": str(a.config), "config_name": config_name, "batch_samples": a.batch_samples,
            "seconds": a.seconds, "precision": a.precision, "updates": a.updates, "warmup": a.warmup,
            "threads": a.threads, "set": a.set, "load": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    results = []
    for mode in a.modes:
        results.append(in_fresh_process(run_mode, mode, args))
        r = results[-1]
        print(f"{mode}: {r['audio_s_per_s']:.1f} audio s/s, {r['median_s']:.3f} s/update, first {r['first_s']:.1f} s, "
              f"compilations {r['compilations']}, graph breaks {r['graph_breaks']}, peak {r['peak_gb']:.2f} GB", flush=True)
    body = report(results, args)
    print("\n" + body)
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    if not a.no_write:
        write_section(SECTION, " ".join(["python", "benchmarks/gpu_throughput.py", *(argv or sys.argv[1:])]), body)
    return results


if __name__ == "__main__":
    main()
