from __future__ import annotations

import pytest

from daemon.jobs.annotations import Annotation, parse_annotations

LOCATED_CASES: list[tuple[str, Annotation]] = [
    (
        "::error file=app.py,line=10::Missing semicolon",
        {
            "path": "app.py",
            "start_line": 10,
            "end_line": 10,
            "annotation_level": "failure",
            "message": "Missing semicolon",
        },
    ),
    (
        "::warning file=src/a.py,line=3,endLine=7,col=2,endColumn=4,title=Long::m",
        {
            "path": "src/a.py",
            "start_line": 3,
            "end_line": 7,
            "annotation_level": "warning",
            "message": "m",
            "title": "Long",
        },
    ),
    (
        "::notice file=./docs/x.md,line=2,col=5,endColumn=9::typo",
        {
            "path": "docs/x.md",
            "start_line": 2,
            "end_line": 2,
            "start_column": 5,
            "end_column": 9,
            "annotation_level": "notice",
            "message": "typo",
        },
    ),
    (
        # Escaped comma, colon, percent and line break in properties and data.
        "::error file=a%2Cb.py,line=1,title=T%3A 50%25::one%0Atwo%25 %3A",
        {
            "path": "a,b.py",
            "start_line": 1,
            "end_line": 1,
            "annotation_level": "failure",
            "message": "one\ntwo% %3A",
            "title": "T: 50%",
        },
    ),
    (
        # "%250A" is an escaped percent sign followed by "0A".
        "::error file=f.py,line=1::a%250Ab%0D",
        {
            "path": "f.py",
            "start_line": 1,
            "end_line": 1,
            "annotation_level": "failure",
            "message": "a%0Ab\r",
        },
    ),
    (
        # Command and property names are case-insensitive, indentation is ignored.
        "   ::ERROR FILE=f.py,LINE=4,EndLine=4,Col=1::upper",
        {
            "path": "f.py",
            "start_line": 4,
            "end_line": 4,
            "start_column": 1,
            "annotation_level": "failure",
            "message": "upper",
        },
    ),
    (
        # A file without a line starts at line 1.
        "::warning file=setup.cfg::deprecated key",
        {
            "path": "setup.cfg",
            "start_line": 1,
            "end_line": 1,
            "annotation_level": "warning",
            "message": "deprecated key",
        },
    ),
    (
        # Invalid numbers are dropped, and so is an endLine before line.
        "::error file=f.py,line=x,endLine=0,col=-3::bad numbers",
        {
            "path": "f.py",
            "start_line": 1,
            "end_line": 1,
            "annotation_level": "failure",
            "message": "bad numbers",
        },
    ),
    (
        "::error file=f.py,line=9,endLine=2::backwards",
        {
            "path": "f.py",
            "start_line": 9,
            "end_line": 9,
            "annotation_level": "failure",
            "message": "backwards",
        },
    ),
    (
        # A property without "=" and an empty one are ignored.
        "::error file=f.py,,oops,line=5::message with :: inside",
        {
            "path": "f.py",
            "start_line": 5,
            "end_line": 5,
            "annotation_level": "failure",
            "message": "message with :: inside",
        },
    ),
    (
        "::error file=a/./b//c.py,line=1::normalized",
        {
            "path": "a/b/c.py",
            "start_line": 1,
            "end_line": 1,
            "annotation_level": "failure",
            "message": "normalized",
        },
    ),
    (
        # Unicode digits are not line numbers.
        "::error file=f.py,line=\u00b2::superscript",
        {
            "path": "f.py",
            "start_line": 1,
            "end_line": 1,
            "annotation_level": "failure",
            "message": "superscript",
        },
    ),
]

IGNORED_LINES = [
    "plain output",
    "error file=f.py,line=1::no leading colons",
    "::error file=f.py,line=1 no separator",
    "::debug::not an annotation",
    "::set-output name=x::1",
    "::error file=f.py,line=1::",
    "::error file=f.py,line=1::   ",
    "::errors file=f.py::unknown command",
    "",
]

UNLOCATED_CASES: list[tuple[str, Annotation]] = [
    ("::error::no file", {"annotation_level": "failure", "message": "no file"}),
    (
        "::warning title=Heads up::no file either",
        {
            "annotation_level": "warning",
            "message": "no file either",
            "title": "Heads up",
        },
    ),
    (
        "::error file=/etc/passwd,line=1::abs",
        {"annotation_level": "failure", "message": "abs"},
    ),
    (
        "::error file=../up.py,line=1::up",
        {"annotation_level": "failure", "message": "up"},
    ),
    (
        "::error file=a/../../b,line=1::mid",
        {"annotation_level": "failure", "message": "mid"},
    ),
    ("::notice file=.,line=1::dot", {"annotation_level": "notice", "message": "dot"}),
]


@pytest.mark.parametrize(("line", "expected"), LOCATED_CASES)
def test_parse_located_line(line: str, expected: Annotation) -> None:
    parsed = parse_annotations(line)
    assert parsed.annotations == [expected]
    assert parsed.unlocated == []


@pytest.mark.parametrize("line", IGNORED_LINES)
def test_parse_ignores_line(line: str) -> None:
    parsed = parse_annotations(line)
    assert parsed.annotations == []
    assert parsed.unlocated == []


@pytest.mark.parametrize(("line", "expected"), UNLOCATED_CASES)
def test_parse_unlocated_line(line: str, expected: Annotation) -> None:
    parsed = parse_annotations(line)
    assert parsed.annotations == []
    assert parsed.unlocated == [expected]


def test_parse_strips_workspace_prefix() -> None:
    output = "::error file=/srv/ws/job-1/repo/src/m.py,line=2::inside"
    parsed = parse_annotations(output, workspace="/srv/ws/job-1/repo/")
    assert [a["path"] for a in parsed.annotations] == ["src/m.py"]


def test_parse_other_absolute_path_unlocated() -> None:
    output = "::error file=/srv/ws/job-2/repo/m.py,line=2::elsewhere"
    parsed = parse_annotations(output, workspace="/srv/ws/job-1/repo")
    assert parsed.annotations == []
    assert [a["message"] for a in parsed.unlocated] == ["elsewhere"]


def test_parse_many_lines_in_order() -> None:
    output = (
        "building\r\n"
        "::error file=a.py,line=1::first\r\n"
        "::warning::second\n"
        "::notice file=b.py,line=2::third\n"
    )
    parsed = parse_annotations(output)
    assert [a["message"] for a in parsed.annotations] == ["first", "third"]
    assert [a["message"] for a in parsed.unlocated] == ["second"]


def test_parse_caps_title_and_message() -> None:
    output = "::error file=a.py,line=1,title=" + "t" * 300 + "::" + "\u00e9" * 40000
    (annotation,) = parse_annotations(output).annotations
    assert annotation["title"] == "t" * 255
    assert isinstance(annotation["message"], str)
    assert len(annotation["message"].encode()) == 64 * 1024
