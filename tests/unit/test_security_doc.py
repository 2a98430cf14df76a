"""docs/security.md against the code: every checkov skip has a reason and is listed there,
nothing is skipped globally, and the measures it marks as built are where it says."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from tests.unit.test_template import TEMPLATE, load_template

ROOT = Path(__file__).resolve().parents[2]
SECURITY = ROOT / "docs" / "security.md"


def checkov_skips() -> dict[str, list[tuple[str, str]]]:
    """check id -> [(resource, reason)] of every inline skip in template.yaml."""
    skips: dict[str, list[tuple[str, str]]] = {}
    for name, resource in load_template(TEMPLATE.read_text(encoding="utf-8"))["Resources"].items():
        for skip in resource.get("Metadata", {}).get("checkov", {}).get("skip", []):
            skips.setdefault(skip["id"], []).append((name, str(skip.get("comment", ""))))
    return skips


def test_every_checkov_skip_has_a_reason() -> None:
    skips = checkov_skips()
    assert skips  # the template has some: the parser found them
    unexplained = [
        (check, name) for check, where in skips.items() for name, why in where if len(why) < 20
    ]
    assert unexplained == []


def test_nothing_is_skipped_globally() -> None:
    config = yaml.safe_load((ROOT / ".checkov.yaml").read_text(encoding="utf-8"))
    assert not config.get("skip-check")
    assert not config.get("soft-fail")
    assert config["file"] == ["template.yaml"]


def test_security_md_justifies_every_skipped_check_and_no_other() -> None:
    text = SECURITY.read_text(encoding="utf-8")
    table = text.split("## checkov: every skip, and why", 1)[1]
    listed = set(re.findall(r"CKV2?_AWS_\d+", table))
    assert listed == set(checkov_skips())


def test_security_md_names_what_it_marks_as_built() -> None:
    text = SECURITY.read_text(encoding="utf-8")
    for path in (
        "locks/dev.txt",
        "locks/lambda-base.txt",
        "locks/lambda-matching.txt",
        "tests/integration/test_no_pii.py",
    ):
        assert path in text
        assert (ROOT / path).is_file(), path
    for name in ("capture_response=False", "core.observability.scrub", "SECRET_MAX_AGE_S"):
        assert name in text
    observability = (ROOT / "src" / "core" / "observability.py").read_text(encoding="utf-8")
    assert "def scrub(" in observability
    aws = (ROOT / "src" / "core" / "aws.py").read_text(encoding="utf-8")
    assert re.search(r"^SECRET_MAX_AGE_S = 300\.0", aws, re.MULTILINE)  # "5 minutes"
    assert "matchmaker_owner" in text and "matchmaker_worker" in text and "matchmaker_api" in text
    for path in ("db/migrations/0010_roles.sql", "src/core/data/trust/amazon-root-cas.pem"):
        assert (ROOT / path).is_file(), path
    assert "[designed]" not in text  # every measure it describes is built
