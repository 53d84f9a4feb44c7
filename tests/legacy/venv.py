"""A cached virtualenv with the real django-mailer 2.3.2, and a way to run code in it.

The original package and this project are both called ``mailer``, so the
original can only run in a separate process whose ``sys.path`` cannot reach
this repository. The virtualenv is made with the test's own interpreter, so
the pickles it writes are read by the same Python version that wrote them,
as on a real site that upgrades the package but not Python.

It is built once per Python version and per requirement set (one per
database vendor: the PostgreSQL and MariaDB ones hold that vendor's driver),
in a cache folder outside the work tree, and reused by later runs. Two runs
may build it at the same time: each builds in a private temporary folder and
publishes it with one ``rename``; the loser throws its copy away and uses
the winner's.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

# Django 5.0 is the newest Django that django-mailer 2.3.2 supports; pip
# picks the newest release below 5.1 that installs on this Python.
REQUIREMENTS = ("django-mailer==2.3.2", "Django>=4.2,<5.1")

# The database driver the legacy site needs on each vendor, in the versions
# Django 5.0 supports. mysqlclient is built from source (a C compiler,
# pkg-config and libmariadb-dev, which .ci/start-databases installs).
DRIVERS = {
    "sqlite": (),
    "postgresql": ("psycopg[binary]>=3.1.8",),
    "mysql": ("mysqlclient>=1.4.3",),
}

# What the probe asks for when the venv cannot be built: one small file.
PROBE_REQUIREMENT = "django-mailer==2.3.2"

READY_FILE = "mailer-legacy-venv.json"

# Variables that could make the legacy process see this repository or this
# project's settings.
_LEAKY_VARIABLES = (
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONSTARTUP",
    "PYTHONSAFEPATH",
    "VIRTUAL_ENV",
    "DJANGO_SETTINGS_MODULE",
)


class LegacyVenvUnavailable(Exception):
    """The virtualenv could not be made (no network, PyPI down, pip failed).

    ``index_problem`` says why pip cannot reach the package index when that
    is the cause, and is None for any other failure.
    """

    def __init__(self, message: str, index_problem: str | None = None) -> None:
        super().__init__(message)
        self.index_problem = index_problem


def run_must_be_complete() -> bool:
    """Tell whether this run must be complete (CI), so that an unreachable PyPI is a failure, not a skip."""
    ci = os.environ.get("CI", "").strip().lower()
    return os.environ.get("MAILER_TEST_REQUIRE_DB") == "1" or ci not in ("", "0", "false", "no")


def requirements(vendor: str = "sqlite") -> tuple[str, ...]:
    """What the legacy venv for a database vendor holds: django-mailer 2.3.2, its Django, the vendor's driver."""
    return REQUIREMENTS + DRIVERS[vendor]


def cache_root() -> Path:
    """Where the virtualenvs live: ``$MAILER_TEST_CACHE_DIR``, else ``$XDG_CACHE_HOME`` or ``~/.cache``."""
    if os.environ.get("MAILER_TEST_CACHE_DIR"):
        return Path(os.environ["MAILER_TEST_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mailer-tests"


def venv_dir(vendor: str = "sqlite") -> Path:
    """The cache folder for this interpreter: named by Python version, plus a digest of what it holds.

    The digest covers the requirements and the base interpreter, so changing
    either gets a new folder instead of replacing one another run may be using.
    """
    version = f"py{sys.version_info.major}.{sys.version_info.minor}"
    key = json.dumps([requirements(vendor), _base_interpreter()]).encode()
    return cache_root() / f"legacy-venv-{version}-{hashlib.sha256(key).hexdigest()[:10]}"


def _base_interpreter() -> str:
    return os.path.realpath(getattr(sys, "_base_executable", sys.executable))


def python_of(venv: Path) -> Path:
    if os.name == "nt":
        return venv / "Scripts" / "python.exe"
    return venv / "bin" / "python"


def clean_environment(**extra: str) -> dict[str, str]:
    """The environment for processes of the legacy venv: ours, without anything pointing at this repository."""
    env = {name: value for name, value in os.environ.items() if name not in _LEAKY_VARIABLES}
    env.update(extra)
    return env


def ensure_legacy_venv(vendor: str = "sqlite") -> tuple[Path, dict]:
    """Return the python of a ready virtualenv for ``vendor`` and what it holds, building the venv if needed.

    Raises ``LegacyVenvUnavailable`` when it cannot be built.
    """
    final = venv_dir(vendor)
    info = _check(final)
    if info is not None:
        return python_of(final), info
    if final.exists():
        # Broken (say, its base interpreter is gone): move it aside, then rebuild.
        _discard(final)

    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(final)
        building = Path(tempfile.mkdtemp(prefix=f"{final.name}.building-", dir=final.parent))
        os.chmod(building, 0o755)  # noqa: S103 -- mkdtemp makes it private; the cache is not secret
    except OSError as exc:
        raise LegacyVenvUnavailable(f"cannot write the cache (set MAILER_TEST_CACHE_DIR): {exc}") from exc
    try:
        try:
            info = _build(building, requirements(vendor))
        except LegacyVenvUnavailable as exc:
            if not python_of(building).exists():
                raise  # not even the venv could be made: nothing to do with the network
            raise LegacyVenvUnavailable(str(exc), package_index_problem(python_of(building))) from exc
        try:
            os.rename(building, final)
        except OSError:
            # Another run published first; use its venv if it is sound.
            info = _check(final)
            if info is None:
                raise LegacyVenvUnavailable(f"{final} appeared while building, but is not usable") from None
        return python_of(final), info
    finally:
        if building.exists():
            shutil.rmtree(building, ignore_errors=True)


def _build(target: Path, wanted: tuple[str, ...]) -> dict:
    """Make the venv in ``target`` and install ``wanted``; return what it holds."""
    env = clean_environment()
    _run([sys.executable, "-m", "venv", str(target)], "creating the virtualenv", env, timeout=300)
    _run(
        [
            str(python_of(target)),
            "-m",
            "pip",
            "install",
            "--no-input",
            "--disable-pip-version-check",
            "--timeout",
            "30",
            "--retries",
            "2",
            *wanted,
        ],
        f"pip install {' '.join(wanted)}",
        env,
        timeout=600,
    )
    info = _describe(target)
    if info is None:
        raise LegacyVenvUnavailable(f"the virtualenv in {target} was built but cannot import mailer and django")
    (target / READY_FILE).write_text(json.dumps(info, indent=1))
    return info


def _run(command: list[str], what: str, env: dict[str, str], timeout: float) -> None:
    try:
        result = subprocess.run(
            command, env=env, cwd=tempfile.gettempdir(), capture_output=True, text=True, timeout=timeout
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LegacyVenvUnavailable(f"{what} failed: {exc}") from exc
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-8:])
        raise LegacyVenvUnavailable(f"{what} failed (exit {result.returncode}):\n{tail}")


def _check(venv: Path) -> dict | None:
    """Return what a published venv holds, or None if it is missing or does not work."""
    if not (venv / READY_FILE).is_file():
        return None
    return _describe(venv)


def _describe(venv: Path) -> dict | None:
    """Ask the venv's python which mailer and Django it imports, from outside this repository."""
    code = (
        "import json, django, mailer; print(json.dumps({'mailer': mailer.__version__, 'django': django.get_version()}))"
    )
    try:
        result = subprocess.run(
            [str(python_of(venv)), "-I", "-c", code],
            env=clean_environment(),
            cwd=tempfile.gettempdir(),
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    info = json.loads(result.stdout)
    return info if info.get("mailer") == "2.3.2" else None


def _remove_leftovers(final: Path, older_than: float = 3600) -> None:
    """Delete copies that killed runs left half-built or discarded; recent ones may still be building."""
    for path in final.parent.glob(f"{final.name}.*-*"):
        try:
            if time.time() - path.stat().st_mtime > older_than:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def _discard(venv: Path) -> None:
    aside = venv.with_name(f"{venv.name}.stale-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(venv, aside)
    except OSError:
        return  # someone else moved or replaced it
    shutil.rmtree(aside, ignore_errors=True)


def package_index_problem(python: Path) -> str | None:
    """Say why ``python``'s pip cannot download from the package index (PyPI), or None if it can.

    Asked after the venv failed to build, to tell "PyPI is unreachable" (a
    skip is acceptable on a developer's machine) from every other failure
    (never a skip). It asks the same pip, with the user's pip configuration
    (index, proxy, certificates), for one small file.
    """
    with tempfile.TemporaryDirectory(prefix="mailer-pypi-probe-") as folder:
        command = [
            str(python),
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-cache-dir",
            "--no-input",
            "--disable-pip-version-check",
            "--timeout",
            "15",
            "--retries",
            "1",
            "--dest",
            folder,
            PROBE_REQUIREMENT,
        ]
        try:
            result = subprocess.run(
                command, env=clean_environment(), cwd=folder, capture_output=True, text=True, timeout=120
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"pip download {PROBE_REQUIREMENT} failed: {exc}"
        if result.returncode != 0:
            tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-4:])
            return f"pip download {PROBE_REQUIREMENT} failed (exit {result.returncode}):\n{tail}"
    return None


def run_legacy(
    python: Path, script: Path, *args: str, cwd: Path, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``script`` with the legacy python in isolated mode (``-I``), from ``cwd``, with ``env`` added.

    ``-I`` keeps the script's folder, the working directory, PYTHONPATH and
    the user's site-packages off ``sys.path``; the clean environment and a
    ``cwd`` outside the repository are a second guard.
    """
    return subprocess.run(
        [str(python), "-I", str(script), *args],
        env=clean_environment(PYTHONIOENCODING="utf-8", **(env or {})),
        cwd=str(cwd),
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=timeout,
    )
