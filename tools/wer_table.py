"""WER of `mt4ssl decode` runs as a table, next to the published LibriSpeech figures.

    python tools/wer_table.py --out results/librispeech_wer.md \\
        --run "tiny MT4SSL (demo)" "10 min" exp/tiny/finetune/mt4ssl_10m/decode \\
        --run "same architecture, random init" "10 min" exp/tiny/finetune/random_10m/decode \\
        [--title T] [--note TEXT] [--command "make reproduce"]

Each `--run MODEL SPLIT DIR` names a folder of `{subset}.json` files written by
`mt4ssl decode` (one per decoded subset). A (model, split) gets one row per decoding: the
Viterbi (greedy) result, and the beam search with its LM when the decode had `--lm` (a
lexicon-only beam search is shown as such). Columns: dev-clean, dev-other, test-clean,
test-other (then any other subset decoded), WER in %; "–" where a subset was not decoded.

Every measured row says so and names the commands: the fine-tuning run (its folder's
config.yaml beside the checkpoint, when present) and the `mt4ssl decode` commands of its
jsons. The published rows (../shared/notes/published.md) follow, labelled "published";
what the sources read do not state (MT4SSL's split and LM) is said, not guessed.
Writes OUT (markdown) and OUT with .csv (the same rows, one per model, split and decoding).
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

SUBSETS = ("dev-clean", "dev-other", "test-clean", "test-other")
NOT_STATED = "not stated in the sources read"
# ../shared/notes/published.md. MT4SSL: the paper's headline as listed by leaderboards; the
# fine-tuning split and the LM are not stated there, and no per-split table was found.
# SUPERB ASR: frozen upstream + s3prl's BiLSTM downstream on train-clean-100, no LM, test-clean.
PUBLISHED = (
    {"model": "MT4SSL Base (LibriSpeech 960 h)", "split": NOT_STATED, "decoding": NOT_STATED,
     "wer": {"test-clean": 3.4, "test-other": 9.6},
     "source": "Ma et al., Interspeech 2023 (arXiv 2211.07321), headline as listed by leaderboards"},
    *({"model": f"{name} (LibriSpeech 960 h), SUPERB ASR", "split": "100 h (train-clean-100), frozen upstream",
       "decoding": "none (s3prl BiLSTM-CTC downstream)", "wer": {"test-clean": wer},
       "source": "SUPERB paper (Yang et al., 2021) as reproduced in the WavLM paper's Table 3"
                 + ("; data2vec: SUPERB leaderboard, challenge-public set" if name.startswith("data2vec") else "")}
      for name, wer in (("wav2vec 2.0 Base", 6.43), ("HuBERT Base", 6.42), ("WavLM Base", 6.21),
                        ("data2vec Base", 4.94))),
)
PUBLISHED_NOTE = (
    "Published rows (../shared/notes/published.md): MT4SSL's 3.4 / 9.6 is its headline test-clean / "
    f"test-other WER; the labelled split and the LM are {NOT_STATED} (likely 10 h with the 4-gram LM, "
    "but that is not a figure read). Per-split MT4SSL figures (10 min / 1 h / 10 h / 100 h, with or without "
    "LM) were not found and are not shown. The SUPERB ASR rows are another protocol (the upstream frozen, "
    "a BiLSTM downstream trained on 100 h, no LM), listed as the baselines' figures that were read; "
    "fine-tuned CTC WERs of the baselines were not in the sources read.")


def read_decode(path: Path) -> dict:
    """One `{subset}.json` of `mt4ssl decode`, checked."""
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not a readable decode result: {e}") from None
    if not isinstance(result, dict) or not isinstance(result.get("decoders"), dict) or "subset" not in result:
        raise InputError(f"{path}: no 'subset' and 'decoders' (not written by `mt4ssl decode`)")
    for name, scores in result["decoders"].items():
        if not isinstance(scores, dict) or not isinstance(scores.get("wer"), (int, float)):
            raise InputError(f"{path}: decoder {name!r} has no numeric 'wer'")
    if "viterbi" not in result["decoders"]:
        raise InputError(f"{path}: no 'viterbi' result (every `mt4ssl decode` writes one)")
    return result


def decoding_label(name: str, scores: dict) -> str:
    """How a decoder's row is named: Viterbi, or the beam search's LM and settings."""
    if name == "viterbi":
        return "Viterbi (greedy), no LM"
    lm = scores.get("lm")
    settings = ", ".join(f"{k} {scores[k]:g}" for k in ("lm_weight", "word_score", "beam") if k in scores)
    if lm:
        return f"beam + LM `{Path(lm).name}` ({settings})"
    return f"beam, lexicon only, no LM (beam {scores.get('beam', '?')})"


def fine_tuning_of(ckpt: str | None) -> dict:
    """{"run": folder, "updates": n, "config": path} of the fine-tuning that wrote `ckpt`
    (its run folder's config.yaml), as far as it is there."""
    if not ckpt:
        return {}
    run = Path(ckpt).parent.parent  # RUN/checkpoints/checkpoint_*.pt
    info = {"run": str(run)}
    config = run / "config.yaml"
    if config.is_file():
        import yaml

        cfg = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
        info["config"] = str(config)
        info["updates"] = (cfg.get("run") or {}).get("max_updates")
        info["init"] = "random init" if (cfg.get("model") or {}).get("random_init") else (cfg.get("run") or {}).get("init_from")
    return info


def collect(runs: list[tuple[str, str, Path]]) -> list[dict]:
    """Rows (model, split, decoding) of the measured runs, in the order given."""
    rows: list[dict] = []
    seen: dict[tuple[str, str], Path] = {}
    for model, split, folder in runs:
        if (model, split) in seen:
            raise InputError(f"--run {model!r} {split!r}: given twice ({seen[model, split]} and {folder})")
        seen[model, split] = folder
        files = sorted(folder.glob("*.json")) if folder.is_dir() else []
        if not files:
            raise InputError(f"--run {model!r} {split!r} {folder}: no {{subset}}.json of `mt4ssl decode` there")
        by_decoding: dict[str, dict] = {}
        for path in files:
            result = read_decode(path)
            for name, scores in result["decoders"].items():
                label = decoding_label(name, scores)
                row = by_decoding.setdefault(label, {
                    "model": model, "split": split, "decoding": label, "source": "measured", "wer": {},
                    "cer": {}, "words": {}, "folder": str(folder), "commands": [],
                    "fine_tuning": fine_tuning_of(result.get("ckpt")), "ckpt": result.get("ckpt")})
                subset = result["subset"]
                if subset in row["wer"]:
                    raise InputError(f"{path}: subset {subset} decoded twice in {folder}")
                row["wer"][subset], row["cer"][subset] = float(scores["wer"]), scores.get("cer")
                row["words"][subset] = scores.get("words")
                if result.get("command") and result["command"] not in row["commands"]:
                    row["commands"].append(result["command"])
        rows += sorted(by_decoding.values(), key=lambda r: r["decoding"] != "Viterbi (greedy), no LM")
    return rows


def fmt(value) -> str:
    return "–" if value is None else f"{value:.1f}"


def render(rows: list[dict], title: str, note: str, command: str) -> tuple[str, str]:
    """(markdown, csv) of the measured rows and the published ones."""
    extra = sorted({s for r in rows for s in r["wer"]} - set(SUBSETS))
    subsets = list(SUBSETS) + extra
    head = ["model", "split", "decoding"] + [f"{s} WER %" for s in subsets] + ["CER %", "source"]
    lines = [f"# {title}", "", f"Command: `{command}`  ", f"Machine: {machine()}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * len(subsets) + "---|---|"]
    out = io.StringIO()
    table = csv.writer(out, lineterminator="\n")
    table.writerow(["model", "split", "decoding", "source"] + [f"{s}_wer" for s in subsets]
                   + [f"{s}_cer" for s in subsets] + ["fine_tuning_updates", "ckpt", "commands"])
    groups: dict[tuple[str, str], int] = {}  # (model, split) -> its note number
    for r in rows:
        n = groups.setdefault((r["model"], r["split"]), len(groups) + 1)
        cer = ", ".join(f"{s} {fmt(r['cer'][s])}" for s in subsets if r["cer"].get(s) is not None) or "–"
        lines.append(f"| {r['model']} | {r['split']} | {r['decoding']} | "
                     + " | ".join(fmt(r["wer"].get(s)) for s in subsets) + f" | {cer} | measured [{n}] |")
        table.writerow([r["model"], r["split"], r["decoding"], "measured"]
                       + [fmt(r["wer"].get(s)) if s in r["wer"] else "" for s in subsets]
                       + [fmt(r["cer"].get(s)) if r["cer"].get(s) is not None else "" for s in subsets]
                       + [r["fine_tuning"].get("updates", ""), r["ckpt"] or "", " ; ".join(r["commands"])])
    for p in PUBLISHED:
        lines.append(f"| {p['model']} | {p['split']} | {p['decoding']} | "
                     + " | ".join(fmt(p["wer"].get(s)) for s in subsets) + f" | – | published: {p['source']} |")
        table.writerow([p["model"], p["split"], p["decoding"], "published"]
                       + [fmt(p["wer"][s]) if s in p["wer"] else "" for s in subsets]
                       + [""] * len(subsets) + ["", "", ""])
    lines += ["", "WER and CER in % (lower is better); – : not decoded (or not published). " + PUBLISHED_NOTE]
    if note:
        lines += ["", note]
    if rows:
        lines += ["", "Measured rows: what made them", ""]
    for (model, split), n in groups.items():
        mine = [r for r in rows if (r["model"], r["split"]) == (model, split)]
        ft = mine[0]["fine_tuning"]
        made = [f"decode results `{mine[0]['folder']}`"]
        if ft.get("config"):
            made.append(f"fine-tuning `{ft['run']}` ({ft.get('updates')} updates from {ft.get('init')}; "
                        f"its config `{ft['config']}`)")
        words = ", ".join(f"{s} {w}" for s, w in mine[0]["words"].items() if w)
        commands = list(dict.fromkeys(c for r in mine for c in r["commands"]))
        lines.append(f"{n}. {model}, {split}: " + "; ".join(made)
                     + (f"; reference words: {words}" if words else "") + "; "
                     + ("; ".join(f"`{c}`" for c in commands) or "decode command not recorded"))
    return "\n".join(lines) + "\n", out.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", nargs=3, default=[], metavar=("MODEL", "SPLIT", "DIR"),
                   help="a row label, its fine-tuning split (\"10 min\", \"1 h\", ...) and the folder of "
                        "its `mt4ssl decode` results (repeat)")
    p.add_argument("--out", required=True, type=Path, help="markdown file (the CSV goes beside it)")
    p.add_argument("--title", default="LibriSpeech WER after CTC fine-tuning")
    p.add_argument("--note", default="", help="a paragraph under the table")
    p.add_argument("--command", help="the command to name as the table's maker (default: this one)")
    args = p.parse_args(argv)
    try:
        rows = collect([(m, s, Path(d)) for m, s, d in args.run])
    except InputError as e:
        print(f"wer_table: error: {e}", file=sys.stderr)
        return 2
    command = args.command or "python tools/wer_table.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    md, table = render(rows, args.title, args.note, command)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, md)
    atomic_write_text(args.out.with_suffix(".csv"), table)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
