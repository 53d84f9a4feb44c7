"""Build the sdist and the wheel as a release would, and check what they hold.

Run by `./run-tests -e package` (tox.ini), with build and twine installed:

1. ``python -m build``: the sdist, then the wheel built from the sdist;
2. ``twine check --strict``: the metadata PyPI shows;
3. the sdist holds every file git tracks (tests, docs, tox.ini, run-tests...);
4. the wheel holds exactly the checkout's mailer package (migrations and
   py.typed included) and nothing else;
5. in a fresh virtualenv with the wheel alone installed (no extras), mailer
   imports from site-packages, the test requirements are absent, and a
   minimal project runs ``check``, ``migrate --plan``, ``migrate``,
   ``makemigrations --check`` and ``send_mail``.
"""

import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST_ONLY_MODULES = ["aiosmtpd", "pytest", "pytest_django", "hypothesis", "anymail", "psycopg", "MySQLdb"]

# Runs in the fresh virtualenv, isolated (-I) and outside the checkout.
SMOKE_TEST = """
import importlib.metadata
import importlib.util
import io
import sys
from pathlib import Path

import django
from django.conf import settings
from django.core.management import call_command

work, expected_migrations, test_only = Path(sys.argv[1]), sys.argv[2].split(","), sys.argv[3].split(",")

import mailer

where = Path(mailer.__file__).resolve()
assert Path(sys.prefix).resolve() in where.parents, f"mailer imported from {where}, not from the virtualenv"
assert importlib.metadata.version("django-mailer-ng") == mailer.__version__
assert (where.parent / "py.typed").is_file(), "py.typed is not installed"
present = [name for name in test_only if importlib.util.find_spec(name) is not None]
assert not present, f"test requirements installed with the wheel alone: {present}"

settings.configure(
    INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "mailer"],
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": str(work / "db.sqlite3")}},
    DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
    USE_TZ=True,
    MAILER_LOCK_PATH=str(work / "send_mail"),
    MAILER_EMAIL_BACKEND="django.core.mail.backends.locmem.EmailBackend",
)
django.setup()
call_command("check", fail_level="WARNING")

plan = io.StringIO()
call_command("migrate", "mailer", plan=True, stdout=plan)
missing = [name for name in expected_migrations if f"mailer.{name}" not in plan.getvalue()]
assert not missing, f"migrations missing from the wheel: {missing}\\n{plan.getvalue()}"
call_command("migrate", verbosity=0)
call_command("makemigrations", "mailer", check=True, dry_run=True, verbosity=0)

mailer.send_mail("Subject", "Body", "from@example.com", ["to@example.com"])
call_command("send_mail", verbosity=0)
from mailer.models import Message, MessageLog

assert not Message.objects.exists() and MessageLog.objects.count() == 1, "the queued message was not sent"
print(f"mailer {mailer.__version__} from {where.parent}: imports, {len(expected_migrations)} migrations, sends")
"""


def run(*command, **kwargs):
    shown = ("<script>" if "\n" in str(part) else str(part) for part in command)
    print("$", " ".join(shown), flush=True)
    return subprocess.run([str(part) for part in command], check=True, **kwargs)


def fail(message):
    sys.exit(f"check-wheel: {message}")


def tracked_files():
    """The files git tracks that are in the work tree (None outside a git checkout)."""
    try:
        listing = subprocess.run(
            ["git", "-C", str(ROOT), "ls-files", "-z"], check=True, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return {name for name in listing.split("\0") if name and (ROOT / name).is_file()}


def package_files():
    """Every file of the checkout's mailer package: all belong in the wheel."""
    return {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "mailer").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix not in {".pyc", ".pyo"}
    }


def check_sdist(sdist):
    with tarfile.open(sdist) as archive:
        top = f"{archive.getnames()[0].split('/')[0]}/"
        members = {name.removeprefix(top) for name in archive.getnames()}
    wanted = tracked_files()
    if wanted is None:
        print("not a git checkout: the sdist's contents are not compared with it")
        wanted = {"tox.ini", "run-tests", "tests/conftest.py", "docs/conf.py", "mailer/py.typed"}
    missing = sorted(wanted - members - {".gitignore"})
    if missing:
        fail(f"{sdist.name} lacks {len(missing)} tracked files (MANIFEST.in): {', '.join(missing)}")
    print(f"{sdist.name}: {len(members)} entries, every tracked file included")


def check_wheel(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    dist_info = {name for name in names if name.split("/")[0].endswith(".dist-info")}
    package = names - dist_info
    wanted = package_files()
    if package != wanted:
        fail(
            f"{wheel.name} does not hold exactly the checkout's mailer package (package-data?):\n"
            f"  missing: {sorted(wanted - package)}\n  unexpected: {sorted(package - wanted)}"
        )
    print(f"{wheel.name}: the {len(package)} files of the mailer package, py.typed and migrations included")


def main():
    work = Path(tempfile.mkdtemp(prefix="mailer-check-wheel-"))
    dist = work / "dist"
    run(sys.executable, "-m", "build", "--outdir", dist, ROOT, stdout=subprocess.DEVNULL)
    sdists, wheels = sorted(dist.glob("*.tar.gz")), sorted(dist.glob("*.whl"))
    if len(sdists) != 1 or len(wheels) != 1:
        fail(f"expected one sdist and one wheel in {dist}, found {[p.name for p in dist.iterdir()]}")
    run(sys.executable, "-m", "twine", "check", "--strict", sdists[0], wheels[0])
    check_sdist(sdists[0])
    check_wheel(wheels[0])

    venv = work / "venv"
    run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    run(python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", wheels[0])
    migrations = sorted(path.stem for path in (ROOT / "mailer" / "migrations").glob("0*.py"))
    run(python, "-I", "-c", SMOKE_TEST, work, ",".join(migrations), ",".join(TEST_ONLY_MODULES), cwd=work)
    shutil.rmtree(work)
    print("check-wheel: OK")


if __name__ == "__main__":
    main()
