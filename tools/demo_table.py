"""Write results/demo.md: the pretraining run of the demo and its phone-recognition probes.

    python tools/demo_table.py --run exp/tiny/pretrain --probe mfcc=exp/tiny/probe_mfcc.json \
        --probe mt4ssl=exp/tiny/probe_mt4ssl.json --command "make demo"

Reads `RUN/log.jsonl` (one JSON object per logged update, as `mt4ssl pretrain` writes it;
after a resume, the last row logged for an update wins) and the `mt4ssl probe` result JSONs.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `benchmarks.report` (machine()) when run as a script

from benchmarks.report import machine  # noqa: E402
from mt4ssl.errors import InputError  # noqa: E402
from mt4ssl.utils.io import atomic_write_text  # noqa: E402

# log key -> what the table calls it (losses are per masked frame)
LOSSES = {
    "loss": "total loss",
    "loss_kmeans": "k-means cross-entropy",
    "loss_teacher": "teacher regression (L2)",
}
PUBLISHED = (
    "Published MT4SSL numbers, for context only: Ma et al., *MT4SSL: Boosting Self-Supervised "
    "Speech Representation Learning by Integrating Multiple Targets*, Interspeech 2023 "
    "(arXiv:2211.07321): **3.4 % WER on LibriSpeech test-clean and 9.6 % on test-other**, a "
    "Base-size model pretrained on LibriSpeech 960 h on GPUs and fine-tuned with CTC on 10 h "
    "of labelled speech. **Not comparable** to the numbers above: those come from a "
    "model of a few million parameters pretrained briefly on a CPU on synthetic speech, probed "
    "(frozen, linear head) for phones, not fine-tuned for words."
)


def read_log(path: Path) -> list[dict]:
    """Rows of a log.jsonl, sorted by update; a bad line names file:line."""
    if not path.is_file():
        raise InputError(f"{path}: training log not found")
    rows: dict[int, dict] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{lineno}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("update"), int):
            raise InputError(f"{path}:{lineno}: expected an object with an integer 'update'")
        rows[row["update"]] = row  # a resumed run re-logs updates: the last one wins
    if not rows:
        raise InputError(f"{path}: no log rows")
    return [rows[u] for u in sorted(rows)]


def _read_result(spec: str, option: str, command: str, check, needs: str) -> tuple[str, dict]:
    """`NAME=path.json` of a `mt4ssl <command>` result; `check(result)` raises on a wrong shape."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise InputError(f"{option} {spec!r}: expected NAME=path.json")
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {command} result not found")
    try:
        result = json.loads(path.read_text())
        check(result)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise InputError(f"{path}: not an `mt4ssl {command}` result (needs {needs})") from None
    return name, result


def read_probe(spec: str) -> tuple[str, dict]:
    def check(r):
        float(r["per"]["valid"]), float(r["per"]["test"])

    return _read_result(spec, "--probe", "probe", check, "per.valid and per.test")


def read_frames(spec: str) -> tuple[str, dict]:
    def check(result):
        for r in result["results"]:
            float(r["pnmi"]), float(r["phone_purity"]), float(r["cluster_purity"])

    return _read_result(spec, "--frames", "purity", check, "results[].pnmi, phone_purity, cluster_purity")


def frames_table(sources: list[tuple[str, dict]]) -> str:
    lines = ["| features | layer | frame phone accuracy (linear) | phone purity | cluster purity | PNMI |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, result in sources:
        for r in result["results"]:
            layer = r.get("layer")
            acc = r.get("classifier", {}).get("accuracy") if isinstance(r.get("classifier"), dict) else None
            lines.append(f"| {name} | {'–' if layer is None else layer} "
                         f"| {'–' if acc is None else f'{100 * acc:.1f} %'} | {r['phone_purity']:.3f} "
                         f"| {r['cluster_purity']:.3f} | {r['pnmi']:.3f} |")
    return "\n".join(lines)


def _num(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}g}"


def _first_last(rows: list[dict], key: str):
    have = [r for r in rows if isinstance(r.get(key), (int, float))]
    return (have[0], have[-1]) if have else (None, None)


def run_table(rows: list[dict]) -> str:
    lines = ["| quantity | first logged | last logged |", "|---|---:|---:|",
             f"| update | {rows[0]['update']} | {rows[-1]['update']} |"]
    for key, label in LOSSES.items():
        first, last = _first_last(rows, key)
        if first is None:
            if key != "loss":
                lines.append(f"| {label} | off | off |")
            continue
        lines.append(f"| {label}, per masked frame | {_num(first[key])} (update {first['update']}) "
                     f"| {_num(last[key])} (update {last['update']}) |")
    accuracies = sorted({k for r in rows for k in r if k.startswith("acc_")})
    named = [(k, f"k-means accuracy ({k[4:]}), masked frames") for k in accuracies]
    def loss_label(key: str) -> str:  # loss_<label set>: the masked frames' CE of that label set
        return LOSSES.get(key) or f"k-means cross-entropy ({key[5:]}), masked frames only"

    label_sets = sorted({k for r in rows for k in r if k.startswith("loss_") and k not in LOSSES})
    named += [(k, f"{loss_label(k)}, per masked frame") for k in label_sets]
    valid = sorted({k for r in rows for k in r if k.startswith("valid_loss")})
    named += [(k, f"validation (fixed masks): {loss_label(k[6:])}") for k in valid]
    for key, label in named + [("target_std", "teacher target std"), ("pred_std", "prediction std"),
                               ("lr", "learning rate"), ("audio_s_per_s", "throughput (s of audio / s)")]:
        first, last = _first_last(rows, key)
        if first is not None:
            lines.append(f"| {label} | {_num(first[key])} | {_num(last[key])} |")
    return "\n".join(lines)


def run_summary(rows: list[dict]) -> str:
    speeds = [r["audio_s_per_s"] for r in rows if isinstance(r.get("audio_s_per_s"), (int, float))]
    parts = [f"{rows[-1]['update']} updates ({len(rows)} log rows)"]
    if speeds:
        # the first interval includes start-up (data loading, first-step allocation)
        steady = speeds[1:] if len(speeds) > 1 else speeds
        parts.append(f"throughput {statistics.median(steady):.1f} s of audio per second "
                     f"(median over log intervals{', first left out' if len(speeds) > 1 else ''})")
    times = [r["time"] for r in rows if isinstance(r.get("time"), (int, float))]
    if len(times) > 1:
        parts.append(f"{(times[-1] - times[0]) / 60:.1f} min between the first and last log rows")
    return "; ".join(parts) + "."


def probe_table(probes: list[tuple[str, dict]]) -> str:
    lines = ["| probe | features | layer | PER valid | PER test | updates | train utterances | seconds |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for name, r in probes:
        features = r.get("features", "?")
        if r.get("init") == "random":  # fresh weights: the checkpoint only gave the architecture
            features += f", random init (architecture of `{r['ckpt']}`)"
        elif r.get("ckpt"):
            features += f" (`{r['ckpt']}`)"
        layer = r.get("layer")
        if layer == "weighted" and r.get("layer_weights"):
            layer = "weighted: " + " ".join(f"{w:.2f}" for w in r["layer_weights"])
        lines.append(f"| {name} | {features} | {'–' if layer is None else layer} "
                     f"| {100 * r['per']['valid']:.1f} % | {100 * r['per']['test']:.1f} % "
                     f"| {r.get('updates', '–')} | {r.get('train_utterances', '–')} | {r.get('seconds', '–')} |")
    return "\n".join(lines)


def render(run_dir: Path, rows: list[dict], probes: list[tuple[str, dict]], command: str,
           frames: list[tuple[str, dict]] = ()) -> str:
    out = [
        "# CPU demo: pretraining and phone-recognition probes",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine()}  ",
        f"Date: {time.strftime('%Y-%m-%d')}",
        "",
        f"## Pretraining (`{run_dir}`)",
        "",
        run_summary(rows),
        "",
        run_table(rows),
        "",
    ]
    if probes:
        targets = probes[0][1].get("targets", "phones")
        out += [
            "## Phone recognition probes (frozen features, linear CTC head, greedy decoding)",
            "",
            f"PER = phone edit distance / reference phones; targets: {targets}.",
            "",
            probe_table(probes),
            "",
        ]
    if frames:
        first = frames[0][1]
        out += [
            "## Frame-level measures against phone alignments",
            "",
            f"`mt4ssl purity` on the valid split's frames that have an alignment ({first.get('aligned', '?')} "
            f"of {first.get('utterances', '?')} utterances: the flite voices, which print their phone timings; "
            "39 phones + SIL at 50 Hz). Frame phone accuracy: a linear classifier on the frozen layer, "
            "trained on the train split's aligned frames. Purity and PNMI (HuBERT paper, IV-B): of the label "
            "file itself, or of a k-means (k = 100) fitted on the layer's train frames.",
            "",
            frames_table(frames),
            "",
        ]
    out += ["## Published numbers", "", PUBLISHED, ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="pretraining run folder (with log.jsonl)")
    p.add_argument("--probe", action="append", default=[], metavar="NAME=path.json",
                   help="an `mt4ssl probe` result; repeat for each probe, in table order")
    p.add_argument("--frames", action="append", default=[], metavar="NAME=path.json",
                   help="an `mt4ssl purity` result (frame accuracy, purity, PNMI); repeat, in table order")
    p.add_argument("--command", required=True, help="the command that produced these results")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "demo.md", help="default: results/demo.md")
    args = p.parse_args(argv)
    try:
        rows = read_log(args.run / "log.jsonl")
        probes = [read_probe(spec) for spec in args.probe]
        frames = [read_frames(spec) for spec in args.frames]
    except InputError as e:
        print(f"demo_table: error: {e}", file=sys.stderr)
        return 2
    atomic_write_text(args.out, render(args.run, rows, probes, args.command, frames))
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
