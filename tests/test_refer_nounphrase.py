"""Noun-phrase rule of Global-Local CLIP: the rule on hand-built parses, the heuristic fallback on
referring expressions, and the spaCy path where spaCy and an English model are installed."""
from __future__ import annotations

import pytest

from clipfuse.runtime.errors import ClipfuseError
from clipfuse.runtime.refer.nounphrase import (Parse, extract_noun_phrase, phrase_from_parse,
                                               spacy_available)

# (sentence, expected heuristic noun phrase); sentences in the style of RefCOCO/RefCOCO+/RefCOCOg.
HEURISTIC_CASES = [
    ("The cat lying on the scooter seat", "the cat"),
    ("man in red shirt on the left", "man"),
    ("Left guy", "left guy"),
    ("guy on left", "guy"),
    ("a woman holding an umbrella", "a woman"),
    ("person who is sitting", "person"),
    ("white car", "white car"),
    ("the man is wearing a hat", "the man"),
    ("far left person", "far left person"),
    ("man far left", "man"),
    ("the baseball player in white", "the baseball player"),
    ("the man's hat", "the man 's hat"),
    ("that dog near the tree", "that dog"),
    ("Black and white cat on a bed", "black and white cat"),
    ("zebra facing right", "zebra"),
    ("building behind the bus", "building"),
    ("the tallest giraffe", "the tallest giraffe"),
    ("person sitting down", "person"),
    ("striped shirt guy", "striped shirt guy"),
    ("woman wearing glasses", "woman"),
    ("bed", "bed"),
    ("blue umbrella top right", "blue umbrella"),
    ("two people", "two people"),
    ("kid with a ball", "kid"),
    ("ceiling light", "ceiling light"),
    ("the seated man", "the seated man"),
    ("the one on the right", "the one"),
    ("  A   BIG  elephant , eating grass ", "a big elephant"),
    ("on the left, a red bus", "the left"),
]


@pytest.mark.parametrize("sentence,expected", HEURISTIC_CASES)
def test_heuristic_noun_phrase(sentence, expected):
    result = extract_noun_phrase(sentence, parser="heuristic")
    assert result.phrase == expected
    assert result.parser == "heuristic"
    assert result.sentence == result.sentence.lower()


def test_heuristic_sentence_is_retokenised():
    result = extract_noun_phrase("The man's HAT, left.", parser="heuristic")
    assert result.sentence == "the man 's hat , left ."


# Hand-built parses (what spaCy gives for these sentences), to test the rule itself.
def _parse(tokens, heads, chunks):
    return Parse(tokens=tokens.split(), heads=heads, chunks=chunks)


def test_rule_root_inside_a_chunk():
    # "the cat lying on the seat": ROOT = cat (fragment); chunks "the cat", "the seat"
    p = _parse("the cat lying on the seat", [1, 1, 1, 2, 5, 3], [(0, 2), (4, 6)])
    assert phrase_from_parse(p) == "the cat"


def test_rule_root_verb_first_child_in_chunk():
    # "the man is wearing a hat": ROOT = wearing; children in order: man, is, hat -> first = man
    p = _parse("the man is wearing a hat", [1, 3, 3, 3, 5, 3], [(0, 2), (4, 6)])
    assert phrase_from_parse(p) == "the man"


def test_rule_first_child_not_in_chunk_gives_whole_sentence():
    # "standing on the left": ROOT = standing; first child "on" is not in a chunk
    p = _parse("standing on the left", [0, 0, 3, 1], [(2, 4)])
    assert phrase_from_parse(p) == "standing on the left"


def test_rule_root_without_children_gives_whole_sentence():
    p = _parse("left", [0], [])
    assert phrase_from_parse(p) == "left"


def test_rule_takes_last_root():
    # two sentences: the public loop keeps the last root it meets ("dog")
    p = _parse("a cat . a dog", [1, 1, 1, 4, 4], [(0, 2), (3, 5)])
    assert phrase_from_parse(p) == "a dog"


@pytest.mark.parametrize("bad", ["", "   ", "\n\t"])
def test_empty_sentence_is_an_error(bad):
    with pytest.raises(ClipfuseError, match="empty"):
        extract_noun_phrase(bad)


def test_unknown_parser_is_an_error():
    with pytest.raises(ClipfuseError, match="parser"):
        extract_noun_phrase("a dog", parser="nltk")


def test_spacy_missing_is_a_clear_error():
    if spacy_available():
        pytest.skip("spaCy with an English model is installed here")
    with pytest.raises(ClipfuseError, match="spacy download"):
        extract_noun_phrase("a dog", parser="spacy")
    assert extract_noun_phrase("a dog on a bed").parser == "heuristic"    # auto falls back


# Sentences whose spaCy noun phrase does not depend on the model size.
SPACY_CASES = [
    ("the cat lying on the scooter seat", "the cat"),
    ("a woman holding an umbrella", "a woman"),
    ("the man is wearing a hat", "the man"),
    ("white car", "white car"),
    ("the tallest giraffe", "the tallest giraffe"),
    ("the baseball player in white", "the baseball player"),
]


@pytest.mark.parametrize("sentence,expected", SPACY_CASES)
def test_spacy_noun_phrase(sentence, expected):
    if not spacy_available():
        pytest.skip("spaCy or its English model is not installed (pip install 'clipfuse[refer]' && "
                    "python -m spacy download en_core_web_lg); the model is not on PyPI")
    result = extract_noun_phrase(sentence, parser="spacy")
    assert result.parser.startswith("spacy:")
    assert result.phrase == expected


def test_spacy_adapter_with_a_fake_pipeline(monkeypatch):
    """The spaCy path end to end (parse, re-join, re-parse, rule) on a stand-in pipeline object
    that has spaCy's Doc/Token/Span surface, so the adapter is tested where spaCy is absent."""
    from types import SimpleNamespace

    from clipfuse.runtime.refer import nounphrase

    # "the man's hat is red": ROOT = is; first child = hat (nsubj), chunk "the man 's hat"
    heads = {"the": 1, "man": 3, "'s": 1, "hat": 4, "is": 4, "red": 4}
    seen = []

    def nlp(text):
        seen.append(text)
        words = text.replace("'s", " 's").split()
        toks = [SimpleNamespace(text=w, i=i) for i, w in enumerate(words)]
        for t in toks:
            t.head = toks[heads[t.text]]
        return SimpleNamespace(__iter__=None, toks=toks, noun_chunks=[SimpleNamespace(start=0, end=4)])

    class Doc:
        def __init__(self, text):
            self._d = nlp(text)
            self.noun_chunks = self._d.noun_chunks

        def __iter__(self):
            return iter(self._d.toks)

    monkeypatch.setattr(nounphrase, "_spacy_pipeline", lambda: ("fake_model", Doc))
    result = extract_noun_phrase("The man's hat is RED", parser="auto")
    assert result.parser == "spacy:fake_model"
    assert result.sentence == "the man 's hat is red"
    assert result.phrase == "the man 's hat"
    assert seen == ["the man's hat is red", "the man 's hat is red"]   # parsed, re-joined, re-parsed
