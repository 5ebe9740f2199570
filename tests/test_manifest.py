from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mt4ssl.cli import main
from mt4ssl.data.manifest import letters, read_manifest
from mt4ssl.errors import InputError
from tests.conftest import LENGTHS


def run_manifest(root: Path, out: Path, *extra: str) -> int:
    return main(["manifest", str(root), "--out", str(out), *extra])


def test_round_trip(libri_tree, tmp_path):
    out = tmp_path / "manifests"
    assert run_manifest(libri_tree, out, "--splits", "train", "valid=dev") == 0
    for name, folder in [("train", "train"), ("valid", "dev")]:
        m = read_manifest(out / f"{name}.tsv")
        assert m.root == (libri_tree / folder).resolve()
        assert sorted(m.sizes) == sorted(LENGTHS[folder])
        texts = {}
        for trans in (libri_tree / folder).rglob("*.trans.txt"):
            for line in trans.read_text().splitlines():
                utt, text = line.split(" ", 1)
                texts[utt] = text
        wrd = (out / f"{name}.wrd").read_text().splitlines()
        ltr = (out / f"{name}.ltr").read_text().splitlines()
        assert len(wrd) == len(ltr) == len(m)
        for i, rel in enumerate(m.files):
            path = m.audio_path(i)
            assert sf.info(str(path)).frames == m.sizes[i]
            assert wrd[i] == texts[path.stem]
            assert ltr[i].replace(" ", "").replace("|", " ").strip() == wrd[i]
            assert len(m.read(i)) == m.sizes[i]


def test_letters_format():
    assert letters("HELLO  WORLD") == "H E L L O | W O R L D |"


def test_default_splits_are_folders(libri_tree, tmp_path):
    assert run_manifest(libri_tree, tmp_path / "m") == 0
    assert sorted(p.name for p in (tmp_path / "m").glob("*.tsv")) == ["dev.tsv", "train.tsv"]


def _spoil(root: Path, kind: str) -> Path:
    path = next((root / "train").rglob("*.flac"))
    if kind == "unreadable":
        path.write_bytes(b"this is not audio" * 10)
    elif kind == "empty":
        sf.write(path, np.zeros(0, dtype=np.float32), 16000, format="WAV")  # a valid header, 0 samples
    elif kind == "rate":
        sf.write(path, np.zeros(8000, dtype=np.float32), 8000)
    elif kind == "stereo":
        sf.write(path, np.zeros((16000, 2), dtype=np.float32), 16000)
    elif kind == "untranscribed":
        trans = next(path.parent.glob("*.trans.txt"))
        lines = [l for l in trans.read_text().splitlines() if not l.startswith(path.stem)]
        trans.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("kind,message", [
    ("unreadable", "unreadable audio"),
    ("empty", "empty audio"),
    ("rate", "sample rate 8000 Hz"),
    ("stereo", "2 channels"),
    ("untranscribed", "no transcript"),
])
def test_bad_audio_is_named(libri_tree, tmp_path, capsys, kind, message):
    bad = _spoil(libri_tree, kind)
    out = tmp_path / "m"
    assert run_manifest(libri_tree, out, "--splits", "train") == 2
    err = capsys.readouterr().err
    assert str(bad) in err and message in err and "Traceback" not in err
    assert not (out / "train.tsv").exists()


def test_skip_bad_logs_and_counts(libri_tree, tmp_path, capsys, caplog):
    bad = _spoil(libri_tree, "stereo")
    out = tmp_path / "m"
    assert run_manifest(libri_tree, out, "--splits", "train", "--skip-bad") == 0
    assert "skipped 1 bad file" in capsys.readouterr().out
    assert any(str(bad) in r.getMessage() for r in caplog.records)
    m = read_manifest(out / "train.tsv")
    assert len(m) == len(LENGTHS["train"]) - 1 and bad.name not in " ".join(m.files)


def test_failed_rewrite_keeps_previous_manifest(libri_tree, tmp_path):
    out = tmp_path / "m"
    assert run_manifest(libri_tree, out, "--splits", "train") == 0
    before = (out / "train.tsv").read_bytes()
    _spoil(libri_tree, "unreadable")
    assert run_manifest(libri_tree, out, "--splits", "train") == 2
    assert (out / "train.tsv").read_bytes() == before
    assert not list(out.glob(".*.tmp"))


@pytest.mark.parametrize("line,message", [
    ("a.flac", "expected 'relative/path<TAB>n_samples'"),
    ("a.flac\tabc", "is not an integer"),
    ("a.flac\t-5", "must be positive"),
])
def test_bad_manifest_line_names_file_and_line(tmp_path, line, message):
    tsv = tmp_path / "x.tsv"
    tsv.write_text(f"/root\nok.flac\t100\n{line}\n")
    with pytest.raises(InputError, match=rf"x\.tsv:3: .*{message}"):
        read_manifest(tsv)


def test_wrong_count_and_missing_file_name_the_manifest_line(libri_tree, tmp_path):
    out = tmp_path / "m"
    run_manifest(libri_tree, out, "--splits", "train")
    tsv = out / "train.tsv"
    lines = tsv.read_text().splitlines()
    rel, n = lines[2].split("\t")
    lines[2] = f"{rel}\t{int(n) + 1}"
    lines[3] = "100/10/nope.flac\t32000"
    tsv.write_text("\n".join(lines) + "\n")
    m = read_manifest(tsv)
    with pytest.raises(InputError, match=rf"train\.tsv:3 .*has {n} samples, the manifest says {int(n) + 1}"):
        m.read(1)
    with pytest.raises(InputError, match=r"train\.tsv:4 .*nope\.flac: audio file not found"):
        m.read(2)
