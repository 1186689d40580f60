"""Loading a policy directory: what an operator sees when the set is good, and when it is not."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import cedarpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from proxy_support import BUNDLED_IDS, POLICIES, make_call

from proxy.cedar.engine import Engine
from proxy.cedar.policy import PolicyLoadError, load_bundle, split_statements
from proxy.decision.gate import Gate, Outcome
from proxy.record.store import Recorder


def _dir_with(tmp_path: Path, files: dict[str, str], *, keep_ops: bool = False) -> Path:
    """A policy directory with the bundled schema and entities and the given policy files."""
    target = tmp_path / "p"
    target.mkdir()
    shutil.copy2(POLICIES / "schema.cedarschema", target / "schema.cedarschema")
    shutil.copy2(POLICIES / "entities.json", target / "entities.json")
    if keep_ops:
        shutil.copy2(POLICIES / "ops.cedar", target / "ops.cedar")
    for name, text in files.items():
        (target / name).write_text(text, encoding="utf-8")
    return target


GOOD = '@id("fine")\npermit (principal in Team::"ops", action in Action::"read", resource);\n'


def test_bundled_policies_load_with_their_ids_effects_lines_and_reasons():
    bundle = load_bundle(POLICIES)

    assert set(bundle.policies) == BUNDLED_IDS
    assert {i: p.effect for i, p in bundle.policies.items()} == {
        "ops-read": "permit",
        "ops-stop-instance": "permit",
        "ops-delete-volumes": "permit",
        "protect-production-instances": "forbid",
        "staging-after-hours": "forbid",
        "no-volume-deletion": "forbid",
        "finance-refunds": "permit",
        "large-refunds": "forbid",
        "low-confidence-writes": "forbid",
        "github-mcp-sessions": "permit",
        "github-tools": "permit",
        "no-repository-deletion": "forbid",
        "no-repository-transfer": "forbid",
        "no-merges-to-payments": "forbid",
    }
    # The line is the @id line, so an operator can jump to it.
    assert {i: (p.file, p.line) for i, p in bundle.policies.items()} == {
        "ops-read": ("ops.cedar", 5),
        "ops-delete-volumes": ("ops.cedar", 11),
        "ops-stop-instance": ("ops.cedar", 16),
        "protect-production-instances": ("ops.cedar", 21),
        "staging-after-hours": ("ops.cedar", 36),
        "no-volume-deletion": ("ops.cedar", 53),
        "finance-refunds": ("payments.cedar", 4),
        "large-refunds": ("payments.cedar", 12),
        "low-confidence-writes": ("ops.cedar", 62),
        "github-mcp-sessions": ("github.cedar", 4),
        "github-tools": ("github.cedar", 8),
        "no-repository-deletion": ("github.cedar", 12),
        "no-repository-transfer": ("github.cedar", 20),
        "no-merges-to-payments": ("github.cedar", 25),
    }
    assert bundle.policies["no-volume-deletion"].reason == "Deleting a volume destroys its data for good."
    assert bundle.policies["ops-read"].reason is None
    assert re.fullmatch(r"[0-9a-f]{64}", bundle.revision)
    assert set(bundle.files) == {"ops.cedar", "payments.cedar", "github.cedar", "schema.cedarschema",
                                 "actions.cedarschema", "entities.json", "actions.yaml"}
    assert ("Host", "127.0.0.1") in bundle.entity_uids


def test_the_loaded_policy_set_decides_like_the_files_say():
    bundle = load_bundle(POLICIES)
    request = {
        "principal": {"type": "Agent", "id": "ops-bot"},
        "action": {"type": "Action", "id": "delete"},
        "resource": {"type": "Host", "id": "localhost"},
        "context": {
            "scheme": "http",
            "host": "localhost",
            "port": 80,
            "method": "DELETE",
            "path": "/v1/volumes/v-1",
            "query": "",
            "headers": {},
        },
    }
    result = cedarpy.is_authorized(request, bundle.policy_set, bundle.entities)
    assert result.decision.value == "Deny"
    assert result.diagnostics.reasons == ["no-volume-deletion"]


def test_revision_is_stable_across_loads(policy_dir: Path):
    assert (
        load_bundle(policy_dir).revision == load_bundle(policy_dir).revision == load_bundle(POLICIES).revision
    )


@pytest.mark.parametrize("name", ["ops.cedar", "schema.cedarschema", "entities.json"])
def test_revision_changes_when_any_file_changes_and_comes_back_with_the_content(policy_dir: Path, name: str):
    before = load_bundle(policy_dir).revision
    original = (policy_dir / name).read_text()
    # A change that keeps the set valid and meaning the same: the revision is about the bytes.
    (policy_dir / name).write_text(original + "\n")
    changed = load_bundle(policy_dir).revision
    (policy_dir / name).write_text(original)

    assert changed != before
    assert load_bundle(policy_dir).revision == before


def test_adding_a_policy_file_changes_the_revision(policy_dir: Path):
    before = load_bundle(policy_dir)
    (policy_dir / "extra.cedar").write_text(GOOD)
    after = load_bundle(policy_dir)
    assert after.revision != before.revision
    assert set(after.policies) == BUNDLED_IDS | {"fine"}
    assert after.policies["fine"].file == "extra.cedar"


def test_parse_error_names_file_line_and_id(tmp_path: Path):
    text = (
        GOOD
        + "\n"
        + "// the next one is missing its closing parenthesis\n"
        + '@id("broken-one")\n'
        + "permit (principal, action, resource when { true };\n"
    )
    directory = _dir_with(tmp_path, {"broken.cedar": text})
    with pytest.raises(PolicyLoadError) as info:
        load_bundle(directory)
    message = str(info.value)
    assert "broken.cedar:5:" in message
    assert '@id("broken-one")' in message
    assert "does not parse" in message


def test_policy_without_id_is_refused_naming_file_and_line(tmp_path: Path):
    text = GOOD + '\npermit (principal, action in Action::"read", resource);\n'
    directory = _dir_with(tmp_path, {"noid.cedar": text})
    with pytest.raises(PolicyLoadError, match=r'noid\.cedar:4: policy has no @id\("\.\.\."\)'):
        load_bundle(directory)


def test_empty_id_is_refused_like_a_missing_one(tmp_path: Path):
    directory = _dir_with(tmp_path, {"empty.cedar": '@id("")\npermit (principal, action, resource);\n'})
    with pytest.raises(PolicyLoadError, match=r"empty\.cedar:1: policy has no @id"):
        load_bundle(directory)


def test_duplicate_id_across_files_names_both_places(tmp_path: Path):
    dup = (
        "// copy of ops-read under the same id\n\n"
        '@id("ops-read")\npermit (principal, action in Action::"read", resource);\n'
    )
    directory = _dir_with(tmp_path, {"zz-more.cedar": dup}, keep_ops=True)
    with pytest.raises(PolicyLoadError) as info:
        load_bundle(directory)
    message = str(info.value)
    assert '@id("ops-read")' in message
    assert "zz-more.cedar:3" in message
    assert "ops.cedar:5" in message


def test_duplicate_id_within_one_file_is_refused(tmp_path: Path):
    directory = _dir_with(tmp_path, {"twice.cedar": GOOD + "\n" + GOOD})
    with pytest.raises(
        PolicyLoadError, match=r'twice\.cedar:4: @id\("fine"\) is already used at twice\.cedar:1'
    ):
        load_bundle(directory)


def test_schema_validation_error_names_file_line_and_id(tmp_path: Path):
    text = GOOD + '\n@id("uses-nope")\nforbid (principal, action, resource)\nwhen { context.nope == 1 };\n'
    directory = _dir_with(tmp_path, {"bad.cedar": text})
    with pytest.raises(PolicyLoadError) as info:
        load_bundle(directory)
    message = str(info.value)
    assert "does not validate against the schema" in message
    assert 'bad.cedar:4: @id("uses-nope")' in message
    assert "nope" in message
    assert '@id("fine")' not in message


def test_optional_header_read_without_has_is_a_validation_error(tmp_path: Path):
    text = '@id("ua")\nforbid (principal, action, resource)\nwhen { context.headers["user-agent"] == "x" };\n'
    directory = _dir_with(tmp_path, {"ua.cedar": text})
    with pytest.raises(PolicyLoadError, match=r'ua\.cedar:1: @id\("ua"\).*user-agent'):
        load_bundle(directory)


def test_template_is_refused(tmp_path: Path):
    text = GOOD + '\n@id("tpl")\npermit (principal == ?principal, action, resource);\n'
    directory = _dir_with(tmp_path, {"tpl.cedar": text})
    with pytest.raises(PolicyLoadError) as info:
        load_bundle(directory)
    message = str(info.value)
    assert "tpl.cedar:4:" in message
    assert '@id("tpl")' in message
    assert "template" in message


def test_missing_directory_schema_or_policies_are_refused(tmp_path: Path):
    with pytest.raises(PolicyLoadError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")

    no_schema = tmp_path / "no-schema"
    no_schema.mkdir()
    (no_schema / "a.cedar").write_text(GOOD)
    with pytest.raises(PolicyLoadError, match=r"no \*\.cedarschema"):
        load_bundle(no_schema)

    no_policies = tmp_path / "no-policies"
    no_policies.mkdir()
    shutil.copy2(POLICIES / "schema.cedarschema", no_policies / "schema.cedarschema")
    with pytest.raises(PolicyLoadError, match=r"no \*\.cedar policy files"):
        load_bundle(no_policies)


def test_bad_schema_is_refused(tmp_path: Path):
    directory = _dir_with(tmp_path, {"a.cedar": GOOD})
    (directory / "schema.cedarschema").write_text("entity Agent in [;\n")
    with pytest.raises(PolicyLoadError, match=r"schema\.cedarschema: schema does not parse"):
        load_bundle(directory)


def test_entities_that_are_not_json_name_the_line(tmp_path: Path):
    directory = _dir_with(tmp_path, {"a.cedar": GOOD})
    (directory / "entities.json").write_text(
        '[\n  {"uid": {"type": "Team", "id": "ops"}, "attrs": {}, "parents": []},\n  oops\n]\n'
    )
    with pytest.raises(PolicyLoadError, match=r"entities\.json:3: not valid JSON"):
        load_bundle(directory)


def test_entities_that_do_not_match_the_schema_are_refused(tmp_path: Path):
    directory = _dir_with(tmp_path, {"a.cedar": GOOD})
    # Host requires `tags`.
    (directory / "entities.json").write_text(
        '[{"uid": {"type": "Host", "id": "h"}, "attrs": {}, "parents": []}]'
    )
    with pytest.raises(PolicyLoadError, match=r"entities\.json: does not match the schema"):
        load_bundle(directory)


def test_without_entities_file_the_set_loads_with_no_entities(tmp_path: Path):
    directory = _dir_with(tmp_path, {"a.cedar": GOOD})
    (directory / "entities.json").unlink()
    bundle = load_bundle(directory)
    assert bundle.entity_uids == frozenset()
    assert set(bundle.policies) == {"fine"}


# ---- split_statements ----------------------------------------------------------------------------


def test_split_ignores_semicolons_in_strings_and_comments():
    text = (
        '// header comment; with a semicolon and a "quote\n'
        "\n"
        '@id("a; b")\n'
        '@reason("say \\"no\\"; twice")\n'
        'forbid (principal, action, resource) when { context.path like "/x;y/*" };  // trailing; comment\n'
        "\n"
        '@id("c") permit (principal, action, resource); @id("d") permit (principal, action, resource);\n'
        "// a comment at the end; not a statement\n"
    )
    statements = split_statements(text)

    assert [line for line, _ in statements] == [3, 7, 7]
    assert '@id("a; b")' in statements[0][1] and statements[0][1].rstrip().endswith("};")
    assert '@id("c")' in statements[1][1] and '@id("d")' not in statements[1][1]
    assert '@id("d")' in statements[2][1]
    # Each piece is one policy Cedar itself can parse, with the annotations intact.
    parsed = [cedarpy.policies_to_pst(s) for _, s in statements]
    assert [list(p.static_policies.values())[0].annotations["id"] for p in parsed] == ["a; b", "c", "d"]
    assert list(parsed[0].static_policies.values())[0].annotations["reason"] == 'say "no"; twice'


def test_split_keeps_an_unterminated_tail_so_it_fails_to_parse():
    statements = split_statements(
        '@id("a") permit (principal, action, resource);\n@id("b") permit (principal'
    )
    assert [line for line, _ in statements] == [1, 2]
    with pytest.raises(ValueError):
        cedarpy.policies_to_pst(statements[1][1])


_tricky_text = st.text(alphabet=st.sampled_from(list(';"\\/ \nab*')), max_size=12)


@st.composite
def _policy_files(draw):
    """Cedar text with string literals and comments full of `;`, `"`, `\\` and `//`."""
    policies = []
    for i in range(draw(st.integers(1, 5))):
        reason = draw(_tricky_text).replace("\n", " ")
        pattern = draw(_tricky_text).replace("\n", " ").replace("*", "")
        comment = draw(_tricky_text).replace("\n", " ")
        escaped_reason = reason.replace("\\", "\\\\").replace('"', '\\"')
        escaped_pattern = pattern.replace("\\", "\\\\").replace('"', '\\"')
        lead = draw(st.sampled_from(["", "\n", "\n\n", f"// {comment}\n"]))
        policies.append(
            (
                f"p{i}",
                reason,
                f'{lead}@id("p{i}")\n@reason("{escaped_reason}")\n'
                f'permit (principal, action, resource) when {{ context.path like "{escaped_pattern}" }};'
                f" // {comment}\n",
            )
        )
    return policies


@settings(max_examples=150, deadline=None)
@given(_policy_files())
def test_split_finds_every_policy_and_its_id_line(policies):
    text = "".join(p[2] for p in policies)
    statements = split_statements(text)

    assert len(statements) == len(policies)
    lines = text.splitlines()
    for (line, statement), (policy_id, reason, _) in zip(statements, policies, strict=True):
        assert lines[line - 1].startswith(f'@id("{policy_id}")')
        node = cedarpy.policies_to_pst(statement)
        (template,) = node.static_policies.values()
        assert template.annotations == {"id": policy_id, "reason": reason}


# ---- regressions: each was a fail-open or crash before it was fixed -------------------------------


def test_host_listed_with_capitals_is_protected_or_refused(policy_dir: Path, recorder: Recorder):
    entities = policy_dir / "entities.json"
    entities.write_text(
        entities.read_text().replace('"id": "cloud.prod.example"', '"id": "Cloud.Prod.Example"')
    )
    try:
        engine = Engine(policy_dir)
    except PolicyLoadError as exc:  # refusing the set, naming the entity, is a fine fix too
        assert "Cloud.Prod.Example" in str(exc)
        return
    verdict = Gate(engine, recorder).decide(
        make_call("POST", "https://Cloud.Prod.Example/v1/instances/i-1/stop")
    )
    assert verdict.outcome is not Outcome.ALLOW
