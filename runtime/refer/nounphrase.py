"""The noun phrase of a referring expression (Global-Local CLIP's text rule).

Rule of the public code, on the lowercased sentence parsed by spaCy: NP = the noun chunk containing
the ROOT token, else the noun chunk containing ROOT's first child, else the whole sentence. The
sentence itself is re-joined from the parser's tokens with single spaces (the public code encodes
that string, e.g. "man 's hat").

spaCy is optional (`pip install clipfuse[refer]` then `python -m spacy download en_core_web_lg`,
the public code's model; a smaller model can parse differently and pick another noun phrase).
Without it a dependency-free heuristic takes the first noun chunk: leading determiners/adjectives/
nouns up to the first preposition, verb, relative pronoun, conjunction or punctuation. It agrees with the parser on the short, noun-first expressions of
RefCOCO-style data and is marked as "heuristic" in results.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

from ..errors import ClipfuseError

# Tried in order: the public code used the large model; any English pipeline with a parser works.
SPACY_MODELS = ("en_core_web_lg", "en_core_web_md", "en_core_web_sm", "en_core_web_trf")
SPACY_HINT = "pip install 'clipfuse[refer]' && python -m spacy download en_core_web_lg"
PARSERS = ("auto", "spacy", "heuristic")


@dataclass(frozen=True)
class Parse:
    """What the rule needs from a dependency parse (token indices are positions in `tokens`)."""

    tokens: Sequence[str]
    heads: Sequence[int]                   # head index per token; a root is its own head
    chunks: Sequence[Tuple[int, int]]      # noun chunks as [start, end) token spans

    def children(self, i: int) -> List[int]:
        return [j for j, h in enumerate(self.heads) if h == i and j != i]


@dataclass(frozen=True)
class NounPhrase:
    sentence: str      # the lowercased, re-tokenised sentence that gets encoded
    phrase: str        # the noun phrase that gets encoded
    parser: str        # "spacy:<model>" or "heuristic"


def normalize_sentence(sentence: str) -> str:
    text = " ".join(str(sentence).lower().split())
    if not text:
        raise ClipfuseError("the referring expression is empty; give a sentence such as "
                            "\"the cat on the left\"")
    return text


def phrase_from_parse(parse: Parse) -> str:
    """The public rule, on an already parsed sentence."""
    chunk_of = {}
    for start, end in parse.chunks:
        for i in range(start, end):
            chunk_of[i] = (start, end)
    roots = [i for i, h in enumerate(parse.heads) if h == i]
    if not roots:
        return " ".join(parse.tokens)
    head = roots[-1]          # the public loop keeps the last root it meets
    if head not in chunk_of:
        children = parse.children(head)
        if children and children[0] in chunk_of:
            head = children[0]
        else:
            return " ".join(parse.tokens)
    start, end = chunk_of[head]
    return " ".join(parse.tokens[start:end])


# ---------------------------------------------------------------------------------------------
# spaCy path


@functools.lru_cache(maxsize=1)
def _spacy_pipeline() -> Optional[Tuple[str, Callable]]:
    try:
        import spacy  # optional extra
    except ImportError:
        return None
    for name in SPACY_MODELS:
        try:
            return name, spacy.load(name)
        except OSError:
            continue
    return None


def spacy_available() -> bool:
    return _spacy_pipeline() is not None


def _spacy_parse(nlp: Callable, text: str) -> Parse:
    doc = nlp(text)
    return Parse(tokens=[t.text for t in doc], heads=[t.head.i for t in doc],
                 chunks=[(c.start, c.end) for c in doc.noun_chunks])


def _spacy_noun_phrase(text: str) -> NounPhrase:
    found = _spacy_pipeline()
    if found is None:
        raise ClipfuseError(f"spaCy with an English model is not installed; run: {SPACY_HINT} "
                            "(or use the built-in heuristic: parser 'auto'/'heuristic')")
    name, nlp = found
    joined = " ".join(t.text for t in nlp(text) if t.text.strip())
    return NounPhrase(sentence=joined, phrase=phrase_from_parse(_spacy_parse(nlp, joined)),
                      parser=f"spacy:{name}")


# ---------------------------------------------------------------------------------------------
# Dependency-free heuristic

_TOKEN_RE = re.compile(r"[a-z0-9]+(?:[-.][a-z0-9]+)*|'[a-z]+|[^\sa-z0-9]")

_DETERMINERS = frozenset(
    "a an the this that these those his her its their our my your some any each every no "
    "another other both all one two three four five six seven eight nine ten first second third "
    "last 's".split())
_ADJECTIVES = frozenset(
    "left right top bottom middle center centre front back far near closest nearest furthest "
    "farthest big bigger biggest small smaller smallest large larger largest little tall taller "
    "tallest short shorter long longer old older young younger new dark light bright full empty "
    "white black red blue green yellow orange pink purple brown gray grey silver gold tan beige "
    "striped spotted checkered plaid wooden metal glass plastic half whole entire partial "
    "upper lower leftmost rightmost topmost center-left center-right only same main single".split())
_POSITION_WORDS = frozenset(
    "left right top bottom middle center centre front back far closest nearest leftmost rightmost "
    "upper lower".split())
_BREAK_WORDS = frozenset(
    # prepositions
    "on in at of with near behind under above below beside besides next by from to between for "
    "into onto over across along around against among toward towards without inside outside "
    "beneath underneath up down off through via like than facing atop past within upon "
    # relative pronouns, conjunctions
    "who whom whose which that where when while whats and or but nor so because if "
    # auxiliaries and frequent verbs of referring expressions
    "is are was were be been being am has have had does do did can could will would should "
    "wears wear holds hold sits sit stands stand looks look looking has got".split())
_NOUN_ING = frozenset(
    "building ceiling painting clothing king ring thing string wing something nothing "
    "anything everything evening morning pudding icing frosting topping railing awning "
    "stuffing wedding bedding siding filling lighting ceiling sibling duckling dumpling "
    "sapling seedling stocking spring swing sling sing".split())
_NOUN_ED = frozenset("bed red shed sled seed weed reed speed steed tweed breed bread head".split())
_PUNCT = frozenset(",.;:!?()[]\"")


def tokenize_words(text: str) -> List[str]:
    return _TOKEN_RE.findall(text)


def _is_modifier(word: str) -> bool:
    return word in _DETERMINERS or word in _ADJECTIVES or word.isdigit()


def _is_verb_form(word: str) -> bool:
    if len(word) > 4 and word.endswith("ing") and word not in _NOUN_ING:
        return True
    return len(word) > 4 and word.endswith("ed") and word not in _NOUN_ED


def heuristic_noun_phrase_tokens(tokens: Sequence[str]) -> List[str]:
    """First noun chunk: skip leading break words, then take words until a break."""
    start = 0
    while start < len(tokens) and (tokens[start] in _PUNCT or
                                   (tokens[start] in _BREAK_WORDS and tokens[start] not in _DETERMINERS)):
        start += 1
    phrase: List[str] = []
    seen_noun = False
    for word in tokens[start:]:
        if word in ("and", "or") and not seen_noun and phrase and phrase[-1] in _ADJECTIVES:
            phrase.append(word)     # "black and white cat"
            continue
        if word in _PUNCT or (word in _BREAK_WORDS and (phrase or word not in _DETERMINERS)):
            break
        if seen_noun and (word in _POSITION_WORDS or _is_verb_form(word)):
            # "man far left", "woman holding ..." : the chunk ended at the noun
            break
        if _is_verb_form(word) and phrase and not _is_modifier(phrase[-1]):
            break
        phrase.append(word)
        if not _is_modifier(word) and not _is_verb_form(word):
            seen_noun = True
    return phrase


def _heuristic_noun_phrase(text: str) -> NounPhrase:
    tokens = tokenize_words(text)
    phrase = heuristic_noun_phrase_tokens(tokens)
    joined = " ".join(tokens) if tokens else text
    return NounPhrase(sentence=joined, phrase=" ".join(phrase) if phrase else joined, parser="heuristic")


def extract_noun_phrase(sentence: str, parser: str = "auto") -> NounPhrase:
    """Lowercase `sentence` and find its noun phrase with spaCy ("auto" when installed) or the
    heuristic. Raises ClipfuseError on an empty sentence or an unknown/unavailable parser."""
    if parser not in PARSERS:
        raise ClipfuseError(f"unknown noun-phrase parser {parser!r}; choose one of: {', '.join(PARSERS)}")
    text = normalize_sentence(sentence)
    if parser == "spacy" or (parser == "auto" and spacy_available()):
        return _spacy_noun_phrase(text)
    return _heuristic_noun_phrase(text)
