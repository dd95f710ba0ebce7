"""reconciler.diff: structural comparison of Caddy configs, and the readable changes between them."""

from __future__ import annotations

from reconciler.diff import Change, diff, normalise, same


def test_equal_configs_have_no_changes_and_numbers_compare_by_value() -> None:
    a = {"apps": {"http": {"servers": {"s": {"listen": [":80"], "routes": [{"@id": "r1", "x": 1}]}}}}}
    assert diff(a, normalise(a)) == [] and same(a, normalise(a))
    assert same({"n": 1}, {"n": 1.0})  # Caddy re-encodes numbers


def test_mapping_keys_added_removed_changed_sorted() -> None:
    assert diff({"b": 1, "c": 2, "d": {"e": 1}}, {"a": 0, "b": 1, "d": {"e": 2}}) == [
        Change("+", "a", new=0), Change("-", "c", old=2), Change("~", "d.e", 1, 2)]


def test_lists_of_objects_with_ids_are_matched_by_id() -> None:
    live = [{"@id": "a", "v": 1}, {"@id": "b", "v": 1}]
    assert diff(live, [{"@id": "b", "v": 2}, {"@id": "c", "v": 1}], "routes") == [
        Change("-", "routes[@id=a]", old={"@id": "a", "v": 1}), Change("~", "routes[@id=b].v", 1, 2),
        Change("+", "routes[@id=c]", new={"@id": "c", "v": 1})]
    assert diff(live, live[::-1], "routes") == [Change("~", "routes (order)", ["a", "b"], ["b", "a"])]


def test_other_lists_are_compared_by_position() -> None:
    assert diff([1, 2, 3], [1, 5], "l") == [Change("~", "l[1]", 2, 5), Change("-", "l[2]", old=3)]
    assert diff([1], [1, 2], "l") == [Change("+", "l[1]", new=2)]


def test_whole_values_and_the_root() -> None:
    assert diff(None, {"a": 1}) == [Change("+", "(root)", new={"a": 1})]
    assert diff({"a": 1}, None) == [Change("-", "(root)", old={"a": 1})]
    assert diff({"a": [1]}, {"a": "x"}) == [Change("~", "a", [1], "x")]
    assert Change("~", "p", 1, 2).format() == "~ p: 1 -> 2" and Change("+", "p", new="x").format() == '+ p: "x"'
