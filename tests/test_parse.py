"""reconciler.parse: safe YAML/JSON parsing into documents with line numbers."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.parse import MAX_DEPTH, MAX_NODES, ParseError, decode, parse_documents


def parse_error(text: str) -> ParseError:
    with pytest.raises(ParseError) as info:
        parse_documents(text)
    return info.value


# --- documents -------------------------------------------------------------------------------------


def test_multi_document_yaml_gives_one_document_per_part_with_its_start_line() -> None:
    text = "a: 1\n---\n# comment\nb: 2\n---\nc:\n  d: 3\n"
    docs = parse_documents(text)
    assert [d.data for d in docs] == [{"a": 1}, {"b": 2}, {"c": {"d": 3}}]
    assert [d.index for d in docs] == [0, 1, 2]
    assert [d.line for d in docs] == [1, 4, 6]


def test_empty_documents_are_skipped_and_indices_stay_dense() -> None:
    docs = parse_documents("---\n---\n# only a comment\n---\na: 1\n---\n\n---\nb: 2\n")
    assert [d.data for d in docs] == [{"a": 1}, {"b": 2}]
    assert [d.index for d in docs] == [0, 1]
    assert [d.line for d in docs] == [5, 9]


@pytest.mark.parametrize("text", ["", "\n\n", "# nothing here\n", "---\n", "[]\n", "null\n", "~\n"])
def test_empty_input_gives_no_documents(text: str) -> None:
    assert parse_documents(text) == []


def test_top_level_list_is_several_documents() -> None:
    text = "- name: a\n  x: 1\n- name: b\n\n- name: c\n"
    docs = parse_documents(text)
    assert [d.data for d in docs] == [{"name": "a", "x": 1}, {"name": "b"}, {"name": "c"}]
    assert [d.index for d in docs] == [0, 1, 2]
    assert [d.line for d in docs] == [1, 3, 5]
    assert docs[0].line_of(("x",)) == 2


def test_top_level_list_and_multi_document_combine() -> None:
    docs = parse_documents("- a: 1\n- a: 2\n---\na: 3\n")
    assert [d.data for d in docs] == [{"a": 1}, {"a": 2}, {"a": 3}]
    assert [d.index for d in docs] == [0, 1, 2]
    assert [d.line for d in docs] == [1, 2, 4]


def test_nested_lists_are_not_split() -> None:
    docs = parse_documents("a: [1, 2]\n")
    assert len(docs) == 1
    assert docs[0].data == {"a": [1, 2]}


def test_non_mapping_documents_are_returned_as_data() -> None:
    # deciding that a document must be a mapping is the loader's job, not the parser's
    assert [d.data for d in parse_documents("hello\n---\n42\n")] == ["hello", 42]


# --- JSON ------------------------------------------------------------------------------------------


def test_json_object() -> None:
    obj = {"name": "x", "rules": [{"match": {"hostname": "a.example.com", "port": 8080},
                                   "target": {"instance": "vm", "port": 80}, "tls": False}]}
    docs = parse_documents(json.dumps(obj))
    assert len(docs) == 1
    assert docs[0].data == obj
    assert docs[0].line == 1


def test_json_array_is_several_documents_with_lines() -> None:
    text = json.dumps([{"name": "a", "n": 1}, {"name": "b", "n": None}, {"name": "c", "t": True}], indent=2)
    docs = parse_documents(text)
    assert [d.data["name"] for d in docs] == ["a", "b", "c"]
    assert docs[1].data == {"name": "b", "n": None}
    assert docs[2].data["t"] is True
    lines = text.splitlines()
    for doc in docs:
        # the document starts at its "{" and the "name" value is on the line holding it
        assert lines[doc.line - 1].strip() == "{"
        assert f'"name": "{doc.data["name"]}"' in lines[doc.line_of(("name",)) - 1]


def test_json_quoted_merge_key_is_an_ordinary_key() -> None:
    assert parse_documents('{"<<": {"a": 1}, "b": 2}')[0].data == {"<<": {"a": 1}, "b": 2}


def test_json_duplicate_keys_are_refused() -> None:
    err = parse_error('{\n  "name": "a",\n  "name": "b"\n}\n')
    assert "duplicate key 'name'" in err.message
    assert err.line == 3


# YAML 1.1 (the JSON superset we parse) refuses raw control characters and cannot read JSON's
# surrogate-pair escapes of astral characters: text is limited to the printable BMP (see the report).
_chars = st.characters(max_codepoint=0xFFFD, exclude_categories=("Cs", "Cc")) | st.sampled_from("\n\t")
_text = st.text(_chars, max_size=20)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**53), max_value=2**53) | _text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(_chars, max_size=8), children,
                                                                      max_size=4),
    max_leaves=20,
)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(_chars, max_size=8), json_values, max_size=5), st.booleans(), st.booleans())
def test_json_text_parses_to_the_same_data(obj: dict[str, object], indent: bool, ascii_only: bool) -> None:
    text = json.dumps(obj, indent=2 if indent else None, ensure_ascii=ascii_only)
    docs = parse_documents(text)
    if obj:
        assert len(docs) == 1
        assert docs[0].data == obj
    else:
        assert [d.data for d in docs] == [{}]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.dictionaries(st.text(_chars, max_size=8), json_values, min_size=1, max_size=4), max_size=4))
def test_yaml_dump_round_trips(objs: list[dict[str, object]]) -> None:
    text = yaml.safe_dump_all(objs, allow_unicode=True)
    assert [d.data for d in parse_documents(text)] == objs


# --- line numbers ----------------------------------------------------------------------------------


MANIFEST = """\
# leading comment
name: demo
rules:
  - match:
      hostname: a.example.com
      port: 8080
    target: {instance: vm, port: 80}
  - match: {hostname: b.example.com}
    target:
      instance: other
      port: 81
"""


@pytest.mark.parametrize(
    ("path", "line"),
    [
        ((), 2),
        (("name",), 2),
        (("rules",), 3),
        (("rules", 0), 4),
        (("rules", 0, "match"), 4),
        (("rules", 0, "match", "hostname"), 5),
        (("rules", 0, "match", "port"), 6),
        (("rules", 0, "target"), 7),
        (("rules", 0, "target", "port"), 7),
        (("rules", 1), 8),
        (("rules", 1, "match", "hostname"), 8),
        (("rules", 1, "target", "instance"), 10),
        (("rules", 1, "target", "port"), 11),
    ],
)
def test_line_of_values(path: tuple[str | int, ...], line: int) -> None:
    (doc,) = parse_documents(MANIFEST)
    assert doc.line == 2
    assert doc.line_of(path) == line


@pytest.mark.parametrize(
    ("path", "line"),
    [
        (("rules", 1, "match", "port"), 8),  # missing key: line of the nearest ancestor that exists
        (("rules", 7, "match"), 3),  # index out of range: the list
        (("nope", "deeper"), 2),  # unknown top-level key: the document
        (("name", "x"), 2),  # path through a scalar
    ],
)
def test_line_of_missing_paths_falls_back_to_nearest_ancestor(path: tuple[str | int, ...], line: int) -> None:
    (doc,) = parse_documents(MANIFEST)
    assert doc.line_of(path) == line


def test_line_of_in_later_documents_is_relative_to_the_file() -> None:
    docs = parse_documents("a: 1\n---\nb:\n  c: 2\n  d:\n    - 3\n    - 4\n")
    assert docs[1].line == 3
    assert docs[1].line_of(("b", "c")) == 4
    assert docs[1].line_of(("b", "d", 1)) == 7


def test_syntax_error_has_a_line() -> None:
    err = parse_error("name: a\nrules:\n  - match: {hostname: x\n    target: y\n")
    assert err.message.startswith("YAML syntax error")
    assert err.line is not None and 3 <= err.line <= 5


def test_syntax_error_in_second_document_names_its_line() -> None:
    err = parse_error("a: 1\n---\nb: 2\nc: [1\n")
    assert err.line is not None and err.line >= 4


# --- duplicate keys, key types, scalars ------------------------------------------------------------


def test_duplicate_keys_are_refused_with_the_line_of_the_second() -> None:
    err = parse_error("name: a\nrules: []\nname: b\n")
    assert "duplicate key 'name'" in err.message
    assert err.line == 3


def test_nested_duplicate_keys_are_refused() -> None:
    err = parse_error("rules:\n  - match:\n      hostname: a\n      hostname: b\n")
    assert "duplicate key 'hostname'" in err.message
    assert err.line == 4


def test_same_key_in_different_mappings_is_fine() -> None:
    assert parse_documents("a: {x: 1}\nb: {x: 2}\n")[0].data == {"a": {"x": 1}, "b": {"x": 2}}


@pytest.mark.parametrize("text", ["1: a\n", "? [a]\n: 1\n", "? {a: 1}\n: 1\n", "true: 1\n", "null: 1\n"])
def test_non_string_keys_are_refused(text: str) -> None:
    assert "keys must be strings" in parse_error(text).message


def test_plain_scalars() -> None:
    data = parse_documents("i: 8080\nneg: -3\nf: 1.5\nt: true\nf2: false\nn: null\ns: 'quoted 1'\n"
                           "ts: 2024-01-01T00:00:00Z\nd: 2024-01-01\n")[0].data
    assert data == {"i": 8080, "neg": -3, "f": 1.5, "t": True, "f2": False, "n": None, "s": "quoted 1",
                    "ts": "2024-01-01T00:00:00Z", "d": "2024-01-01"}
    assert type(data["i"]) is int
    assert type(data["t"]) is bool


# --- unsafe / unsupported tags ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tag"),
    [
        ("!!python/object:os.system {}\n", "python/object:os.system"),
        ("a: !!python/object/apply:os.system ['true']\n", "python/object/apply:os.system"),
        ("a: !!python/object/new:os.system ['true']\n", "python/object/new:os.system"),
        ("a: !!python/name:os.system ''\n", "python/name:os.system"),
        ("a: !!python/tuple [1, 2]\n", "python/tuple"),
        ("a: !!binary aGVsbG8=\n", "binary"),
        ("a: !!set {x, y}\n", "set"),
        ("a: !!omap [{x: 1}]\n", "omap"),
        ("a: !!pairs [{x: 1}]\n", "pairs"),
        ("a: !foo bar\n", "!foo"),
        ("a: !foo {b: 1}\n", "!foo"),
        ("a: !foo [1]\n", "!foo"),
        ("!foo\nname: x\n", "!foo"),
        ("%TAG !e! tag:example.com,2000:\n---\na: !e!thing x\n", "tag:example.com,2000:thing"),
    ],
)
def test_unsupported_tags_are_refused(text: str, tag: str) -> None:
    err = parse_error(text)
    assert "unsupported tag" in err.message
    assert tag in err.message
    assert err.line is not None


def test_python_object_tag_never_runs_code(tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    err = parse_error(f"a: !!python/object/apply:os.mkdir ['{target}']\n")
    assert "unsupported tag" in err.message
    assert not target.exists()


def test_unsupported_tag_in_a_later_line_names_that_line() -> None:
    assert parse_error("a: 1\nb: 2\nc: !!binary aGVsbG8=\n").line == 3


def test_explicit_standard_scalar_tags_are_fine() -> None:
    assert parse_documents("a: !!str 80\nb: !!int '81'\n")[0].data == {"a": "80", "b": 81}


# --- alias bombs, recursion, nesting ---------------------------------------------------------------


def billion_laughs(levels: int = 9, width: int = 9) -> str:
    lines = ["l0: &l0 [" + ", ".join(['"lol"'] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_rejected_fast() -> None:
    start = time.monotonic()
    err = parse_error(billion_laughs())  # 9**9 ~ 387 million values if expanded
    elapsed = time.monotonic() - start
    assert "alias bomb" in err.message
    assert str(MAX_NODES) in err.message
    # generous bound: a naive expansion takes minutes and gigabytes, the budget stops it in well under 1 s
    assert elapsed < 5, elapsed


def test_alias_bomb_through_merge_keys_is_harmless() -> None:
    lines = ["m0: &m0 {" + ", ".join(f"k{i}: {i}" for i in range(9)) + "}"]
    for i in range(1, 12):
        lines.append(f"m{i}: &m{i} {{<<: [" + ", ".join([f"*m{i - 1}"] * 9) + "]}")
    start = time.monotonic()
    (doc,) = parse_documents("\n".join(lines) + "\n")
    assert time.monotonic() - start < 5
    assert doc.data["m11"] == {f"k{i}": i for i in range(9)}


def test_alias_bomb_across_documents_of_one_file_is_rejected() -> None:
    # the budget is per file, so splitting the expansion over documents does not help
    part = billion_laughs(levels=5, width=9)  # 9**5 = 59049 values per document
    err = parse_error(part + "---\n" + part + "---\n" + part)
    assert "alias bomb" in err.message


def test_small_aliases_are_fine() -> None:
    data = parse_documents("base: &t {instance: vm, port: 80}\na: *t\nb: *t\n")[0].data
    assert data["a"] == data["b"] == {"instance": "vm", "port": 80}


@pytest.mark.parametrize("text", ["&a [*a]\n", "a: &a {b: *a}\n", "a: &a [1, [2, *a]]\n",
                                  "- &a {x: [*a]}\n", "a: &a {<<: *a}\n"])
def test_recursive_alias_is_refused(text: str) -> None:
    assert "recursive alias" in parse_error(text).message


def nested_flow(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_nesting_up_to_the_limit_is_accepted() -> None:
    # depth MAX_DEPTH + 1 lists: the outermost is at depth 0, the innermost at MAX_DEPTH
    (doc,) = parse_documents("a: " + nested_flow(MAX_DEPTH))
    assert isinstance(doc.data["a"], list)


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 1000, 100_000])
def test_deep_flow_nesting_is_refused(depth: int) -> None:
    err = parse_error("a: " + nested_flow(depth))
    assert "nest" in err.message


def test_deep_block_nesting_is_refused() -> None:
    text = "".join(f"{'  ' * i}k{i}:\n" for i in range(500)) + f"{'  ' * 500}v: 1\n"
    err = parse_error(text)
    assert "nest" in err.message


def test_deep_nesting_through_aliases_is_refused() -> None:
    lines = ["n0: &n0 [1]"] + [f"n{i}: &n{i} [*n{i - 1}]" for i in range(1, MAX_DEPTH + 5)]
    assert "nest" in parse_error("\n".join(lines) + "\n").message


# --- merge keys ------------------------------------------------------------------------------------


def test_merge_key_copies_the_mapping() -> None:
    docs = parse_documents("base: &b {instance: vm, port: 80}\nt:\n  <<: *b\n")
    assert docs[0].data["t"] == {"instance": "vm", "port": 80}


def test_merge_key_own_keys_override_merged_ones() -> None:
    text = "base: &b {instance: vm, port: 80}\nt:\n  <<: *b\n  port: 8080\n"
    (doc,) = parse_documents(text)
    assert doc.data["t"] == {"instance": "vm", "port": 8080}
    assert doc.line_of(("t", "port")) == 4  # the line of the override, not of the anchor


def test_merge_key_own_key_before_the_merge_still_wins() -> None:
    (doc,) = parse_documents("base: &b {a: 1, b: 2}\nt:\n  b: 3\n  <<: *b\n")
    assert doc.data["t"] == {"a": 1, "b": 3}


def test_merge_key_list_earlier_mapping_wins() -> None:
    (doc,) = parse_documents("x: &x {k: 1, a: 1}\ny: &y {k: 2, b: 2}\nt: {<<: [*x, *y]}\nu: {<<: [*y, *x]}\n")
    assert doc.data["t"] == {"k": 1, "a": 1, "b": 2}
    assert doc.data["u"] == {"k": 2, "a": 1, "b": 2}


def test_merge_key_with_long_key_names_in_a_list() -> None:
    # different key nodes with equal text must not become "duplicate keys"
    (doc,) = parse_documents("x: &x {instance: a}\ny: &y {instance: b}\nt: {<<: [*x, *y]}\n")
    assert doc.data["t"] == {"instance": "a"}


def test_nested_merge_keys() -> None:
    (doc,) = parse_documents("a: &a {k: 1, j: 1}\nc: {<<: &b {<<: *a, k: 2}}\n")
    assert doc.data["c"] == {"k": 2, "j": 1}


def test_merge_key_does_not_hide_real_duplicates() -> None:
    err = parse_error("a: &a {k: 1}\nt:\n  <<: *a\n  x: 1\n  x: 2\n")
    assert "duplicate key 'x'" in err.message
    assert err.line == 5


@pytest.mark.parametrize("text", ["t:\n  <<: 1\n", "t:\n  <<: [1]\n", "t: {<<: [{a: 1}, [2]]}\n"])
def test_merge_key_with_a_non_mapping_is_refused(text: str) -> None:
    err = parse_error(text)
    assert "merge" in err.message
    assert err.line is not None


# --- decode ----------------------------------------------------------------------------------------


def test_decode_utf8_and_bom() -> None:
    assert decode("name: café\n".encode()) == "name: café\n"
    assert decode(b"\xef\xbb\xbfa: 1\n") == "a: 1\n"


@pytest.mark.parametrize("raw", [b"a: 1\n\x00\n", b"\x00", b"\x7fELF\x02\x01\x01\x00\x00\x00"])
def test_decode_refuses_binary(raw: bytes) -> None:
    with pytest.raises(ParseError) as info:
        decode(raw)
    assert "binary" in info.value.message


@pytest.mark.parametrize(("raw", "line"), [(b"\xff\xfe", 1), (b"a: 1\nb: \xc3\x28\n", 2),
                                           (b"a: 1\n\n\nc: caf\xe9\n", 4)])
def test_decode_refuses_non_utf8_with_the_line(raw: bytes, line: int) -> None:
    with pytest.raises(ParseError) as info:
        decode(raw)
    assert "UTF-8" in info.value.message
    assert info.value.line == line


def test_utf16_file_is_refused() -> None:
    with pytest.raises(ParseError):
        decode("name: a\n".encode("utf-16"))


@pytest.mark.parametrize(("text", "line"), [("a: b\x07c\n", 1), ("a: 1\nb: x\x7f\n", 2)])
def test_control_characters_are_refused_with_the_line(text: str, line: int) -> None:
    err = parse_error(text)
    assert "control characters" in err.message
    assert "\n" not in err.message
    assert err.line == line


@pytest.mark.parametrize("value", ["\u00b9", "\ua900", "\u0663", "\uff11"])
def test_non_ascii_digits_stay_strings(value: str) -> None:
    # str.isdigit() is true for these, int() even parses some of them: they must not become ports
    assert parse_documents(f"a: {value}\n{value}: b\n")[0].data == {"a": value, value: "b"}
