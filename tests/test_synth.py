"""The synthetic corpus: LibriSpeech layout, audio format, lexicon, determinism, errors."""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
from pathlib import Path

import pytest
import soundfile as sf

from mt4ssl.data import synth
from mt4ssl.data.text import CONSONANTS, PHONES, VOWELS, TextGenerator, all_words, load_lexicon
from mt4ssl.errors import InputError

pytestmark = pytest.mark.skipif(
    any(shutil.which(p) is None for p in synth.PROGRAMS),
    reason="needs espeak-ng, flite and sox (Debian packages of the same names)")

TINY = dict(hours=0.01, dev_hours=0.005, test_hours=0.005, speakers=6, workers=2)
UTT_ID = re.compile(r"^(\d+)-(\d+)-(\d{4})$")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "corpus"
    synth.synthesize(out, seed=0, **TINY)
    return out


def read_split(split_dir: Path) -> dict[str, str]:
    """utterance id -> transcript, checking the trans.txt files against the FLACs 1:1."""
    transcripts: dict[str, str] = {}
    for trans in sorted(split_dir.glob("*/*/*.trans.txt")):
        speaker, chapter = trans.parent.parent.name, trans.parent.name
        assert trans.name == f"{speaker}-{chapter}.trans.txt"
        ids = []
        for line in trans.read_text().splitlines():
            utt_id, text = line.split(" ", 1)
            assert UTT_ID.match(utt_id) and utt_id.startswith(f"{speaker}-{chapter}-")
            assert text == text.upper() and text.strip() == text and "  " not in text
            ids.append(utt_id)
            transcripts[utt_id] = text
        assert ids == sorted(ids)
        assert sorted(p.stem for p in trans.parent.glob("*.flac")) == ids
        assert sorted(p.name for p in trans.parent.iterdir()) == sorted(
            [trans.name] + [f"{u}.flac" for u in ids])  # no temporary files left
    return transcripts


def test_layout(corpus):
    assert sorted(p.name for p in corpus.iterdir()) == sorted(
        [*synth.SPLITS, "lexicon.txt", "alignments", synth.MARKER])
    assert sorted(p.name for p in (corpus / "alignments").iterdir()) == sorted(
        f"{split}.ctm" for split in synth.SPLITS)
    speakers = {str(v.speaker) for v in synth.VOICES[:TINY["speakers"]]}
    for split in synth.SPLITS:
        assert {p.name for p in (corpus / split).iterdir()} == speakers
        for flac in (corpus / split).glob("*/*/*.flac"):
            speaker, chapter = flac.parent.parent.name, flac.parent.name
            assert re.fullmatch(rf"{speaker}-{chapter}-\d{{4}}\.flac", flac.name)
        assert read_split(corpus / split)


def test_audio_is_16k_mono_flac_of_2_to_15_s(corpus):
    flacs = sorted(corpus.glob("*/*/*/*.flac"))
    assert flacs
    for flac in flacs:
        info = sf.info(str(flac))
        assert (info.format, info.subtype) == ("FLAC", "PCM_16")
        assert (info.samplerate, info.channels) == (16000, 1)
        assert 2.0 <= info.frames / 16000 <= 15.0, flac


def test_splits_disjoint_and_texts_vary(corpus):
    splits = {split: read_split(corpus / split) for split in synth.SPLITS}
    chapters = {split: {u.rsplit("-", 1)[0] for u in utts} for split, utts in splits.items()}
    train, dev, test = (set(splits[s]) for s in synth.SPLITS)
    assert not train & dev and not train & test and not dev & test
    train_ch, dev_ch, test_ch = (chapters[s] for s in synth.SPLITS)
    assert not train_ch & dev_ch and not train_ch & test_ch and not dev_ch & test_ch
    texts = [t for utts in splits.values() for t in utts.values()]
    assert len(set(texts)) == len(texts) > 10


def test_summary_matches_files(corpus):
    marker = json.loads((corpus / synth.MARKER).read_text())
    for split in synth.SPLITS:
        flacs = list((corpus / split).glob("*/*/*.flac"))
        seconds = sum(sf.info(str(f)).frames for f in flacs) / 16000
        assert marker["splits"][split]["utterances"] == len(flacs)
        assert marker["splits"][split]["seconds"] == pytest.approx(seconds, abs=0.01)
    # each speaker fills its share of the split's hours
    assert marker["splits"]["train-clean-100"]["seconds"] >= TINY["hours"] * 3600


def test_lexicon_covers_transcripts(corpus):
    lines = (corpus / "lexicon.txt").read_text().splitlines()
    lexicon = dict(line.split("\t") for line in lines)
    assert list(lexicon) == sorted(lexicon)
    for phones in lexicon.values():
        assert phones and set(phones.split(" ")) <= set(PHONES) - {"SIL", "SPN"}
    used = {w for split in synth.SPLITS for t in read_split(corpus / split).values()
            for w in t.split()}
    assert used == set(lexicon)


def test_same_seed_same_corpus_other_seed_other_text(corpus, tmp_path):
    synth.synthesize(tmp_path / "again", seed=0, **{**TINY, "workers": 1})
    synth.synthesize(tmp_path / "other", seed=1, **TINY)
    texts = sorted(p.relative_to(corpus) for p in corpus.glob("*/*/*/*.trans.txt"))
    ctms = sorted(p.relative_to(corpus) for p in corpus.glob("alignments/*.ctm"))
    for rel in texts + ctms + [Path("lexicon.txt")]:
        assert (tmp_path / "again" / rel).read_bytes() == (corpus / rel).read_bytes(), rel
    for flac in corpus.glob("*/*/*/*.flac"):
        again = tmp_path / "again" / flac.relative_to(corpus)
        assert sf.info(str(again)).frames == sf.info(str(flac)).frames
    other = [(tmp_path / "other" / rel).read_text() for rel in texts
             if (tmp_path / "other" / rel).exists()]
    assert other and other != [(corpus / rel).read_text() for rel in texts]


def read_ctm(path: Path) -> dict[str, list[tuple[float, float, str]]]:
    """utterance id -> [(start, end, phone)], checking the line format."""
    phones: dict[str, list] = {}
    for line in path.read_text().splitlines():
        utt_id, channel, start, duration, phone = line.split(" ")
        assert channel == "1"
        assert re.fullmatch(r"\d+\.\d{3}", start) and re.fullmatch(r"\d+\.\d{3}", duration)
        phones.setdefault(utt_id, []).append((float(start), float(start) + float(duration), phone))
    return phones


def test_alignments_tile_every_flite_utterance(corpus):
    flite = {str(v.speaker) for v in synth.VOICES if v.engine == "flite"}
    allowed = set(VOWELS + CONSONANTS + ("SIL",))
    marker = json.loads((corpus / synth.MARKER).read_text())
    for split in synth.SPLITS:
        alignments = read_ctm(corpus / "alignments" / f"{split}.ctm")
        utts = read_split(corpus / split)
        assert set(alignments) == {u for u in utts if u.split("-")[0] in flite} != set()
        assert list(alignments) == sorted(alignments)
        assert marker["splits"][split]["aligned"] == len(alignments)
        for utt_id, phones in alignments.items():
            speaker, chapter, _ = utt_id.split("-")
            seconds = sf.info(str(corpus / split / speaker / chapter / f"{utt_id}.flac")).duration
            assert phones[0][0] == 0 and phones[0][2] == phones[-1][2] == "SIL"
            assert all(a[1] == pytest.approx(b[0]) for a, b in zip(phones, phones[1:]))
            assert all(end > start for start, end, _ in phones)
            assert abs(phones[-1][1] - seconds) <= 0.001  # tiles the audio
            assert {p for _, _, p in phones} <= allowed and len(phones) > 10


def test_flite_phones_fold_cut_and_check():
    voice = synth.VOICES[2]
    # 1.0 s of audio: the final pause is cut at the end of the audio, a pause after it dropped
    assert synth.flite_phones("pau:0.200 dh:0.236 ax:0.270 axr:0.5 k:0.990 pau:1.100 pau:1.2\n",
                              16000, voice) == [
        (0, 200, "SIL"), (200, 236, "DH"), (236, 270, "AH"), (270, 500, "ER"), (500, 990, "K"),
        (990, 1000, "SIL")]
    with pytest.raises(RuntimeError, match="phone 'qq' of 'qq:0.300' is not in FLITE_PHONES"):
        synth.flite_phones("pau:0.200 qq:0.300 pau:1.000", 16000, voice)
    with pytest.raises(RuntimeError, match="'k:1.200' ends after the audio"):
        synth.flite_phones("pau:0.200 k:1.200 pau:1.300", 16000, voice)
    with pytest.raises(RuntimeError, match="phones end at 500 ms, the audio at 1000 ms"):
        synth.flite_phones("pau:0.200 k:0.500", 16000, voice)
    assert set(synth.FLITE_PHONES.values()) == set(VOWELS + CONSONANTS + ("SIL",))


def test_corpus_of_an_older_format_is_rewritten(tmp_path):
    out = tmp_path / "corpus"
    small = dict(hours=0.002, dev_hours=0.001, test_hours=0.001, speakers=3, workers=1)
    synth.synthesize(out, **small)
    marker = json.loads((out / synth.MARKER).read_text())
    del marker["settings"]["format"]  # as format 1 wrote it, without alignments
    (out / synth.MARKER).write_text(json.dumps(marker))
    shutil.rmtree(out / "alignments")
    synth.synthesize(out, **small)
    assert json.loads((out / synth.MARKER).read_text())["settings"]["format"] == synth.FORMAT
    assert read_ctm(out / "alignments" / "dev-clean.ctm")  # speaker 102 is flite


def test_voice_table():
    voices = synth.VOICES
    assert len(voices) >= 20
    assert len({v.speaker for v in voices}) == len(voices)
    settings = [(v.engine, v.name, v.pitch, v.rate, v.stretch, v.f0) for v in voices]
    assert len(set(settings)) == len(voices)
    assert {v.engine for v in voices} == {"espeak-ng", "flite"}
    assert {v.engine for v in voices[:3]} == {"espeak-ng", "flite"}  # small runs mix both


def test_phone_set():
    assert len(PHONES) == len(set(PHONES)) == 71
    assert PHONES[:2] == ("SIL", "SPN") and "AH0" in PHONES and "ZH" in PHONES


def test_load_lexicon_first_pronunciation():
    lexicon = load_lexicon(["hello", "the", "notaword"])
    assert lexicon == {"HELLO": ("HH", "AH0", "L", "OW1"), "THE": ("DH", "AH0")}


def test_sentences_deterministic_and_from_known_words():
    generator = TextGenerator()
    first = [generator.sentence(random.Random(7), n) for n in (5, 12, 25)]
    again = [generator.sentence(random.Random(7), n) for n in (5, 12, 25)]
    assert first == again
    rng = random.Random(1)
    sentences = [generator.sentence(rng, 10) for _ in range(50)]
    assert len({s.transcript for s in sentences}) == 50
    for s in sentences:
        assert len(s.words) >= 10 and set(s.words) <= set(generator.lexicon)
        assert s.text.endswith(".") and s.text[0].isupper()


def test_words_missing_from_lexicon_are_never_used():
    lexicon = load_lexicon(all_words())
    del lexicon["DOG"], lexicon["QUICKLY"]
    generator = TextGenerator(lexicon)
    assert "DOG" not in generator.vocabulary() and "CAT" in generator.vocabulary()
    rng = random.Random(0)
    words = {w for _ in range(300) for w in generator.sentence(rng, 15).words}
    assert not words & {"DOG", "QUICKLY"}


def test_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a corpus written by"):
        synth.synthesize(tmp_path, **TINY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(hours=0), r"--hours \(train-clean-100\) must be > 0"),
    (dict(dev_hours=-1), "--dev-hours"),
    (dict(speakers=len(synth.VOICES) + 1), "--speakers must be between"),
    (dict(speakers=0), "--speakers must be between"),
    (dict(workers=0), "--workers"),
    (dict(hours=100, speakers=1), "utterance numbers"),
])
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(InputError, match=message):
        synth.synthesize(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_missing_programs_are_named(tmp_path, monkeypatch):
    real_which = shutil.which
    monkeypatch.setattr(synth.shutil, "which", lambda p: None if p != "sox" else real_which(p))
    with pytest.raises(InputError, match=r"espeak-ng, flite.*apt-get install espeak-ng flite"):
        synth.synthesize(tmp_path / "out")


def test_cli_writes_and_rewrites_its_own_corpus(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    synth.add_args(parser)
    out = tmp_path / "corpus"
    args = parser.parse_args(["--out", str(out), "--hours", "0.002", "--dev-hours", "0.001",
                              "--test-hours", "0.001", "--speakers", "2", "--workers", "2"])
    assert synth.run(args) == 0
    printed = capsys.readouterr().out
    assert "train-clean-100" in printed and "utterances" in printed
    assert {p.name for p in (out / "dev-clean").iterdir()} == {"100", "101"}
    # a second run into the same folder replaces the corpus: no stale speaker is left over
    synth.synthesize(out, hours=0.002, dev_hours=0.001, test_hours=0.001, speakers=1)
    assert {p.name for p in (out / "dev-clean").iterdir()} == {"100"}
    assert json.loads((out / synth.MARKER).read_text())["settings"]["speakers"] == [100]
    assert not (out / synth.PARTIAL).exists()


def test_complete_corpus_with_same_settings_is_kept(corpus, tmp_path, monkeypatch):
    flac = next((corpus / "train-clean-100").rglob("*.flac"))
    before = flac.stat().st_mtime_ns
    summary = json.loads((corpus / synth.MARKER).read_text())["splits"]
    # nothing is spoken again: the engines are not even looked for
    monkeypatch.setattr(synth, "_check_programs", lambda: 1 / 0)
    assert synth.synthesize(corpus, seed=0, **TINY) == summary
    assert flac.stat().st_mtime_ns == before
