"""Decoding on hand-built CTC emissions: Viterbi, lexicon-constrained beam search, a tiny LM
that fixes a misspelling greedy decoding keeps; lexicon formats; WER/CER against an
independent edit distance; the errors a user can get."""

from __future__ import annotations

import gzip
import math

import pytest
import torch

pytest.importorskip("torchaudio.models.decoder")
pytest.importorskip("flashlight.lib.text.decoder")
pytest.importorskip("jiwer")

from mt4ssl.errors import InputError  # noqa: E402
from mt4ssl.finetune.ctc import Dictionary, error_rate  # noqa: E402
from mt4ssl.finetune.decode import (BeamConfig, BeamDecoder, Lexicon, build_lexicon,  # noqa: E402
                                    check_lm_vocabulary, check_oov, lm_lexicon, read_lexicon,
                                    read_references, score, tokens_to_words, viterbi)
from mt4ssl.finetune.lm import estimate  # noqa: E402

D = Dictionary.from_symbols(list("|ACEHKLOSTW"))


def emissions(frames, floor: float = 1e-3) -> torch.Tensor:
    """(1, T, V) log-probs; a frame is a token ('-' = blank) or {token: probability}."""
    rows = []
    for frame in frames:
        p = torch.full((len(D),), floor)
        for token, q in ({frame: 1.0} if isinstance(frame, str) else frame).items():
            p[0 if token == "-" else D.symbols.index(token)] = q
        rows.append((p / p.sum()).log())
    return torch.stack(rows)[None]


def spoken(*tokens) -> list:
    """Each token for one frame, then a blank frame."""
    return [f for t in tokens for f in (t, "-")]


def lexicon(*words) -> Lexicon:
    return build_lexicon([(f"test:{i}", w) for i, w in enumerate(words, 1)], D, "test")


# "THE KAT SAT": the acoustics lean to K (0.55) over C (0.40) in the second word
THE_KAT_SAT = spoken("T", "H", "E", "|", {"K": 0.55, "C": 0.40}, "A", "T", "|", "S", "A", "T", "|")


def test_viterbi_best_path_repeats_and_blanks():
    # H E L - L L O | with a repeated frame and blank-split double letter; padding frames
    frames = ["H", "H", "E", "L", "-", "L", "L", "O", "|", "-", "W", "O", "-", "W", "|"]
    x = emissions(frames + ["A"] * 3)
    assert viterbi(x, [len(frames)], D) == [["HELLO", "WOW"]]
    assert viterbi(x, None, D) == [["HELLO", "WOW", "A"]]  # the padding read as frames
    assert tokens_to_words(["|", "H", "I", "|", "|", "T", "O"]) == ["HI", "TO"]


def test_lexicon_beam_spells_only_lexicon_words():
    x = emissions(spoken("C", {"O": 0.5, "A": 0.45}, "T", "|"))
    assert viterbi(x, None, D) == [["COT"]]  # not a word
    decoder = BeamDecoder(D, lexicon("CAT", "HAT"), None, BeamConfig(beam=20, word_score=0))
    assert decoder(x) == [["CAT"]]  # the best path through the lexicon


def test_lm_fixes_a_misspelling_that_greedy_keeps(tmp_path):
    x = emissions(THE_KAT_SAT)
    assert viterbi(x, None, D) == [["THE", "KAT", "SAT"]]
    words = lexicon("THE", "CAT", "KAT", "SAT", "HAT")
    cfg = BeamConfig(beam=50, word_score=0.0)
    assert BeamDecoder(D, words, None, cfg)(x) == [["THE", "KAT", "SAT"]]  # both are words
    lm = tmp_path / "lm.arpa"
    estimate([s.split() for s in ["THE CAT SAT", "THE CAT SAT", "THE HAT SAT", "A KAT"]],
             order=2).write_arpa(lm)
    assert BeamDecoder(D, words, lm, cfg)(x) == [["THE", "CAT", "SAT"]]
    # with the LM weighted 0 the acoustics decide again
    off = BeamConfig(beam=50, word_score=0.0, lm_weight=0.0)
    assert BeamDecoder(D, words, lm, off)(x) == [["THE", "KAT", "SAT"]]


def test_beam_batch_with_lengths(tmp_path):
    a = emissions(spoken("C", "A", "T", "|"))[0]
    b = emissions(spoken("H", "A", "T", "|", "-", "C", "A", "T"))[0]
    x = torch.stack([torch.cat([a, b[len(a):]]), b])  # row 0: b's frames as padding
    decoder = BeamDecoder(D, lexicon("CAT", "HAT"), None, BeamConfig(beam=20, word_score=0))
    assert decoder(x, [len(a), len(b)]) == [["CAT"], ["HAT", "CAT"]]
    assert decoder(x.double(), torch.tensor([len(a), len(b)])) == [["CAT"], ["HAT", "CAT"]]


def test_lexicon_formats_as_distributed(tmp_path):
    """fairseq/flashlight, LibriSpeech's pronunciations, a vocabulary, torchaudio's lowercase
    letters, gzip'd: all the same words, spelled with the model's letters."""
    files = {
        "fairseq.lex": "CAT C A T |\nTHE T H E |\nLOST L O S T |\n",
        "librispeech-lexicon.txt": "CAT\tK AE1 T\nTHE\tDH AH0\nTHE\tDH IY1\nLOST\tL AO1 S T\n",
        "vocab.txt": "CAT\nTHE\n\nLOST\n",
        "lower.txt": "cat c a t |\nthe t h e |\nlost l o s t |\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "lexicon.txt.gz").write_bytes(gzip.compress(files["vocab.txt"].encode()))
    expected = {"CAT": ("C", "A", "T", "|"), "THE": ("T", "H", "E", "|"),
                "LOST": ("L", "O", "S", "T", "|")}
    for name in [*files, "lexicon.txt.gz"]:
        assert read_lexicon(tmp_path / name, D).spellings == expected, name


def test_unspellable_words_are_left_out(tmp_path, caplog):
    (tmp_path / "lex.txt").write_text("CAT\tK AE1 T\nDOG'S\tD AO1 G Z\n<UNK>\tSPN\n!SIL\tSIL\n")
    lex = read_lexicon(tmp_path / "lex.txt", D)
    assert set(lex.spellings) == {"CAT"}
    assert "2 word(s) have characters the model cannot emit" in caplog.text  # <UNK>: silently
    assert "lex.txt:2 \"DOG'S\"" in caplog.text
    (tmp_path / "none.txt").write_text("DOG\n")
    with pytest.raises(InputError, match="none.txt: no word can be spelled"):
        read_lexicon(tmp_path / "none.txt", D)
    with pytest.raises(InputError, match="missing.txt: lexicon file not found"):
        read_lexicon(tmp_path / "missing.txt", D)


def test_lexicon_from_the_lm_and_vocabulary_check(tmp_path):
    lm = tmp_path / "lm.arpa"
    estimate([["THE", "CAT"], ["THE", "HAT", "LOST"]], 2).write_arpa(lm)
    assert set(lm_lexicon(lm, D).spellings) == {"THE", "CAT", "HAT", "LOST"}
    check_lm_vocabulary(lexicon("THE", "CAT", "TOAST"), lm)  # some known: fine
    lower = tmp_path / "lower.arpa"
    estimate([["the", "cat"]], 2).write_arpa(lower)
    with pytest.raises(InputError, match="none of the 2 lexicon words .* is in the LM"):
        check_lm_vocabulary(lexicon("THE", "CAT"), lower)


def test_missing_lexicon_word_names_the_transcript_line():
    refs = ["THE CAT", "THE HAT SAT", "THE CAT"]
    with pytest.raises(InputError, match=r"dev\.wrd:2: the word 'HAT' is not in the lexicon test "
                                         r"\(1 more missing"):
        check_oov(refs, lexicon("THE", "CAT"), "dev.wrd", allow=False)
    assert check_oov(refs, lexicon("THE", "CAT"), "dev.wrd", allow=True) == 2
    assert check_oov(refs, lexicon("THE", "CAT", "HAT", "SAT"), "dev.wrd", allow=False) == 0


def test_bad_lm_files_and_dictionaries(tmp_path):
    words = lexicon("CAT")
    with pytest.raises(InputError, match="nope.arpa: language model file not found"):
        BeamDecoder(D, words, tmp_path / "nope.arpa")
    lm = tmp_path / "lm.arpa"
    text = estimate([["CAT", "CAT"], ["CAT"]], 2).arpa_text().splitlines()
    bad_line = text.index("\\2-grams:") + 2
    text[bad_line - 1] = "minus-one" + text[bad_line - 1][text[bad_line - 1].index("\t"):]
    lm.write_text("\n".join(text) + "\n")
    with pytest.raises(InputError, match=rf"lm.arpa:{bad_line}: Could not parse \"minus-one\""):
        BeamDecoder(D, words, lm)
    phones = Dictionary.from_symbols(["AA", "B", "C"])
    with pytest.raises(InputError, match="no word boundary '\\|'"):
        BeamDecoder(phones, words)


def test_beam_config_checks():
    with pytest.raises(InputError, match="beam 0"):
        BeamConfig(beam=0)
    with pytest.raises(InputError, match="beam_threshold"):
        BeamConfig(beam_threshold=0.0)


def test_wer_cer_against_an_independent_edit_distance():
    from torchaudio.functional import edit_distance

    refs = ["THE CAT SAT ON THE MAT", "A DOG", "HELLO WORLD", "NO ERRORS HERE"]
    hyps = ["THE CAT SAT IN THE THE MAT", "", "HELO WORLD", "NO ERRORS HERE"]
    s = score(refs, hyps)
    word_errors = sum(edit_distance(r.split(), h.split()) for r, h in zip(refs, hyps))
    words = sum(len(r.split()) for r in refs)
    assert s["wer"] == pytest.approx(100 * word_errors / words)
    assert s["wer"] == pytest.approx(100 * error_rate([r.split() for r in refs],
                                                      [h.split() for h in hyps]))
    char_errors = sum(edit_distance(list(r), list(h)) for r, h in zip(refs, hyps))
    assert s["cer"] == pytest.approx(100 * char_errors / sum(map(len, refs)))
    assert s["substitutions"] + s["deletions"] + s["insertions"] == word_errors
    assert (s["words"], s["utterances"], s["sentence_errors"]) == (words, 4, 3)
    assert s["deletions"] == 2 and s["insertions"] == 1 and s["substitutions"] == 2


def test_references_from_wrd_or_ltr(tmp_path):
    (tmp_path / "a.wrd").write_text("THE  CAT\nSAT\n")
    assert read_references(tmp_path, "a", 2) == ["THE CAT", "SAT"]
    (tmp_path / "b.ltr").write_text("T H E | C A T |\nS A T |\n")
    assert read_references(tmp_path, "b", 2) == ["THE CAT", "SAT"]
    with pytest.raises(InputError, match="a.wrd: 2 lines, but the manifest has 3"):
        read_references(tmp_path, "a", 3)
    with pytest.raises(InputError, match="c.wrd: transcripts not found"):
        read_references(tmp_path, "c", 1)


def test_word_score_and_lm_weight_change_the_search(tmp_path):
    """A '|' inside CATSAT's frames that is weak: a big word score makes two words of it."""
    frames = spoken("C", "A", "T") + [{"|": 0.3, "-": 0.7}] + spoken("S", "A", "T", "|")
    x = emissions(frames)
    words = lexicon("CAT", "SAT", "CATSAT")
    assert BeamDecoder(D, words, None, BeamConfig(beam=50, word_score=0.0))(x) == [["CATSAT"]]
    assert BeamDecoder(D, words, None, BeamConfig(beam=50, word_score=5.0))(x) == [["CAT", "SAT"]]
    assert BeamDecoder(D, words, None, BeamConfig(beam=50, word_score=-5.0))(x) == [["CATSAT"]]
    assert math.isfinite(BeamConfig().lm_weight)


# ---------------------------------------------------------------------- `mt4ssl decode`

@pytest.fixture(scope="module")
def decode_data(tmp_path_factory):
    """Manifests of a small generated LibriSpeech tree, a random-weight CTC checkpoint over its
    letters, one whose head always says blank, a lexicon and an LM of the training text."""
    from mt4ssl.data.manifest import write_split
    from mt4ssl.finetune.model import CTCModel, save_ctc_model
    from conftest import small_model_config, write_tree

    root = tmp_path_factory.mktemp("decode")
    tree = write_tree(root / "libri")
    manifests = root / "manifests"
    for split in ("train", "dev"):
        write_split(tree / split, manifests, split)
    letters = sorted({c for line in (manifests / "train.ltr").read_text().split() for c in line} - {"|"})
    dictionary = Dictionary.from_symbols(["|", *letters])
    torch.manual_seed(0)
    model = CTCModel(small_model_config(), len(dictionary))
    save_ctc_model(root / "ctc.pt", model, dictionary)
    with torch.no_grad():
        model.proj.weight.zero_()
        model.proj.bias.zero_()
        model.proj.bias[0] = 10.0  # blank everywhere
    save_ctc_model(root / "blank.pt", model, dictionary)
    words = sorted({w for f in ("train.wrd", "dev.wrd") for w in (manifests / f).read_text().split()})
    (root / "lexicon.txt").write_text("".join(f"{w}\t{' '.join(w)} |\n" for w in words))
    estimate([line.split() for line in (manifests / "train.wrd").read_text().splitlines()],
             2).write_arpa(root / "lm.arpa.gz")
    return root, manifests, words


def decode_cmd(root, manifests, out, *extra, ckpt="ctc.pt"):
    return ["decode", "--ckpt", str(root / ckpt), "--manifest-dir", str(manifests),
            "--subsets", "dev,train", "--out", str(out), *extra]


def test_decode_command_end_to_end(decode_data, tmp_path, capsys):
    import json

    from mt4ssl.cli import main

    root, manifests, words = decode_data
    out = tmp_path / "out"
    assert main(decode_cmd(root, manifests, out, "--lm", str(root / "lm.arpa.gz"), "--lexicon",
                           str(root / "lexicon.txt"), "--beam", "8", "--lm-weight", "1.5",
                           "--max-tokens", "100000")) == 0
    printed = capsys.readouterr().out
    assert "viterbi WER" in printed and "beam WER" in printed
    for subset in ("dev", "train"):
        refs = read_references(manifests, subset, len((manifests / f"{subset}.wrd").read_text().splitlines()))
        result = json.loads((out / f"{subset}.json").read_text())
        assert set(result["decoders"]) == {"viterbi", "beam"}
        beam = result["decoders"]["beam"]
        assert (beam["beam"], beam["lm_weight"], beam["word_score"]) == (8, 1.5, -1.0)
        assert beam["lm"].endswith("lm.arpa.gz") and beam["oov_words"] == 0
        for name, scores in result["decoders"].items():
            hyps = (out / f"{subset}.{name}.wrd").read_text().splitlines()
            assert len(hyps) == len(refs)
            assert scores["wer"] == pytest.approx(score(refs, hyps)["wer"])
            assert scores["utterances"] == len(refs)
        beam_words = {w for h in (out / f"{subset}.beam.wrd").read_text().split("\n") for w in h.split()}
        assert beam_words <= set(words)  # the lexicon constrains the search


def test_decode_blank_model_deletes_every_word(decode_data, tmp_path):
    import json

    from mt4ssl.cli import main

    root, manifests, _ = decode_data
    out = tmp_path / "out"
    assert main(decode_cmd(root, manifests, out, ckpt="blank.pt")) == 0  # Viterbi only
    result = json.loads((out / "dev.json").read_text())
    assert set(result["decoders"]) == {"viterbi"}
    v = result["decoders"]["viterbi"]
    assert (v["wer"], v["deletions"], v["insertions"]) == (100.0, v["words"], 0)
    assert (out / "dev.viterbi.wrd").read_text() == "\n" * v["utterances"]


def test_decode_errors_name_what_is_wrong(decode_data, tiny_ckpt, tmp_path, capsys):
    from mt4ssl.cli import main

    root, manifests, words = decode_data
    out = tmp_path / "out"
    # a pretraining checkpoint
    assert main(["decode", "--ckpt", str(tiny_ckpt), "--manifest-dir", str(manifests),
                 "--subsets", "dev", "--out", str(out)]) == 2
    assert "has no CTC head" in capsys.readouterr().err
    # a reference word the lexicon lacks
    short = tmp_path / "short.txt"
    short.write_text("".join(f"{w}\n" for w in words[1:]))
    assert main(decode_cmd(root, manifests, out, "--lexicon", str(short))) == 2
    err = capsys.readouterr().err
    assert "dev.wrd:" in err and f"the word {words[0]!r} is not in the lexicon" in err
    assert main(decode_cmd(root, manifests, out, "--lexicon", str(short), "--allow-oov",
                           "--beam", "4")) == 0
    capsys.readouterr()
    # a malformed LM
    bad = tmp_path / "bad.arpa"
    bad.write_text("\\data\\\nngram 1=2\nngram 2=1\n\n\\1-grams:\n-1.0\tHELLO\t-0.5\n"
                   "nan-ish\tWORLD\n\n\\2-grams:\n-0.1\tHELLO WORLD\n\n\\end\\\n")
    assert main(decode_cmd(root, manifests, out, "--lm", str(bad), "--lexicon",
                           str(root / "lexicon.txt"), "--beam", "4")) == 2
    assert f'{bad}:7: Could not parse "nan-ish"' in capsys.readouterr().err
    assert main(decode_cmd(root, manifests, out, "--lm", str(tmp_path / "none.arpa"))) == 2
    assert "none.arpa: language model file not found" in capsys.readouterr().err


def test_beam_config_from_yaml_and_flags(tmp_path):
    import argparse
    from pathlib import Path

    from mt4ssl.finetune.decode import add_args, beam_config

    p = argparse.ArgumentParser()
    add_args(p)
    base = ["--ckpt", "c.pt", "--manifest-dir", ".", "--subsets", "dev", "--out", "o"]
    recipe = Path(__file__).resolve().parent.parent / "recipes/librispeech/decode_4gram.yaml"
    cfg = beam_config(p.parse_args(base + ["--config", str(recipe)]))
    assert (cfg.lm_weight, cfg.word_score, cfg.beam, cfg.sil_score) == (2.0, -1.0, 1500, 0.0)
    cfg = beam_config(p.parse_args(base + ["--config", str(recipe), "--beam", "50", "--log-add"]))
    assert (cfg.beam, cfg.log_add, cfg.lm_weight) == (50, True, 2.0)
    assert beam_config(p.parse_args(base)) == BeamConfig()
    (tmp_path / "bad.yaml").write_text("lm_wieght: 1.0\n")
    with pytest.raises(InputError, match="lm_wieght"):
        beam_config(p.parse_args(base + ["--config", str(tmp_path / "bad.yaml")]))
