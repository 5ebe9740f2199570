"""Training logs: a JSON line per log step (`log.jsonl`), TensorBoard scalars (`tb/`), and a
progress line on the terminal (a tqdm bar when interactive, plain log lines otherwise).

A validation is logged in the row of its update (its keys prefixed `valid_`; a row of its own
when the update is not a log step), as TensorBoard scalars `valid/...` and a log line.

A run that starts at update `start` (a resume from checkpoint_last, or 0) first drops what an
interrupted attempt logged after it (rows of log.jsonl with a later update, a torn last line,
TensorBoard events from update start + 1 on): those updates are done again, so the log of a
run killed and resumed any number of times is the log of the uninterrupted run."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from tqdm import tqdm

from mt4ssl.utils.io import atomic_write_text

log = logging.getLogger("mt4ssl.train")


class TrainLog:
    def __init__(self, out_dir: Path, total: int, start: int, enabled: bool = True, desc: str = "pretrain",
                 shown: tuple[str, ...] = ("loss", "loss_kmeans", "loss_teacher", "lr", "target_std",
                                           "audio_s_per_s")):
        self.enabled, self.shown = enabled, shown
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        path = Path(out_dir) / "log.jsonl"
        if path.exists():
            keep_rows_until(path, start)
        self.jsonl = open(path, "a")
        tb = Path(out_dir) / "tb"
        self.tb = SummaryWriter(str(tb), purge_step=start + 1 if tb.exists() else None)
        self.bar = tqdm(total=total, initial=start, unit="upd", desc=desc,
                        disable=not sys.stderr.isatty(), dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        if self.enabled:
            self.bar.update(n)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        for key, value in row.items():
            if key != "update" and isinstance(value, (int, float)):
                name = f"valid/{key[6:]}" if key.startswith("valid_") else f"train/{key}"
                self.tb.add_scalar(name, value, row["update"])
        self.tb.flush()
        if "loss" in row:
            shown = {k: row[k] for k in self.shown if k in row}
            text = " ".join(f"{k}={v:.4g}" for k, v in shown.items())
            if self.bar.disable:
                log.info("update %d/%d %s", row["update"], self.bar.total, text)
            else:
                self.bar.set_postfix_str(text, refresh=False)
        if "valid_loss" in row:
            text = " ".join(f"{k[6:]}={v:.4g}" for k, v in row.items()
                            if k.startswith(("valid_loss", "valid_acc_", "valid_target_std", "valid_wer",
                                             "valid_uer")))
            log.info("valid at update %d: %s", row["update"], text)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.jsonl.close()
            self.tb.close()


def keep_rows_until(path: Path, update: int) -> int:
    """Rewrite the JSON-lines log `path` without rows after `update` (and torn lines), when
    it has any; returns how many were dropped."""
    kept, dropped = [], 0
    for line in path.read_text().splitlines(keepends=True):
        try:
            row = json.loads(line)
            ok = line.endswith("\n") and row["update"] <= update
        except (ValueError, KeyError, TypeError):
            ok = False
        if ok:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write_text(path, "".join(kept))
        log.info("%s: dropped %d row(s) logged after update %d by an interrupted attempt", path, dropped, update)
    return dropped
