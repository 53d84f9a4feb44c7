"""The upgrade tests skip only when PyPI is out of reach, never for another failure to build the legacy venv.

``tests/test_upgrade.py`` needs a virtualenv with the real django-mailer
2.3.2, installed by pip. When pip cannot reach the package index the tests
may skip on a developer's machine (never under CI); any other failure, such
as requirements that cannot be met, must fail the run. Both cases are made
for real here: pip pointed at a closed port, and requirements no release
satisfies. Each builds a throwaway venv in the test's own cache folder.
"""

import os
import socket
import sys
from pathlib import Path

import pytest

from tests.legacy import venv
from tests.legacy.venv import LegacyVenvUnavailable, ensure_legacy_venv, run_must_be_complete

pytestmark = pytest.mark.slow


@pytest.fixture
def own_cache(monkeypatch, tmp_path):
    """A cache folder of the test's own, so the real cached venvs are neither used nor touched."""
    monkeypatch.setenv("MAILER_TEST_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def closed_port() -> int:
    """A port on loopback where nothing listens (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_package_index_is_reported_as_such(own_cache, monkeypatch):
    """pip pointed at a closed port, with no other index or local wheels: the error says the index is unreachable."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no configured mirrors or local wheel folders
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{closed_port()}/simple/")
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")

    with pytest.raises(LegacyVenvUnavailable, match=r"pip install django-mailer==2\.3\.2 .*failed") as failed:
        ensure_legacy_venv()

    assert failed.value.index_problem is not None
    assert "pip download django-mailer==2.3.2 failed" in failed.value.index_problem
    assert not venv.venv_dir().exists(), "a venv that failed to build must not be published"


def test_requirements_that_cannot_be_met_are_not_mistaken_for_a_network_problem(own_cache, monkeypatch):
    """pip reaches the index but cannot install: ``index_problem`` is None, so the upgrade tests fail, not skip.

    This needs the index itself, asked first and apart from the code under
    test: unreachable, the test skips on a developer's machine, as the upgrade
    tests do, and fails under CI.
    """
    problem = venv.package_index_problem(Path(sys.executable))
    if problem is not None:
        if run_must_be_complete():
            pytest.fail(f"the package index must be reachable under CI: {problem}", pytrace=False)
        pytest.skip(f"PyPI is unreachable: {problem}")
    monkeypatch.setitem(venv.DRIVERS, "sqlite", ("Django<1",))  # no release of Django installs on Python 3

    with pytest.raises(LegacyVenvUnavailable, match=r"pip install .*Django<1.* failed") as failed:
        ensure_legacy_venv()

    assert failed.value.index_problem is None
