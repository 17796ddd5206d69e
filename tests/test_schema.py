"""Every command's --json document, on every fixture, against the shipped schema.

kvminspect/schema.json (draft 2020-12) fixes every field's name and type
wherever the same object appears; unevaluatedProperties keeps extra fields
out. The documents of a kernel lacking members (tests/test_unknown_member.py)
and of two VMs are checked as well; diff's documents (two targets) are checked
in tests/test_diff.py, on every fixture and on a real before/after pair.
"""

from __future__ import annotations

import json
from importlib import resources

import jsonschema
import pytest

from kvminspect.cli import run_one
from kvminspect.session import Session
from kvminspect.shapes import SCHEMA_VERSION
from tests.conftest import FIXTURES, MULTI_VM, open_fixture

SCHEMA = json.loads(resources.files("kvminspect").joinpath("schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
COMMANDS = ["vms", "vm 0", "vcpus", "roots", "tree", "tree --depth 1", "tree --unsync-only",
            "unsync --zap",
            "unsync", "stats", "check", "walk 0x200000", "walk 0x201000 --vcpu 1",
            "walk 0x40000000", "check --audit", "rmap 0x200", "rmap 0x1", "rmap --stats",
            "diagnose"]


def validate(doc: dict) -> None:
    errors = sorted(VALIDATOR.iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, [(list(e.path), e.message[:300]) for e in errors[:3]]


def test_schema_is_valid_and_versioned() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["properties"]["schema_version"] == {"const": SCHEMA_VERSION}


def documents(name: str, capsys) -> list[dict]:
    s = Session(open_fixture(name))
    docs = []
    for cmd in COMMANDS:
        capsys.readouterr()
        run_one(s, [*cmd.split(), "--json"])
        docs.append(json.loads(capsys.readouterr().out))
    g = s.graph(s.kernel.vms()[0])
    capsys.readouterr()
    run_one(s, ["sp", hex(g.root_order()[0]), "--json"])
    docs.append(json.loads(capsys.readouterr().out))
    return docs


@pytest.mark.parametrize("name", FIXTURES + MULTI_VM)
def test_every_document_matches(name: str, capsys) -> None:
    for doc in documents(name, capsys):
        assert doc["schema_version"] == SCHEMA_VERSION
        validate(doc)


def test_export_document_matches(tmp_path, capsys) -> None:
    s = Session(open_fixture("6.1-shadow"))
    run_one(s, ["export", "-f", "json", str(tmp_path / "g.json"), "--json"])
    validate(json.loads(capsys.readouterr().out))


def test_schema_rejects_what_it_must() -> None:
    """The schema is not a rubber stamp: a wrong type, an unknown field, a null hpa."""
    ok = {"schema_version": SCHEMA_VERSION, "command": "vms", "vms": [], "errors": [],
          "warnings": []}
    validate(ok)
    for bad in ({**ok, "extra": 1}, {**ok, "schema_version": SCHEMA_VERSION + 1},
                {**ok, "errors": [{}]}):
        assert list(VALIDATOR.iter_errors(bad))
    root = {"pgd": "0x1000", "hpa": None, "state": "invalid_page", "page": None,
            "pae_roots": []}
    doc = {**ok, "command": "roots", "vms": [{
        "index": 0, "kvm": "0xffff888000000000", "pid": 1, "mmu": "shadow", "vendor": None,
        "mmu_valid_gen": 0, "vcpus": [{"vcpu": "0xffff888000001000", "vcpu_id": 0,
                                       "vcpu_idx": 0, "cr3": "0x1000", "mmu": "root_mmu",
                                       "root": root, "prev_roots": [],
                                       "other_mmu": None}]}]}
    assert list(VALIDATOR.iter_errors(doc))  # null is not INVALID_PAGE
    root["hpa"] = "INVALID_PAGE"
    validate(doc)
