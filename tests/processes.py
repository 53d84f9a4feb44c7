"""Run ``tests/manage.py`` as a real process against a SQLite file and an SMTP server."""

import os
import subprocess
import sys
from pathlib import Path

MANAGE_PY = Path(__file__).with_name("manage.py")


def manage(*args: str, db: Path, smtp_port: int | None = None, timeout: float = 60, **env: str):
    """Run ``manage.py *args`` to completion; return the CompletedProcess (output as text)."""
    return subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", str(MANAGE_PY), *args],
        env=process_environment(db, smtp_port, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def process_environment(db: Path, smtp_port: int | None = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env["MAILER_PROCESS_DB"] = str(db)
    if smtp_port is not None:
        env["MAILER_PROCESS_SMTP_PORT"] = str(smtp_port)
    env.update(extra)
    return env
