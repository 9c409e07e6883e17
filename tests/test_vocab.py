"""Class vocabularies: CLI and file syntax, synonyms, duplicates."""
from __future__ import annotations

import pytest

from clipfuse.runtime.errors import ClipfuseError
from clipfuse.runtime.vocab import class_of_name, flat_names, parse_classes, read_classes_file


def test_cli_forms():
    assert parse_classes("sky, tree ,road") == [["sky"], ["tree"], ["road"]]
    assert parse_classes("background;person, people;car") == [["background"], ["person", "people"], ["car"]]
    assert parse_classes("traffic  light,stop sign") == [["traffic light"], ["stop sign"]]


def test_file_form_with_comments_and_synonyms(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("# my classes\nbackground, sky\n\nperson, people\ncar\n", encoding="utf-8")
    vocab = read_classes_file(path)
    assert vocab == [["background", "sky"], ["person", "people"], ["car"]]
    assert flat_names(vocab) == ["background", "sky", "person", "people", "car"]
    assert class_of_name(vocab) == [0, 0, 1, 1, 2]


@pytest.mark.parametrize("text,message", [
    ("", "is empty"), (";;", "is empty"), ("a,b,A", "duplicate name 'A'"), ("a;b,a", "duplicate name 'a'"),
])
def test_bad_cli_vocabularies(text, message):
    with pytest.raises(ClipfuseError, match=message):
        parse_classes(text)


def test_cross_class_duplicates_need_the_flag(tmp_path):
    path = tmp_path / "coco.txt"
    path.write_text("background, bed, wall\nperson\nbed\n", encoding="utf-8")
    with pytest.raises(ClipfuseError, match="--allow-duplicate-names"):
        read_classes_file(path)
    assert read_classes_file(path, allow_duplicates=True)[2] == ["bed"]
    path.write_text("person, person\n", encoding="utf-8")
    with pytest.raises(ClipfuseError, match="duplicate name 'person'"):
        read_classes_file(path, allow_duplicates=True)
