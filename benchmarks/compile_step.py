"""`run.compile=true` on the tiny recipe: compile time, steady-state speed-up over eager and the
compilations in a run of real batches (varying batch size and crop length), side by side.

    python benchmarks/compile_step.py [--updates 200] [--set KEY=VALUE ...] [--no-write]

Each mode (eager, compiled) runs in a fresh process: the tiny recipe's trainer
(`recipes/tiny/pretrain.yaml` + --set, e.g. data.manifest_dir=... for another copy of the demo
data) drives `Trainer.train_step` over --updates batches of its own DataLoader, the same
batches in the same order in both modes. Reported: the time of the first update (the compile,
for the compiled mode), the median update time after the first 20 (steady state), distinct
batch shapes seen, and torch._dynamo's counters (compilations, graph breaks, graphs). Needs the
demo data (`bash recipes/tiny/run.sh --stop-stage 4`). Writes its section of results/perf.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import in_fresh_process, write_section  # noqa: E402

from mt4ssl.config import load_config  # noqa: E402
from mt4ssl.train import distributed  # noqa: E402
from mt4ssl.train.config import COMPILE_CROP_MS, PretrainConfig  # noqa: E402
from mt4ssl.train.pretrain import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STEADY_AFTER = 20


def run_mode(compiled: bool, args: dict) -> dict:
    from torch._dynamo.utils import counters

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(PretrainConfig, args["config"], [
            f"run.out_dir={out}", f"run.compile={compiled}", "run.valid_interval=0",
            f"run.max_updates={args['updates'] + 1}",
            f"data.crop_multiple_ms={COMPILE_CROP_MS}", *args["set"]])  # both arms: the same batch shapes
        d = distributed.setup(cfg.run.device)
        trainer = Trainer(cfg, d)
        try:
            data, times, shapes, losses = trainer._batches(), [], set(), []
            for _ in range(args["updates"]):
                batches = trainer._next_batches(data)
                shapes.add(tuple(batches[0]["wav"].shape))
                t0 = time.perf_counter()
                stats = trainer.train_step(batches)
                times.append(time.perf_counter() - t0)
                losses.append(stats["loss"] / stats["sample_size"])
        finally:
            trainer.stop_workers()
            distributed.teardown(d)
    return {"compiled": compiled, "first_s": times[0], "steady_s": statistics.median(times[STEADY_AFTER:]),
            "total_s": sum(times), "shapes": len(shapes), "precision": trainer.precision,
            "compilations": counters["frames"]["ok"], "graph_breaks": sum(counters["graph_break"].values()),
            "graphs": counters["stats"]["unique_graphs"], "slow": sum(t > 5 * statistics.median(times) for t in times),
            "last_loss": losses[-1], "threads": torch.get_num_threads(),
            "crop_multiple_ms": cfg.crop_ms()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=ROOT / "recipes/tiny/pretrain.yaml")
    p.add_argument("--updates", type=int, default=200)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args()
    if a.updates <= STEADY_AFTER:
        p.error(f"--updates must be more than {STEADY_AFTER}")
    args = {"config": str(a.config), "updates": a.updates, "set": a.set}
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    res = []
    for compiled in (False, True):
        res.append(in_fresh_process(run_mode, compiled, args))
        print(res[-1], flush=True)
    eager, comp = res
    limit = torch._dynamo.config.recompile_limit
    bounded = (f"- dynamo's `recompile_limit` ({limit}) was reached: later new shapes ran the forward eagerly, "
               f"so the steady median mixes compiled and eager updates.\n" if comp["compilations"] >= limit else "")
    rows = [f"| {'compiled' if r['compiled'] else 'eager'} | {r['first_s']:.1f} | {r['steady_s']:.3f} | "
            f"{eager['steady_s'] / r['steady_s']:.2f}x | {r['total_s']:.0f} | {r['shapes']} | {r['compilations']} | "
            f"{r['graph_breaks']} | {r['graphs']} | {r['slow']} | {r['last_loss']:.4f} |" for r in res]
    body = f"""Tiny recipe (`{a.config.relative_to(ROOT) if a.config.resolve().is_relative_to(ROOT) else a.config}` {' '.join(a.set)}),
`Trainer.train_step` over the first {a.updates} batches of its DataLoader (the same in both modes), each mode
in a fresh process; precision {comp['precision']} (`run.precision: auto`), {comp['threads']} torch thread(s),
data.crop_multiple_ms {comp['crop_multiple_ms']}; torch {torch.__version__}, `torch.compile(...)` (automatic dynamic shapes)
(mt4ssl/train/loop.py), `torch.backends.cpu.get_cpu_capability()` = {torch.backends.cpu.get_cpu_capability()};
load average before the run {load} (2 cores shared with other jobs: times are upper bounds, the ratio is
what was measured side by side).

| mode | first update, s (compile) | steady update, s (median after {STEADY_AFTER}) | speed-up | {a.updates} updates, s | batch shapes | compilations (1 = no recompile) | graph breaks | graphs | updates > 5x median | last loss/frame |
|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

- Compilations, graph breaks, graphs: torch._dynamo.utils.counters of the process (`frames.ok`,
  `graph_break`, `stats.unique_graphs`; eager: 0); dynamo keeps no recompile counter: with one
  compiled forward and no break, compilations - 1 are the recompiles. "updates > 5x median": updates that compiled again.
{bounded}- Break-even: the compile costs {comp['first_s'] - eager['first_s']:.0f} s more than an eager first update; at the
  steady-state difference it is repaid after {max(0.0, (comp['first_s'] - eager['first_s'])) / max(1e-9, eager['steady_s'] - comp['steady_s']):.0f} updates
  (if the compiled step is faster).
"""
    print(body)
    if not a.no_write:
        write_section("run.compile on CPU (tiny recipe)",
                      " ".join(["python", "benchmarks/compile_step.py", *sys.argv[1:]]), body)


if __name__ == "__main__":
    main()
