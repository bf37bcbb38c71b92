"""epcomm's tests; a package so that workers import shared helpers by name (tests.compat.deepep_checks)."""
