"""The path language of source files (records_service.imports.paths)."""

import pytest

from records_service.imports.paths import PathError, parse_path, resolve, resolve_all

BUNDLE = {
    "link": [{"relation": "self", "url": "http://x/1"}, {"relation": "next", "url": "http://x/2"}],
    "entry": [
        {"resource": {"id": "o1", "identifier": [{"value": "LAB-1"}],
                      "code": {"coding": [{"system": "http://snomed.info/sct", "code": "123"},
                                          {"system": "http://loinc.org", "code": "4548-4", "display": "HbA1c"}]},
                      "valueQuantity": {"value": 5.4, "unit": "%"}}},
        {"resource": {"id": "o2"}},
        {"search": {"mode": "outcome"}},
    ],
}


@pytest.mark.parametrize("path, expected", [
    ("", BUNDLE),
    ("link.[relation=next].url", "http://x/2"),
    ("link.1.url", "http://x/2"),
    ("entry.0.resource.identifier.0.value", "LAB-1"),
    ("entry.0.resource.valueQuantity.value", 5.4),
    ("entry.0.resource.code.coding.[system=http://loinc.org].code", "4548-4"),
    ("entry.0.resource.code.coding.[system=http://loinc.org].display", "HbA1c"),
    ("link.[relation=previous].url", None),        # no element matches
    ("entry.7.resource", None),                    # index past the end
    ("entry.1.resource.identifier.0.value", None),  # a key that is missing midway
    ("entry.0.resource.id.length", None),          # a step into a string
    ("link.url", None),                            # a key on a list
])
def test_resolve_finds_the_value_or_none(path, expected):
    assert resolve(BUNDLE, parse_path(path)) == expected


def test_a_digit_step_on_an_object_is_its_member():
    assert resolve({"counts": {"0": "zero"}}, parse_path("counts.0")) == "zero"


def test_a_match_compares_strings_only():
    assert resolve([{"n": 1}, {"n": "1"}], parse_path("[n=1]")) == {"n": "1"}


def test_star_gives_every_element_in_order_with_none_where_nothing_is_found():
    assert resolve_all(BUNDLE, parse_path("entry.*.resource", many=True)) == [
        BUNDLE["entry"][0]["resource"], {"id": "o2"}, None]
    assert resolve_all(BUNDLE, parse_path("entry.*.resource.id", many=True)) == ["o1", "o2", None]


def test_star_on_something_that_is_not_a_list_is_none():
    assert resolve_all({"entry": {"a": 1}}, parse_path("entry.*", many=True)) is None
    assert resolve_all({}, parse_path("entry.*.resource", many=True)) is None


def test_nested_stars_flatten():
    doc = {"groups": [{"items": [1, 2]}, {"items": [3]}]}
    assert resolve_all(doc, parse_path("groups.*.items.*", many=True)) == [1, 2, 3]


def test_the_empty_path_is_the_document():
    assert resolve_all([1, 2], parse_path("", many=True)) == [1, 2]


@pytest.mark.parametrize("path, problem", [
    ("a..b", "empty step"),
    (".a", "empty step"),
    ("a.", "empty step"),
    ("a.[b", "without ']'"),
    ("a.b]", "without '['"),
    ("a.[b]", "[key=value]"),
    ("a.[=b]", "[key=value]"),
    ("a[b=c]", "separate them"),
    ("a.[b=[c]]", "inside"),
    ("a.*", "only `records`"),
])
def test_bad_paths_are_refused_saying_why(path, problem):
    with pytest.raises(PathError, match=problem.replace("[", r"\[").replace("*", r"\*")):
        parse_path(path)


def test_a_dot_inside_brackets_does_not_separate():
    assert parse_path("a.[system=http://loinc.org].code") == (
        ("key", "a"), ("match", "system", "http://loinc.org"), ("key", "code"))
