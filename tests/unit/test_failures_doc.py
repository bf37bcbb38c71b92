"""docs/FAILURES.md stays true: every row of its failure tables names tests, and every named test exists."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "FAILURES.md"
REF = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def table_rows() -> list[str]:
    """The body rows of the tables above the "Planned" section (what the code does today)."""
    text = DOC.read_text().split("## Planned", 1)[0]
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith("| what fails")]
    assert len(rows) >= 10, "the failure tables are gone or the parse is broken"
    return rows


def test_every_row_names_the_tests_that_prove_it():
    for row in table_rows():
        proof = row.rstrip(" |").rsplit("|", 1)[-1]
        assert REF.search(proof), f"row without a test in its last column: {row[:100]}"


def test_every_named_test_exists():
    refs = REF.findall(DOC.read_text())
    assert refs
    for path, name in refs:
        f = ROOT / path
        assert f.is_file(), f"docs/FAILURES.md names {path}, which does not exist"
        assert re.search(rf"^\s*def {name}\(", f.read_text(), re.M), \
            f"docs/FAILURES.md names {path}::{name}: no such test"


FAILURE_TESTS = ("tests/mpi/test_rank_failure.py", "tests/mpi/test_refusals.py")


def test_every_failure_test_is_in_the_table():
    """A behaviour tested in the failure test files is a row (or part of one) of the table."""
    refs = REF.findall(DOC.read_text())
    for path in FAILURE_TESTS:
        named = {n for p, n in refs if p == path}
        tests = set(re.findall(r"^def (test_\w+)\(", (ROOT / path).read_text(), re.M))
        assert tests and tests <= named, f"{path}: not in docs/FAILURES.md: {sorted(tests - named)}"
