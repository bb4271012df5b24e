"""Under CI=true a missing oracle (ModelOpt, compressed-tensors, transformers) fails the run; elsewhere the
tests that need it skip. Runs the project's real conftest.py in a scratch pytest project."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = (Path(__file__).parent / "conftest.py").read_text()

# A stand-in oracle from the standard library keeps the scratch runs fast (importing compressed_tensors takes
# ~10 s); the mechanism is the same for every name in ORACLES.
WITH_STANDIN_ORACLE = CONFTEST.replace('"transformers")', '"transformers", "email")')

NEEDS_MISSING_ORACLE = """
import pytest

def test_needs_oracle():
    pytest.importorskip("email.no_such_submodule_for_this_test")

def test_other_skip():
    pytest.skip("unrelated reason")
"""


@pytest.mark.parametrize("ci", ["true", ""])
def test_missing_oracle_import_fails_only_in_ci(pytester, monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    assert WITH_STANDIN_ORACLE != CONFTEST
    pytester.makeconftest(WITH_STANDIN_ORACLE)
    pytester.makepyfile(NEEDS_MISSING_ORACLE)
    result = pytester.runpytest("-p", "no:cacheprovider")
    if ci:
        result.assert_outcomes(failed=1, skipped=1)
        result.stdout.fnmatch_lines(["*oracle missing, not skipping*"])
    else:
        result.assert_outcomes(skipped=2)


@pytest.mark.parametrize("ci", ["true", ""])
def test_an_uninstalled_oracle_stops_the_ci_session(pytester, monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    assert 'ORACLES = ("modelopt", "compressed_tensors", "transformers")' in CONFTEST
    pytester.makeconftest(CONFTEST.replace('"transformers")', '"transformers", "no_such_oracle_package")'))
    pytester.makepyfile("def test_ok():\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    if ci:
        assert result.ret != 0
        assert "no_such_oracle_package are not installed" in result.stderr.str() + result.stdout.str()
    else:
        result.assert_outcomes(passed=1)
