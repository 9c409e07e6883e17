"""Class vocabularies: one class per line (or comma-separated on the CLI), synonyms on a line.

Class-file syntax (SCLIP's): `background` / `person, people, man` — one class per line, its names
separated by commas; the class's score is the max over its names. On the command line,
`--classes "sky;tree,bush;road"` uses ';' between classes and ',' between synonyms when a ';' is
present, else ',' separates classes.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

from .errors import ClipfuseError

Vocabulary = List[List[str]]  # classes, each a non-empty list of names


def _clean(names: Sequence[str]) -> List[str]:
    return [" ".join(n.split()) for n in names if n.strip()]


def validate(vocab: Vocabulary, source: str = "vocabulary", allow_duplicates: Optional[bool] = False) -> Vocabulary:
    """Reject empty vocabularies and repeated names.

    `allow_duplicates` admits one name in two DIFFERENT classes, as SCLIP's published COCO-Object
    file does ('bed' is also a background synonym); the first class then wins the argmax tie,
    exactly as in SCLIP's code. A name twice within one class is always an error.
    """
    if not vocab:
        raise ClipfuseError(f"{source} is empty: give at least one class name")
    seen = {}
    for idx, names in enumerate(vocab):
        if not names:
            raise ClipfuseError(f"{source}: class {idx} has no name")
        for name in names:
            key = name.lower()
            if key in seen and (seen[key] == idx or not allow_duplicates):
                # only commands that have the flag (allow_duplicates not None) suggest it
                hint = "" if seen[key] == idx or allow_duplicates is None else " (--allow-duplicate-names accepts this)"
                raise ClipfuseError(f"{source}: duplicate name {name!r} (classes {seen[key]} and {idx}){hint}")
            seen.setdefault(key, idx)
    return vocab


def parse_classes(text: str, source: str = "--classes", allow_duplicates: Optional[bool] = False) -> Vocabulary:
    """Parse the CLI form: 'a,b,c' (three classes) or 'a;b1,b2;c' (b has a synonym).

    `allow_duplicates`: as in `validate` (the --allow-duplicate-names flag; None: the command has
    no such flag, so the message does not suggest it)."""
    if ";" in text:
        vocab = [_clean(part.split(",")) for part in text.split(";") if part.strip()]
    else:
        vocab = [[n] for n in _clean(text.split(","))]
    return validate(vocab, source, allow_duplicates)


def read_classes_file(path: "str | Path", allow_duplicates: bool = False) -> Vocabulary:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ClipfuseError(f"classes file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ClipfuseError(f"cannot read classes file {path}: {exc}") from None
    vocab = [_clean(line.split(",")) for line in text.splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    return validate(vocab, f"classes file {path}", allow_duplicates)


def flat_names(vocab: Vocabulary) -> List[str]:
    return [name for names in vocab for name in names]


def class_of_name(vocab: Vocabulary) -> List[int]:
    """For each flat name, the index of its class."""
    return [idx for idx, names in enumerate(vocab) for _ in names]
