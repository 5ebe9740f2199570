"""The bad-input matrix of tools/bad_inputs.py (issue 10): every case through its real
`mt4ssl` command is a clear error naming the file, line or key (exit 2), a logged and counted
skip where --skip-bad asked for one, or a training stop with its message (exit 4); none is
silent, none a stack trace. Plus the edges of the new audio checks."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import soundfile as sf

from mt4ssl.data.audio import audio_info, read_audio
from mt4ssl.data.manifest import read_manifest
from mt4ssl.errors import InputError
from tools import bad_inputs


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    return bad_inputs.run_cases(bad_inputs.CASES, workdir=tmp_path_factory.mktemp("bad"), progress=False)


def test_enough_cases_and_each_stage_is_covered():
    assert len(bad_inputs.CASES) >= 40
    assert len({c.name for c in bad_inputs.CASES}) == len(bad_inputs.CASES)
    prefixes = {c.name.split("_")[0] for c in bad_inputs.CASES}
    assert {"audio", "tsv", "km", "cfg", "ckpt", "kmeans", "ltr", "train"} <= prefixes


@pytest.mark.parametrize("case", bad_inputs.CASES, ids=[c.name for c in bad_inputs.CASES])
def test_case_is_a_clear_error(outcomes, case):
    outcome = next(o for o in outcomes if o.case is case)
    assert outcome.ok, (outcome.kind, outcome.code, outcome.message)
    assert case.expect in outcome.message
    if outcome.kind == "error":
        assert outcome.code == 2 and outcome.message.startswith(f"mt4ssl {outcome.argv[0]}: error: ")
        assert "Traceback" not in outcome.message
    elif outcome.kind == "stopped":
        assert outcome.code == 4
    else:
        assert outcome.kind == "skipped" and "--skip-bad" in outcome.argv and "skipped 1 bad file" in outcome.message


def test_table_names_every_case_and_counts_none_silent(outcomes):
    text = bad_inputs.table(outcomes)
    assert "**Silent: 0**, stack traces: 0, messages not naming the file/line/key: 0" in text
    assert text.count("\n| ") == len(outcomes) + 1  # header + one row per case
    assert "/tmp/" not in text and "$D/" in text


# ---------------------------------------------------------------------------- audio edges


def test_streamed_wav_with_open_size_is_not_called_truncated(tmp_path):
    """Streaming writers (ffmpeg to a pipe) leave the data size 0xFFFFFFFF: not a truncation."""
    path = tmp_path / "s.wav"
    sf.write(path, np.zeros(16000, np.float32), 16000, subtype="PCM_16")
    raw = bytearray(path.read_bytes())
    at = raw.index(b"data") + 4
    raw[at:at + 4] = struct.pack("<I", 0xFFFFFFFF)
    path.write_bytes(bytes(raw))
    assert audio_info(path) == 16000 and len(read_audio(path)) == 16000


def test_float_audio_up_to_the_peak_limit_and_24_bit_are_read(tmp_path):
    x = np.linspace(-1.5, 1.5, 16000, dtype=np.float32)  # a little over full scale: resampling overshoot
    sf.write(tmp_path / "f.wav", x, 16000, subtype="FLOAT")
    np.testing.assert_array_equal(read_audio(tmp_path / "f.wav"), x)
    sf.write(tmp_path / "p24.flac", x / 2, 16000, subtype="PCM_24")
    np.testing.assert_allclose(read_audio(tmp_path / "p24.flac"), x / 2, atol=1e-6)
    sf.write(tmp_path / "big.wav", x * 2, 16000, subtype="FLOAT")
    with pytest.raises(InputError, match=r"big\.wav: float samples reach 3; expected full scale 1"):
        read_audio(tmp_path / "big.wav")


def test_manifest_paths_inside_the_root_are_fine(tmp_path):
    tsv = tmp_path / "x.tsv"
    tsv.write_text("/root\na/../b.flac\t100\nc/./d.flac\t200\n")  # '..' that stays inside: normalised, kept
    m = read_manifest(tsv)
    assert m.files == ("a/../b.flac", "c/./d.flac") and m.sizes == (100, 200)
    tsv.write_text("/root\na/../b.flac\t100\nb.flac\t100\n")  # the same file twice, spelled differently
    with pytest.raises(InputError, match=r"x\.tsv:3: b\.flac is listed twice \(first on line 2\)"):
        read_manifest(tsv)
