"""Source files: checked whole, one line naming the key at fault (records_service.imports.source)."""

from pathlib import Path

import pytest

from records_service.imports.paths import parse_path
from records_service.imports.source import Fixed, SourceError, load_source, parse_source

REPO = Path(__file__).resolve().parent.parent

FIELDS = {"test_id": "id", "clinic_id": {"value": "C001"}, "patient_id": "patient.mrn", "test_type": "code",
          "result": "value", "collected_at": "collected"}


def rest(**overrides) -> dict:
    doc = {"name": "lab-a", "kind": "rest", "url": "https://lab-a.example/v1/results?since={since}",
           "fields": dict(FIELDS)}
    doc.update(overrides)
    return doc


def test_a_rest_source_with_defaults():
    source = parse_source(rest(), {})
    assert (source.name, source.kind, source.records, source.next) == ("lab-a", "rest", (), None)
    assert (source.timeout, source.retries, source.rate, source.since) == (10, 5, 10, "")
    assert source.fields["clinic_id"] == Fixed("C001")
    assert source.fields["patient_id"] == parse_path("patient.mrn")


def test_a_body_next_path_and_a_graphql_source():
    assert parse_source(rest(next="meta.next"), {}).next == parse_path("meta.next")
    source = parse_source({"name": "g", "kind": "graphql", "url": "http://g.example/graphql", "query": "{ x }",
                           "records": "data.results.nodes", "cursor": "data.results.pageInfo.endCursor",
                           "has_next": "data.results.pageInfo.hasNextPage", "fields": dict(FIELDS)}, {})
    assert source.cursor == parse_path("data.results.pageInfo.endCursor")


def test_header_variables_are_expanded_and_never_shown():
    source = parse_source(rest(headers={"Authorization": "Bearer ${LAB_TOKEN}"}), {"LAB_TOKEN": "s3cr3t"})
    assert source.headers == {"Authorization": "Bearer s3cr3t"}
    assert "s3cr3t" not in repr(source)


@pytest.mark.parametrize("overrides, env, message", [
    ({"colour": "red"}, {}, "colour: is not a key of a rest source"),
    ({"query": "{ x }"}, {}, "query: is not a key of a rest source"),
    ({"kind": "soap"}, {}, "kind: must be one of rest, graphql (got 'soap')"),
    ({"kind": 3}, {}, "kind: must be a string"),
    ({"name": "lab a!"}, {}, "name: must be 1 to 64 characters"),
    ({"url": "ftp://lab-a.example/x"}, {}, "url: must be an absolute http:// or https:// URL"),
    ({"url": "file:///etc/passwd"}, {}, "url: must be an absolute http:// or https:// URL"),
    ({"url": "/relative"}, {}, "url: must be an absolute"),
    ({"timeout": "10"}, {}, "timeout: must be a number"),
    ({"timeout": 0}, {}, "timeout: must be greater than 0"),
    ({"retries": 2.5}, {}, "retries: must be a whole number"),
    ({"retries": True}, {}, "retries: must be a whole number"),
    ({"retries": 0}, {}, "retries: must be at least 1"),
    ({"rate": -1}, {}, "rate: must be greater than 0"),
    ({"since": 5}, {}, "since: must be a string"),
    ({"records": "a..b"}, {}, "records: has an empty step"),
    ({"watermark": "a.*"}, {}, "watermark: uses '*'"),
    ({"headers": {"Authorization": "Bearer ${NOPE}"}}, {}, "headers.Authorization: the environment variable NOPE is not set"),
    ({"headers": {"Bad Name": "x"}}, {}, "headers.Bad Name: is not a valid header name"),
    ({"headers": {"X-Token": 5}}, {}, "headers.X-Token: must be a string"),
    ({"headers": "x"}, {}, "headers: must be a table"),
    ({"headers": {"X-Token": "${T}"}}, {"T": "line\nbreak"}, "headers.X-Token: the value (once expanded) must be"),
    ({"headers": {"X-Token": "${T}"}}, {"T": "caf\u00e9"}, "headers.X-Token: the value (once expanded) must be"),
    ({"url": "http://lab.example/a b"}, {}, "url: must be ASCII without spaces"),
    ({"url": "http://lab.example:99999/"}, {}, "url: is not a valid URL"),
    ({"fields": {**FIELDS, "colour": "c"}}, {}, "fields.colour: is not a record field"),
    ({"fields": {**FIELDS, "unit": {"val": "x"}}}, {}, "fields.unit: a fixed value is written { value = ... }"),
    ({"fields": {**FIELDS, "unit": 3}}, {}, "fields.unit: must be a string"),
    ({"fields": {k: v for k, v in FIELDS.items() if k != "result"}}, {}, "fields.result: is required"),
    ({"values": {"status": {"F": "final"}}}, {}, "values.status: maps a field that [fields] does not list"),
    ({"values": {"test_id": "x"}}, {}, "values.test_id: must be a table"),
])
def test_a_bad_source_names_the_key(overrides, env, message):
    with pytest.raises(SourceError) as raised:
        parse_source(rest(**overrides), env)
    assert str(raised.value).startswith(message)
    assert "\n" not in str(raised.value)
    assert all(value not in str(raised.value) for value in env.values())


@pytest.mark.parametrize("missing", ["name", "kind", "url", "fields"])
def test_a_missing_key_is_named(missing):
    doc = rest()
    del doc[missing]
    with pytest.raises(SourceError, match=f"^{missing}: is required"):
        parse_source(doc, {})


def test_graphql_needs_its_paths_and_refuses_next():
    doc = {"name": "g", "kind": "graphql", "url": "http://g.example/graphql", "query": "{ x }",
           "records": "data.nodes", "cursor": "data.pageInfo.endCursor", "fields": dict(FIELDS)}
    with pytest.raises(SourceError, match="^has_next: is required"):
        parse_source(doc, {})
    with pytest.raises(SourceError, match="^next: is not a key of a graphql source"):
        parse_source({**doc, "has_next": "x", "next": "link"}, {})


def test_a_file_that_is_not_toml_or_not_there(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(SourceError, match="is not valid TOML"):
        load_source(str(bad), {})
    with pytest.raises(SourceError, match="cannot read the source file"):
        load_source(str(tmp_path / "none.toml"), {})


def test_the_shipped_fhir_example_loads():
    source = load_source(str(REPO / "examples" / "fhir-observations.toml"), {"FHIR_TOKEN": "t"})
    assert source.records == parse_path("entry.*.resource", many=True)
    assert source.values["status"]["amended"] == "corrected"
