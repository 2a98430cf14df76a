"""The documentation stands alone and matches the code.

- README's configuration table lists every variable `Settings` reads, with its default;
- no document refers to design notes outside the repository;
- relative links and their #anchors resolve inside the repository;
- module names and paths written in `backticks` exist under src/;
- the layout tree of docs/architecture.md names every module.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest
from pydantic import AliasChoices
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
README = ROOT / "README.md"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
MARKDOWN = [README, *sorted((ROOT / "docs").glob("*.md"))]
DOCUMENTS = [README, *sorted(p for p in (ROOT / "docs").rglob("*") if p.is_file())]


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def section(text: str, heading: str) -> str:
    """The body of a `## heading` section (up to the next heading of level 1 or 2)."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^#{{1,2}} |\Z)", text, re.M | re.S)
    assert match, f"no '## {heading}' section"
    return match.group(1)


# --- README configuration table ---------------------------------------------------------


def env_name(name: str, field: FieldInfo) -> str:
    alias = field.validation_alias
    if isinstance(alias, AliasChoices) and isinstance(alias.choices[0], str):
        return alias.choices[0].upper()
    if isinstance(alias, str):
        return alias.upper()
    return name.upper()


def config_table(readme: str) -> dict[str, str]:
    """Variable → default cell, from the README's configuration table (one row each)."""
    rows: dict[str, str] = {}
    for line in section(readme, "Configuration").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 3:
            continue
        names = re.findall(r"`([A-Z][A-Z0-9_]*)`", cells[0])
        assert len(names) <= 1, f"one variable per row: {line}"
        if names:
            assert names[0] not in rows, f"{names[0]} listed twice"
            rows[names[0]] = cells[1]
    return rows


def default_problem(field: FieldInfo, cell: str) -> str | None:
    """Why the documented default `cell` does not state the field's default, or None."""
    if field.default is PydanticUndefined:  # a default_factory: described in words
        return None
    default = field.default
    if default is None:
        return None if cell.lower().startswith("unset") else "should start with 'unset'"
    if isinstance(default, bool):
        return None if f"`{str(default).lower()}`" in cell else f"should say `{default}`"
    if isinstance(default, int | float):
        number = re.search(r"-?[\d,_]+(?:\.\d+)?", cell)
        if number and float(number.group().replace(",", "").replace("_", "")) == default:
            return None
        return f"should start with the number {default}"
    if isinstance(default, str):
        return None if f"`{default}`" in cell else f"should say `{default}`"
    return f"default of type {type(default).__name__} not checked"


def test_configuration_table_lists_every_setting_with_its_default() -> None:
    rows = config_table(README.read_text(encoding="utf-8"))
    fields = {env_name(name, f): f for name, f in Settings.model_fields.items()}
    assert sorted(set(fields) - set(rows)) == [], "settings missing from README"
    assert sorted(set(rows) - set(fields)) == [], "README lists variables Settings does not read"
    problems = {
        name: problem
        for name, field in fields.items()
        if (problem := default_problem(field, rows[name])) is not None
    }
    assert problems == {}


def test_config_table_parser_catches_a_missing_row_and_a_wrong_default() -> None:
    readme = (
        "## Configuration\n\n| variable | default | meaning |\n| --- | --- | --- |\n"
        "| `BATCH_SIZE` | 21 | users per batch |\n| `DATABASE_URL` | none | db |\n\n## Next\n"
        "| `LEASE_SECONDS` | 120 | not in the section |\n"
    )
    rows = config_table(readme)
    assert rows == {"BATCH_SIZE": "21", "DATABASE_URL": "none"}
    fields = Settings.model_fields
    assert default_problem(fields["batch_size"], rows["BATCH_SIZE"]) is not None
    assert default_problem(fields["batch_size"], "20 (the legacy value)") is None
    assert default_problem(fields["database_url"], rows["DATABASE_URL"]) is not None
    assert default_problem(fields["openai_chat_model"], "`gpt-4o`") is not None
    assert env_name("pgdata", fields["pgdata"]) == "MATCHMAKER_PGDATA"


# --- standing alone ---------------------------------------------------------------------

# A document named in the text ("see NOTES.md", "NOTES §4") must be one the repository
# holds: a reader of the docs or the code has nothing else.
NAMED_DOCUMENT = re.compile(r"\b([\w-]+)(?:\.md\b|\s*§)")
REPOSITORY_DOCUMENTS = frozenset(
    p.stem
    for p in ROOT.rglob("*.md")
    if not any(part.startswith(".") for part in p.relative_to(ROOT).parts)  # .venv, .tools
)
TEXTS = [*DOCUMENTS, *sorted(SRC.rglob("*.py"))]


def documents_outside(text: str, known: frozenset[str]) -> list[str]:
    return [m.group(0) for m in NAMED_DOCUMENT.finditer(text) if m.group(1) not in known]


@pytest.mark.parametrize("doc", TEXTS, ids=rel)
def test_no_reference_to_documents_outside_the_repository(doc: Path) -> None:
    hits = [
        f"{rel(doc)}:{n}: {line.strip()}"
        for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1)
        if documents_outside(line, REPOSITORY_DOCUMENTS)
    ]
    assert hits == []


def test_named_document_pattern_matches_the_forms_in_use() -> None:
    known = frozenset({"architecture"})
    for text in ("see NOTES.md", "NOTES §4", "(NOTES.md \\u00a74)", "NOTES§5"):
        assert documents_outside(text, known) != [], text
    assert documents_outside("see architecture.md, architecture §2", known) == []
    assert documents_outside("NOTESERS = ('notes',)", known) == []


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.M | re.S)
    return frozenset(slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M))


LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("doc", MARKDOWN, ids=rel)
def test_relative_links_resolve_inside_the_repository(doc: Path) -> None:
    broken = []
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        missing = not path.is_relative_to(ROOT) or not path.exists()
        if missing or (anchor and (path.suffix != ".md" or anchor not in anchors(path))):
            broken.append(target)
    assert broken == []


def test_slug_follows_github() -> None:
    assert slug("Embedders: local and OpenAI") == "embedders-local-and-openai"
    assert slug("The engine: exact incremental top-k (engine.py)") == (
        "the-engine-exact-incremental-top-k-enginepy"
    )


# --- module names in the text -----------------------------------------------------------

PATH_REF = re.compile(r"(?:src/)?(?:core|handlers|tooling)(?:/\w+)*/\w+\.(?:py|sql)")
DOTTED_REF = re.compile(r"(?:core|handlers|tooling)(?:\.\w+)+")
TEST_REF = re.compile(r"(?:tests/(?:\w+/)*)?test_\w+\.py")


@cache
def top_level_names(module: Path) -> frozenset[str]:
    names: set[str] = set()
    for node in ast.parse(module.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return frozenset(names)


def reference_exists(ref: str) -> bool:
    """`core/x/y.py`, `src/core/x.py`, `core.x.y`, `core.x.y.name` name something real."""
    if PATH_REF.fullmatch(ref):
        return (SRC / ref.removeprefix("src/")).is_file()
    if TEST_REF.fullmatch(ref):  # a bare test file name: somewhere under tests/
        return (ROOT / ref).is_file() if "/" in ref else any((ROOT / "tests").rglob(ref))
    parts = ref.split(".")
    for cut in range(len(parts), 0, -1):
        base = SRC.joinpath(*parts[:cut])
        module = base.with_suffix(".py") if base.with_suffix(".py").is_file() else None
        if module is None and (base / "__init__.py").is_file():
            module = base / "__init__.py"
        if module is not None:
            rest = parts[cut:]
            return not rest or (len(rest) <= 2 and rest[0] in top_level_names(module))
    return False


def module_references(text: str) -> list[str]:
    spans = re.findall(r"`([^`\n]+)`", text)
    return [s for s in spans if any(p.fullmatch(s) for p in (PATH_REF, DOTTED_REF, TEST_REF))]


@pytest.mark.parametrize("doc", MARKDOWN, ids=rel)
def test_module_references_exist(doc: Path) -> None:
    missing = [
        r for r in module_references(doc.read_text(encoding="utf-8")) if not reference_exists(r)
    ]
    assert missing == []


def test_module_reference_check_can_fail() -> None:
    text = (
        "`core/embedder.py`, `core.db`, `core.aws.local_invoke`, `src/core/settings.py`, `x.y`,"
        " `test_nothing_here.py`, `tests/unit/test_docs.py`"
    )
    refs = module_references(text)
    assert refs == [
        "core/embedder.py",
        "core.db",
        "core.aws.local_invoke",
        "src/core/settings.py",
        "test_nothing_here.py",
        "tests/unit/test_docs.py",
    ]
    assert [reference_exists(r) for r in refs] == [False, False, True, True, False, True]
    assert not reference_exists("core.aws.no_such_name")
    assert reference_exists("core.data.sql")  # a package


def test_architecture_layout_names_every_module() -> None:
    layout = section(ARCHITECTURE.read_text(encoding="utf-8"), "Layout")
    modules = [
        p for p in SRC.rglob("*.py") if p.name != "__init__.py" and "egg-info" not in p.as_posix()
    ]
    assert len(modules) > 30
    missing = [rel(p) for p in modules if not re.search(rf"\b{re.escape(p.name)}\b", layout)]
    assert missing == []
