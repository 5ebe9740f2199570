"""Plot a pretraining run's curves: `python tools/plot_curves.py RUN/log.jsonl [--out curves.png]`.

Top panel: the k-means cross-entropy and the teacher regression loss (each per masked frame)
against updates, each on its own y axis since their scales differ. Bottom panel: the std of
the teacher targets (and of the predictions), where a collapse shows as a drop to zero. In
both, the validation values of a run with `run.valid_interval` (`valid_*` keys, fixed masks)
are the dashed lines with markers, in the colour of their training curve.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mt4ssl.errors import InputError  # noqa: E402
from mt4ssl.utils.io import atomic_open  # noqa: E402
from tools.demo_table import read_log  # noqa: E402


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    have = [r for r in rows if isinstance(r.get(key), (int, float))]
    return [r["update"] for r in have], [float(r[key]) for r in have]


def with_valid(ax, rows: list[dict], key: str, color: str, label: str) -> list:
    """Plot `key` (training) and `valid_<key>` (validation, dashed with markers) on `ax`."""
    handles = []
    x, y = series(rows, key)
    if x:
        handles += ax.plot(x, y, color=color, marker="." if len(x) < 30 else None, label=label)
    x, y = series(rows, f"valid_{key}")
    if x:
        handles += ax.plot(x, y, color=color, linestyle="--", marker="o", markersize=4,
                           label=f"valid {label}")
    return handles


def plot(rows: list[dict], title: str):
    fig, (ax_loss, ax_std) = plt.subplots(2, 1, figsize=(7, 6), sharex=True,
                                          gridspec_kw={"height_ratios": [3, 2]})
    handles = with_valid(ax_loss, rows, "loss_kmeans", "tab:blue", "k-means cross-entropy (left axis)")
    ax_loss.set_ylabel("k-means CE per masked frame (nats)", color="tab:blue")
    if series(rows, "loss_teacher")[0] or series(rows, "valid_loss_teacher")[0]:
        ax_teacher = ax_loss.twinx()
        handles += with_valid(ax_teacher, rows, "loss_teacher", "tab:orange",
                              "teacher regression (right axis)")
        ax_teacher.set_ylabel("teacher L2 per masked frame", color="tab:orange")
    if not handles:  # neither target logged: fall back to the total loss
        handles += with_valid(ax_loss, rows, "loss", "tab:gray", "total loss")
        ax_loss.set_ylabel("loss per masked frame", color="black")
    ax_loss.legend(handles=handles, loc="upper right", fontsize="small")
    ax_loss.grid(alpha=0.3)
    ax_loss.set_title(title)

    for key, color, label in (("target_std", "tab:green", "teacher target std"),
                              ("pred_std", "tab:red", "prediction std")):
        with_valid(ax_std, rows, key, color, label)
    ax_std.set_ylabel("std over frames")
    ax_std.set_xlabel("update")
    ax_std.set_ylim(bottom=0)
    if ax_std.get_legend_handles_labels()[0]:
        ax_std.legend(loc="lower right", fontsize="small")
    else:
        ax_std.text(0.5, 0.5, "no target_std / pred_std logged (teacher target off)",
                    ha="center", va="center", transform=ax_std.transAxes, color="gray")
    ax_std.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("log", type=Path, help="a pretraining run's log.jsonl")
    p.add_argument("--out", type=Path, help="PNG to write (default: curves.png beside the log)")
    p.add_argument("--title", help="default: the run folder's name")
    args = p.parse_args(argv)
    try:
        rows = read_log(args.log)
    except InputError as e:
        print(f"plot_curves: error: {e}", file=sys.stderr)
        return 2
    out = args.out or args.log.parent / "curves.png"
    fig = plot(rows, args.title or f"pretraining {args.log.parent.name}: losses and target std")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    with atomic_open(out, "wb") as f:
        f.write(buf.getvalue())
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
