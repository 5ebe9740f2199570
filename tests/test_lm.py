"""`mt4ssl lm`: modified Kneser-Ney estimates by hand, ARPA validity through KenLM (the
KenLM that flashlight-text, the beam decoder's library, is built with), error messages."""

from __future__ import annotations

import gzip
import itertools
import math
import random

import pytest

from mt4ssl.cli import main
from mt4ssl.errors import InputError
from mt4ssl.finetune.lm import (EOS, FALLBACK_DISCOUNTS, SOS, UNK, arpa_unigrams, discounts,
                                estimate, explain_kenlm_error, lm_kind, read_sentences)

kenlm = pytest.importorskip("flashlight.lib.text.decoder.kenlm")
from flashlight.lib.text.dictionary import create_word_dict  # noqa: E402


def kenlm_model(path, words):
    """flashlight's KenLM over `words` (+ </s>, <unk>): (lm, word -> index)."""
    vocab = sorted(set(words) | {EOS, UNK})
    wd = create_word_dict({w: [[w]] for w in vocab})
    return kenlm.KenLM(str(path), wd), {w: wd.get_index(w) for w in vocab}


def kenlm_state(lm, index, context):
    """State after `context`; a leading <s> means the sentence start, else the null context."""
    state = lm.start(False) if context[:1] == [SOS] else lm.start(True)
    for w in context[1:] if context[:1] == [SOS] else context:
        state, _ = lm.score(state, index[w])
    return state


def test_bigram_by_hand():
    """<s> A B </s>, <s> A </s>: every count-of-counts is degenerate -> fallback discounts."""
    lm = estimate([["A", "B"], ["A"]], order=2)
    assert lm.discounts == (FALLBACK_DISCOUNTS, FALLBACK_DISCOUNTS)
    # continuation counts A 1 (<s>), B 1 (A), </s> 2 (A, B); total 4; gamma = 2/4; |V| = 4
    p = {w: 10 ** lm.score(w) for w in ("A", "B", EOS, UNK)}
    assert p == pytest.approx({"A": 0.25, "B": 0.25, EOS: 0.375, UNK: 0.125})
    assert 10 ** lm.score("A", [SOS]) == pytest.approx(0.5 + 0.5 * 0.25)
    assert 10 ** lm.score("B", ["A"]) == pytest.approx(0.25 + 0.5 * 0.25)
    assert 10 ** lm.score(EOS, ["A"]) == pytest.approx(0.25 + 0.5 * 0.375)
    assert 10 ** lm.score(EOS, ["B"]) == pytest.approx(0.5 + 0.5 * 0.375)
    assert 10 ** lm.score("A", ["A"]) == pytest.approx(0.5 * 0.25)  # backoff
    assert 10 ** lm.score("ZZZ", ["A"]) == pytest.approx(0.5 * 0.125)  # unknown = <unk>
    assert lm.backoff[0][("A",)] == pytest.approx(math.log10(0.5))


def test_discounts_from_count_of_counts():
    adjusted = {(str(i),): c for i, c in enumerate([1] * 10 + [2] * 4 + [3] * 3 + [4] * 2 + [7])}
    y = 10 / (10 + 2 * 4)
    assert discounts(adjusted, 1) == pytest.approx(
        (1 - 2 * y * 4 / 10, 2 - 3 * y * 3 / 4, 3 - 4 * y * 2 / 3))
    assert discounts({("a",): 1, ("b",): 2}, 1) == FALLBACK_DISCOUNTS  # no 3s and 4s


def corpus(n: int, seed: int = 0) -> list[list[str]]:
    """Sentences from a small random grammar: plenty of repeated n-grams, some singletons."""
    rng = random.Random(seed)
    subj, verb, obj = ["THE MAN", "A DOG", "SHE", "THE OLD CAT"], ["SAW", "HAD", "LIKED", "ATE"], \
        ["THE FISH", "A BONE", "IT", "HER", "THE RED BALL", "SOME MILK"]
    out = []
    for _ in range(n):
        s = f"{rng.choice(subj)} {rng.choice(verb)} {rng.choice(obj)}"
        if rng.random() < 0.3:
            s += f" AND {rng.choice(verb)} {rng.choice(obj)}"
        out.append(s.split())
    return out


@pytest.mark.parametrize("order", [3, 4])
def test_arpa_sums_to_one_and_kenlm_agrees(tmp_path, order):
    sentences = corpus(300)
    lm = estimate(sentences, order)
    assert lm.discounts[-1] != FALLBACK_DISCOUNTS  # enough text for real discounts
    path = tmp_path / "lm.arpa"
    lm.write_arpa(path)
    words = sorted({w for s in sentences for w in s})
    model, index = kenlm_model(path, words)
    predicted = words + [EOS, UNK]
    seen = {tuple(g[:-1]) for probs in lm.logprob[1:] for g in probs}
    contexts = [[SOS], [], ["NOWHERE"], [SOS, "NOWHERE"], ["SAW", "NOWHERE"]]
    contexts += [list(h) for h in sorted(seen)[:: max(1, len(seen) // 40)]]
    for context in contexts:
        state = kenlm_state(model, index, [w if w in index or w == SOS else UNK for w in context])
        kenlm_p = {w: model.score(state, index[w])[1] for w in predicted}
        assert sum(10 ** v for v in kenlm_p.values()) == pytest.approx(1.0, abs=2e-6), context
        ours = {w: lm.score(w, context) for w in predicted}
        assert ours == pytest.approx(kenlm_p, abs=1e-5), context
    # ours sums to one too, in every listed context
    for h in itertools.islice(sorted(seen), 0, None, 7):
        assert sum(10 ** lm.score(w, list(h)) for w in predicted) == pytest.approx(1.0, abs=1e-9)


def test_sentence_score_is_kenlms(tmp_path):
    lm = estimate(corpus(100), 3)
    lm.write_arpa(tmp_path / "lm.arpa.gz")  # gzip'd: KenLM reads it as it is
    with gzip.open(tmp_path / "lm.arpa.gz", "rt") as f:
        assert f.readline() == "\\data\\\n"
    model, index = kenlm_model(tmp_path / "lm.arpa.gz", lm.vocabulary)
    for sentence in (["THE", "MAN", "SAW", "IT"], ["SHE", "ATE", "A", "BONE", "AND"], ["ZZZ"]):
        state, total = model.start(False), 0.0
        for w in sentence:
            state, s = model.score(state, index.get(w, index[UNK]))
            total += s
        total += model.finish(state)[1]
        assert lm.sentence_score(sentence) == pytest.approx(total, abs=1e-5)


def test_orders_and_reserved_words():
    lm = estimate([["A", "A", "B"]], order=2)
    assert sum(10 ** lm.score(w) for w in ("A", "B", EOS, UNK)) == pytest.approx(1.0)
    assert set(lm.vocabulary) == {EOS, "A", "B", UNK}
    with pytest.raises(InputError, match="reserved word '<s>'"):
        estimate([["A", SOS]], 2)
    with pytest.raises(InputError, match="no words"):
        estimate([], 2)
    with pytest.raises(InputError, match="--order 1: must be at least 2"):
        estimate([["A"]], 1)


def test_lm_command_and_arpa_reading(tmp_path, capsys):
    text = tmp_path / "train.wrd"
    text.write_text("\n".join(" ".join(s) for s in corpus(50)) + "\n\n")
    out = tmp_path / "lm" / "3gram.arpa"
    assert main(["lm", str(text), "--out", str(out), "--order", "3"]) == 0
    assert "order 3" in capsys.readouterr().out
    assert lm_kind(out) == "arpa"
    words = arpa_unigrams(out)
    assert {SOS, EOS, UNK, "MAN", "BONE"} <= set(words)
    assert len(read_sentences([text])) == 50
    assert main(["lm", str(tmp_path / "missing.wrd"), "--out", str(out)]) == 2
    assert "missing.wrd: transcript file not found" in capsys.readouterr().err


def test_bad_lm_files_name_file_and_line(tmp_path):
    with pytest.raises(InputError, match="nope.arpa: language model file not found"):
        lm_kind(tmp_path / "nope.arpa")
    (tmp_path / "notes.txt").write_text("\n\nhello world\n")
    with pytest.raises(InputError, match=r"notes.txt:3: not an ARPA language model"):
        lm_kind(tmp_path / "notes.txt")
    (tmp_path / "empty.arpa").write_text("")
    with pytest.raises(InputError, match="empty file"):
        lm_kind(tmp_path / "empty.arpa")
    (tmp_path / "broken.arpa.gz").write_bytes(gzip.compress(b"\\data\\\n" * 100)[:30])
    with pytest.raises(InputError, match="broken.arpa.gz"):
        arpa_unigrams(tmp_path / "broken.arpa.gz")

    lm = estimate(corpus(30), 2)
    good = lm.arpa_text().splitlines()
    lineno = good.index("\\2-grams:") + 3  # 1-based: the second 2-gram
    bad = good.copy()
    bad[lineno - 1] = "x.y\t" + bad[lineno - 1].split("\t", 1)[1]
    path = tmp_path / "bad.arpa"
    path.write_text("\n".join(bad) + "\n")
    assert lm_kind(path) == "arpa"  # the header is fine: KenLM finds the error
    with pytest.raises(RuntimeError) as e:
        kenlm_model(path, lm.vocabulary)
    assert explain_kenlm_error(path, str(e.value)).startswith(f"{path}:{lineno}: ")
    assert '"x.y"' in explain_kenlm_error(path, str(e.value))
