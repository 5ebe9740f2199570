"""Write results/reproduce.md and results/reproduce.png from `make reproduce`'s runs.

    python tools/reproduce_table.py --runs exp/tiny/reproduce --command "make reproduce" [--seconds S]

RUNS holds `<variant>-seed<S>/` folders (log.jsonl, probe_<update>.json from `mt4ssl purity
--classifier` at every saved checkpoint, ctc_probe.json from `mt4ssl probe`) and the
baselines random_init_probe.json, random_init_ctc.json, mfcc_probe.json. Per probe file the
layer is picked by the classifier's accuracy on its own training frames (never by the
evaluation frames); PNMI is that of the best layer (the HuBERT paper's layer choice).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.report import machine  # noqa: E402
from mt4ssl.errors import InputError  # noqa: E402
from mt4ssl.utils.io import atomic_open, atomic_write_text  # noqa: E402
from tools.demo_table import read_log  # noqa: E402

VARIANTS = {"mt4ssl": "MT4SSL (k-means + teacher)", "hubert_like": "HuBERT-like (k-means only)",
            "data2vec_like": "data2vec-like (teacher only)"}
RUN = re.compile(r"^(?P<variant>\w+)-seed(?P<seed>\d+)$")


def _json(path: Path) -> dict:
    if not path.is_file():
        raise InputError(f"{path}: not found (run `make reproduce` to make it)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not JSON ({e.msg})") from None


def frame_probe(path: Path) -> dict:
    """{accuracy, layer, pnmi} of an `mt4ssl purity --classifier` result."""
    results = _json(path).get("results") or []
    scored = [r for r in results if isinstance(r.get("classifier"), dict)]
    if not scored:
        raise InputError(f"{path}: no classifier results (made without --classifier?)")
    pick = max(scored, key=lambda r: r["classifier"]["fit_accuracy"])
    return {"accuracy": pick["classifier"]["accuracy"], "layer": pick.get("layer"),
            "pnmi": max(r["pnmi"] for r in results)}


def read_run(folder: Path) -> dict:
    rows = read_log(folder / "log.jsonl")
    points = sorted((int(p.stem.split("_")[1]), frame_probe(p)) for p in folder.glob("probe_*.json"))
    if not points:
        raise InputError(f"{folder}: no probe_<update>.json")
    ctc = _json(folder / "ctc_probe.json")
    valid = [r for r in rows if "valid_loss" in r]
    times = [r["time"] for r in rows if "time" in r]
    collapsed = folder / "collapsed.txt"
    return {"updates": rows[-1]["update"], "points": points, "per": ctc["per"],
            "collapsed": collapsed.read_text().strip() if collapsed.is_file() else None,
            "valid": valid[-1] if valid else {}, "minutes": (times[-1] - times[0]) / 60 if len(times) > 1 else None}


def mean_spread(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    values = [scale * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {(max(values) - min(values)) / 2:.{digits}f}"


def render(runs: dict[str, list[dict]], seeds: dict[str, list[int]], baselines: dict, command: str,
           seconds: float | None) -> str:
    lines = [
        "# The paper's claim at CPU scale: MT4SSL vs its ablations",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine()}  ",
        f"Date: {time.strftime('%Y-%m-%d')}" + (
            f"  \nWall time of this invocation: {seconds / 60:.1f} min (a rerun skips finished runs and probes)"
            if seconds else ""),
        "",
        "Same recipe (`recipes/tiny/pretrain.yaml`), data (the demo's synthetic corpus and MFCC "
        "k-means labels), budget and seeds for every variant; only `model.targets` differs. "
        "Mean ± half the range over seeds. Probes on frozen features: the frame-level linear phone "
        "classifier and PNMI (`mt4ssl purity`, on the valid split's aligned frames; layer picked by the "
        "classifier's training accuracy) and the CTC phone-recognition probe (`mt4ssl probe`, PER, all "
        "layers weighted).",
        "",
        "| variant | seeds | updates | frame phone accuracy (%) | PNMI | CTC probe PER valid (%) "
        "| CTC probe PER test (%) | valid k-means CE (nats / masked frame) | valid teacher L2 | minutes per run |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for variant, name in VARIANTS.items():
        rs = runs.get(variant)
        if not rs:
            continue
        finals = [r["points"][-1][1] for r in rs]
        ce = [r["valid"].get("valid_loss_mfcc100") for r in rs]
        l2 = [r["valid"].get("valid_loss_teacher") for r in rs]
        minutes = [r["minutes"] for r in rs if r["minutes"] is not None]
        lines.append(
            f"| {name} | {' '.join(map(str, seeds[variant]))} | {rs[0]['updates']} "
            f"| {mean_spread([f['accuracy'] for f in finals], 100)} | {mean_spread([f['pnmi'] for f in finals], 1, 3)} "
            f"| {mean_spread([r['per']['valid'] for r in rs], 100)} | {mean_spread([r['per']['test'] for r in rs], 100)} "
            f"| {mean_spread(ce, 1, 3) if None not in ce else '–'} | {mean_spread(l2, 1, 3) if None not in l2 else '–'} "
            f"| {mean_spread(minutes) if minutes else '–'} |")
    rand, rand_ctc, mfcc = baselines["random"], baselines["random_ctc"], baselines["mfcc"]
    lines.append(f"| same architecture, random init | – | 0 | {100 * rand['accuracy']:.1f} | {rand['pnmi']:.3f} "
                 f"| {100 * rand_ctc['per']['valid']:.1f} | {100 * rand_ctc['per']['test']:.1f} | – | – | – |")
    lines.append(f"| MFCC (39-d), no model | – | – | {100 * mfcc['accuracy']:.1f} | {mfcc['pnmi']:.3f} "
                 "| see results/demo.md | | – | – | – |")
    for variant, rs in runs.items():
        for r, seed in zip(rs, seeds[variant]):
            if r["collapsed"]:
                lines.append(f"\n{VARIANTS[variant]}, seed {seed}: **{r['collapsed']}** (the collapse guard "
                             "stopped the run; its row uses the checkpoints it had saved, the CTC probe the "
                             "state it stopped at).")
    updates = sorted({u for rs in runs.values() for r in rs for u, _ in r["points"]})
    lines += ["", "Frame phone accuracy (%) at each probed checkpoint, mean over the seeds that reached it:", "",
              "| variant | " + " | ".join(f"update {u}" for u in updates) + " |", "|---|" + "---:|" * len(updates)]
    for variant, rs in runs.items():
        by_update = defaultdict(list)
        for r in rs:
            for u, f in r["points"]:
                by_update[u].append(f["accuracy"])
        lines.append(f"| {VARIANTS[variant]} | " + " | ".join(
            f"{100 * statistics.mean(by_update[u]):.1f}" if by_update[u] else "–" for u in updates) + " |")
    lines += ["", "Plot: `results/reproduce.png`.", ""]
    return "\n".join(lines)


def plot(runs: dict[str, list[dict]], baselines: dict, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"mt4ssl": "tab:red", "hubert_like": "tab:blue", "data2vec_like": "tab:green"}
    for variant, rs in runs.items():
        for r in rs:
            u, acc = zip(*[(u, 100 * f["accuracy"]) for u, f in r["points"]])
            ax.plot(u, acc, color=colors[variant], alpha=0.3, linewidth=1)
        by_update = defaultdict(list)
        for r in rs:
            for u, f in r["points"]:
                by_update[u].append(100 * f["accuracy"])
        u = sorted(by_update)
        ax.plot(u, [statistics.mean(by_update[x]) for x in u], color=colors[variant], marker="o",
                label=f"{VARIANTS[variant]} (mean of {len(rs)} seeds)")
    ax.axhline(100 * baselines["random"]["accuracy"], color="gray", linestyle="--", label="random init")
    ax.axhline(100 * baselines["mfcc"]["accuracy"], color="black", linestyle=":", label="MFCC")
    ax.set_xlabel("pretraining updates")
    ax.set_ylabel("frame phone accuracy, valid (%)")
    ax.set_title("Linear frame phone classifier on frozen features")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_open(out, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=Path, required=True)
    p.add_argument("--command", required=True)
    p.add_argument("--seconds", type=float, help="wall time of the whole command")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "reproduce.md")
    args = p.parse_args(argv)
    try:
        runs: dict[str, list[dict]] = defaultdict(list)
        seeds: dict[str, list[int]] = defaultdict(list)
        for folder in sorted(args.runs.iterdir()):
            m = RUN.match(folder.name)
            if folder.is_dir() and m and m["variant"] in VARIANTS:
                runs[m["variant"]].append(read_run(folder))
                seeds[m["variant"]].append(int(m["seed"]))
        if not runs:
            raise InputError(f"{args.runs}: no <variant>-seed<S> run folders")
        baselines = {"random": frame_probe(args.runs / "random_init_probe.json"),
                     "random_ctc": _json(args.runs / "random_init_ctc.json"),
                     "mfcc": frame_probe(args.runs / "mfcc_probe.json")}
    except InputError as e:
        print(f"reproduce_table: error: {e}", file=sys.stderr)
        return 2
    runs = {v: runs[v] for v in VARIANTS if v in runs}
    atomic_write_text(args.out, render(runs, seeds, baselines, args.command, args.seconds))
    plot(runs, baselines, args.out.with_suffix(".png"))
    print(args.out, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
