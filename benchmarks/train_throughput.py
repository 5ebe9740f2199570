"""End-to-end pretraining throughput of the tiny recipe on this machine: the real trainer
(data loader, model, EMA, optimizer, logging), fp32 and bf16 autocast.

    python benchmarks/train_throughput.py [--updates 60] [--device cpu]

Needs the tiny recipe's data (`bash recipes/tiny/run.sh --stop-stage 4`). Reports audio
seconds per second, updates per second and the fraction of the time spent waiting for the
data loader, from the trainer's own log (the first log interval, which includes start-up, is
left out). Writes its section of results/perf.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_section  # noqa: E402

from mt4ssl.config import load_config  # noqa: E402
from mt4ssl.train.config import PretrainConfig  # noqa: E402
from mt4ssl.train.pretrain import train  # noqa: E402
from mt4ssl.utils.precision import resolve_precision  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=ROOT / "recipes/tiny/pretrain.yaml")
    p.add_argument("--updates", type=int, default=60)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    args = p.parse_args()

    rows = []
    for precision in args.precisions:
        with tempfile.TemporaryDirectory() as out:
            cfg = load_config(PretrainConfig, args.config, [
                f"run.out_dir={out}", f"run.max_updates={args.updates}", f"run.precision={precision}",
                f"run.device={args.device}", "run.log_interval=10", f"run.save_interval={10 * args.updates}",
                "run.valid_interval=0"])
            train(cfg)
            log = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()][1:]
        med = {k: float(np.median([r[k] for r in log])) for k in ("audio_s_per_s", "updates_per_s", "data_wait_frac")}
        rows.append(f"| {precision} | {med['audio_s_per_s']:.1f} | {med['updates_per_s']:.3f} | "
                    f"{med['data_wait_frac']:.1%} | {log[-1]['mem_gb']:.2f} |")
        print(rows[-1], flush=True)
    d = cfg.data
    auto, why = resolve_precision("auto", args.device)
    body = f"""Tiny MT4SSL (`{args.config.relative_to(ROOT)}`: {cfg.model_config().num_layers} layers x
{cfg.model_config().embed_dim}, both targets) on the synthetic corpus, device `{args.device}`,
batches of at most {d.max_tokens:,} samples ({d.max_tokens / 16000:.0f} s), {d.num_workers} data-loader
worker(s), torch threads {cfg.run.threads or 'default'}; {args.updates} updates, medians over log
intervals of 10 updates, the first interval left out. `run.precision: auto` (the recipes'
default) picks **{auto}** on this machine ({why}).

| precision | audio s / s | updates / s | time waiting for data | peak RSS (GB) |
|---|---:|---:|---:|---:|
{chr(10).join(rows)}
"""
    print(body)
    write_section("pretraining throughput (tiny, end to end)",
                  "make bench  # python benchmarks/train_throughput.py", body)


if __name__ == "__main__":
    main()
