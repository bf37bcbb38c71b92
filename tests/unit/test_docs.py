"""Docs that must follow the code: every EPCOMM_* variable the code reads or sets is in docs/TROUBLESHOOTING.md."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_environment_variable_is_documented():
    used = set()
    for d in ("epcomm", "launch"):
        for p in (ROOT / d).rglob("*.py"):
            used |= set(re.findall(r"\bEPCOMM_[A-Z_]+[A-Z]\b", p.read_text()))
    documented = set(re.findall(r"\bEPCOMM_[A-Z_]+[A-Z]\b", (ROOT / "docs" / "TROUBLESHOOTING.md").read_text()))
    assert used, "no EPCOMM_ variable found: the scan is broken"
    assert used <= documented, f"not in docs/TROUBLESHOOTING.md: {sorted(used - documented)}"
