"""SUPERB results of `mt4ssl superb` sweeps as a table: one row per upstream, one column per
task (the test score of the learning rate with the best dev score, and that learning rate),
with the published SUPERB figures of HuBERT and data2vec Base as labelled rows.

    python tools/superb_table.py --out results/superb_demo.md \
        --run "tiny MT4SSL=exp/tiny/superb/mt4ssl/pr" --run "tiny MT4SSL=exp/tiny/superb/mt4ssl/ks" \
        --run "fbank=exp/tiny/superb/fbank/pr" ... [--title T] [--note TEXT] [--command "make demo"]

Each `--run LABEL=SWEEP` is a sweep folder of `mt4ssl superb` (its result.json); runs with
one label make one row. Writes OUT (markdown) and OUT with .csv (the same rows: upstream,
source, then per task the value in % and the learning rate). PER and WER are in % (lower
is better), accuracies in % (higher is better).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `benchmarks.report` when run as a script

from benchmarks.report import machine  # noqa: E402
from mt4ssl.errors import InputError  # noqa: E402
from mt4ssl.utils.io import atomic_write_text  # noqa: E402

# task -> (column title, metric); SUPERB's order
TASKS = {"pr": ("PR PER %", "per"), "ks": ("KS acc %", "acc"), "ic": ("IC acc %", "acc"),
         "sid": ("SID acc %", "acc"), "asr": ("ASR WER %", "wer")}
# published SUPERB figures (../shared/notes/published.md): SUPERB paper rows as reproduced in
# the WavLM paper's Table 3; data2vec Base from the SUPERB leaderboard ("challenge public")
PUBLISHED = {
    "HuBERT Base (LS 960 h), published": {"pr": 5.41, "ks": 96.30, "ic": 98.34, "sid": 81.42, "asr": 6.42},
    "data2vec Base (LS 960 h), published": {"pr": 4.69, "sid": 70.21, "asr": 4.94},
}
PUBLISHED_SOURCE = ("SUPERB paper (Yang et al., Interspeech 2021) rows as reproduced in the WavLM "
                    "paper's Table 3; data2vec Base: SUPERB leaderboard, challenge-public set. KS and "
                    "IC of data2vec Base were not found in the sources read.")


def read_sweep(label: str, folder: Path) -> dict:
    path = folder / "result.json"
    if not path.is_file():
        raise InputError(f"--run {label}={folder}: no result.json (not an `mt4ssl superb` sweep folder, "
                         f"or no run has finished)")
    summary = json.loads(path.read_text())
    for key in ("task", "metric", "test", "lr", "runs"):
        if key not in summary:
            raise InputError(f"{path}: no '{key}' (not the result of an `mt4ssl superb` sweep)")
    if summary["task"] not in TASKS:
        raise InputError(f"{path}: unknown task {summary['task']!r}")
    return summary


def collect(runs: list[tuple[str, Path]]) -> dict[str, dict[str, dict]]:
    """label -> task -> sweep summary; a label with two sweeps of one task is an error."""
    rows: dict[str, dict[str, dict]] = {}
    for label, folder in runs:
        summary = read_sweep(label, folder)
        row = rows.setdefault(label, {})
        if summary["task"] in row:
            raise InputError(f"--run {label}: two sweeps of task {summary['task']} ({folder} and "
                             f"{row[summary['task']]['_folder']})")
        row[summary["task"]] = {**summary, "_folder": str(folder)}
    return rows


def cell(summary: dict | None) -> tuple[str, str]:
    """(value in %, learning rate) of a sweep; '—' when there is none."""
    if not summary or summary.get("test") is None:
        return "—", ""
    lrs = len(summary["runs"])
    return f"{100 * summary['test']:.2f}", f"{summary['lr']:g}" + (f" (best of {lrs})" if lrs > 1 else "")


def render(rows: dict[str, dict[str, dict]], title: str, note: str, command: str) -> tuple[str, str]:
    """(markdown, csv) of the measured rows and the published ones."""
    tasks = [t for t in TASKS if any(t in r for r in rows.values())]
    head = ["upstream", "source"] + [TASKS[t][0] for t in tasks]
    lines = [f"# {title}", "", f"Made by: `{command}`", "", f"Machine: {machine()}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out = io.StringIO()
    table = csv.writer(out, lineterminator="\n")
    table.writerow(["upstream", "source"] + [x for t in tasks for x in (TASKS[t][0], f"{t} lr")])
    for label, row in rows.items():
        cells = [cell(row.get(t)) for t in tasks]
        lines.append(f"| {label} | measured | " + " | ".join(
            v if not lr else f"{v} (lr {lr})" for v, lr in cells) + " |")
        table.writerow([label, "measured"] + [x for c in cells for x in c])
    for label, values in PUBLISHED.items():
        shown = [f"{values[t]:.2f}" if t in values else "not found" for t in tasks]
        lines.append(f"| {label} | published | " + " | ".join(shown) + " |")
        table.writerow([label, "published"] + [x for s in shown for x in (s, "")])
    lines += ["", "Test scores of the learning rate with the best dev score (s3prl's dev-best states "
              "evaluated on test); PER and WER lower is better, accuracy higher is better. "
              f"Published rows: {PUBLISHED_SOURCE}"]
    if note:
        lines += ["", note]
    lines += ["", "Runs (each sweep's folder and the commands that made it; paths below the current folder "
              "shown relative to it):", ""]
    here = f"{Path.cwd()}/"
    for label, row in rows.items():
        for task, s in row.items():
            runs = ", ".join(f"lr {r['lr']:g}: dev {r['dev']}, test {r['test']}, {r['seconds']} s" for r in s["runs"])
            lines.append(f"- {label}, {task}: `{str(s['_folder']).replace(here, '')}` ({s['steps']} steps; {runs}); "
                         + "; ".join(f"`{c.replace(here, '')}`" for c in s.get("commands", [])))
            if s.get("pending"):
                lines.append(f"  - not finished: {', '.join(s['pending'])}")
    return "\n".join(lines) + "\n", out.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", required=True, metavar="LABEL=SWEEP",
                   help="a sweep folder of `mt4ssl superb`, with the row label (repeat)")
    p.add_argument("--out", required=True, type=Path, help="markdown file (the CSV goes beside it)")
    p.add_argument("--title", default="SUPERB probes")
    p.add_argument("--note", default="", help="a paragraph under the table")
    p.add_argument("--command", help="the command to name as the table's maker (default: this one)")
    args = p.parse_args(argv)
    runs = []
    for spec in args.run:
        label, sep, folder = spec.partition("=")
        if not sep or not label or not folder:
            p.error(f"--run {spec!r}: expected LABEL=SWEEP_FOLDER")
        runs.append((label, Path(folder)))
    try:
        rows = collect(runs)
    except InputError as e:
        print(f"superb_table: error: {e}", file=sys.stderr)
        return 2
    command = args.command or "python tools/superb_table.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    md, table = render(rows, args.title, args.note, command)
    atomic_write_text(args.out, md)
    atomic_write_text(args.out.with_suffix(".csv"), table)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
