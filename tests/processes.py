"""Run ``tests/manage.py`` as a real process against a database of its own and an SMTP server.

The database is on the vendor the suite runs on (``MAILER_TEST_DB``, see
``tests/settings.py``): a SQLite file, or a database of its own on the
PostgreSQL or MariaDB server, made for the test and dropped after it
(``ProcessDatabase``). The child process reads its settings from
``MAILER_PROCESS_DATABASE`` (``tests/process_settings.py``).
"""

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests import settings as test_settings

MANAGE_PY = Path(__file__).with_name("manage.py")

# The vendor of this run, as tests/settings.py reads it from MAILER_TEST_DB.
VENDOR = test_settings.DB_VENDOR


def manage(*args: str, db: "ProcessDatabase | Path", smtp_port: int | None = None, timeout: float = 60, **env: str):
    """Run ``manage.py *args`` to completion; return the CompletedProcess (output as text)."""
    return subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", str(MANAGE_PY), *args],
        env=process_environment(db, smtp_port, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def process_environment(db: "ProcessDatabase | Path", smtp_port: int | None = None, **extra: str) -> dict[str, str]:
    """The environment of a child ``manage.py``: ours, plus where its database and SMTP server are.

    ``db`` is a ``ProcessDatabase``, or the path of a SQLite file.
    """
    env = dict(os.environ)
    env.pop("DJANGO_SETTINGS_MODULE", None)
    database = db if isinstance(db, ProcessDatabase) else ProcessDatabase.sqlite(Path(db))
    env["MAILER_PROCESS_DATABASE"] = json.dumps(database.settings)
    if smtp_port is not None:
        env["MAILER_PROCESS_SMTP_PORT"] = str(smtp_port)
    env.update(extra)
    return env


@dataclass(frozen=True)
class ProcessDatabase:
    """A database that real processes share with the test: a SQLite file, or a database on the server.

    The test reads and writes it with the plain driver (``query``,
    ``execute``), as an operator would, never through Django's connection.
    SQL uses ``%s`` placeholders on every vendor.
    """

    vendor: str
    name: str  # the SQLite file's path, or the database's name on the server
    server: dict[str, Any] = field(default_factory=dict)  # HOST, PORT, USER, PASSWORD (not SQLite)
    options: dict[str, Any] = field(default_factory=dict)  # OPTIONS of the processes, over the suite's own

    @classmethod
    def sqlite(cls, path: Path) -> "ProcessDatabase":
        return cls("sqlite", str(path))

    @classmethod
    def create(cls, tmp_path: Path, label: str = "site") -> "ProcessDatabase":
        """Make an empty database on this run's vendor, named after the suite's own database and ``label``."""
        if VENDOR == "sqlite":
            return cls.sqlite(tmp_path / f"{label}.sqlite3")
        base = test_settings.DATABASES["default"]
        server = {key: base[key] for key in ("HOST", "PORT", "USER", "PASSWORD")}
        database = cls(VENDOR, f"{base['NAME']}_{label}_{uuid.uuid4().hex[:8]}", server)
        database._create()
        return database

    @property
    def settings(self) -> dict[str, Any]:
        """The database as an entry of Django's ``DATABASES``."""
        if self.vendor == "sqlite":
            return {"ENGINE": "django.db.backends.sqlite3", "NAME": self.name, "OPTIONS": {"timeout": 20}}
        settings = {"ENGINE": f"django.db.backends.{self.vendor}", "NAME": self.name, "CONN_MAX_AGE": 0, **self.server}
        if self.vendor == "mysql":
            settings["OPTIONS"] = {"charset": "utf8mb4"}
        else:  # the suite's own options (MAILER_TEST_PG_PREPARED): the processes connect as the tests do
            settings["OPTIONS"] = dict(test_settings.DATABASES["default"].get("OPTIONS", {}))
        settings["OPTIONS"] = {**settings.get("OPTIONS", {}), **self.options}
        return settings

    def copy(self, tmp_path: Path, label: str) -> "ProcessDatabase":
        """Make a new database holding the same tables and rows (the copy is dropped by its own ``drop``)."""
        if self.vendor == "sqlite":
            target = self.sqlite(tmp_path / f"{label}.sqlite3")
            shutil.copyfile(self.name, target.name)
            return target
        base = test_settings.DATABASES["default"]
        target = ProcessDatabase(self.vendor, f"{base['NAME']}_{label}_{uuid.uuid4().hex[:8]}", self.server)
        if self.vendor == "postgresql":
            # A template copy needs nobody connected to the source, which holds between tests.
            self._on_server(f'CREATE DATABASE "{target.name}" TEMPLATE "{self.name}"')
        else:
            target._create()
            self._copy_mysql_tables(target)
        return target

    def drop(self) -> None:
        if self.vendor == "sqlite":
            Path(self.name).unlink(missing_ok=True)
        elif self.vendor == "postgresql":
            # FORCE: a child process killed by a failing test may still be connected. An
            # autovacuum worker (the server's own role, which FORCE may not end) can be
            # visiting the new database: it is gone within moments, so try again.
            for attempt in range(20):
                try:
                    self._on_server(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
                    return
                except Exception as exc:
                    if "pg_signal_backend" not in str(exc) or attempt == 19:
                        raise
                    time.sleep(0.25)
        else:
            self._on_server(f"DROP DATABASE IF EXISTS `{self.name}`")

    def query(self, sql: str, *params: Any) -> list[tuple]:
        """Run one statement and return its rows (as tuples), closing the connection at once."""
        with closing(self._connect()) as connection:
            cursor = connection.cursor()
            cursor.execute(self._placeholders(sql), params)
            rows = [tuple(row) for row in cursor.fetchall()] if cursor.description else []
            connection.commit()
            return rows

    def execute(self, sql: str, *params: Any) -> None:
        """Run one statement that changes the database, and commit it."""
        self.query(sql, *params)

    def columns(self, table: str) -> set[str]:
        with closing(self._connect()) as connection:
            cursor = connection.cursor()
            cursor.execute(f"SELECT * FROM {table} WHERE 1 = 0")  # noqa: S608 -- our own table names
            names = {column[0] for column in cursor.description}
            connection.rollback()
            return names

    # The drivers ------------------------------------------------------------

    def _placeholders(self, sql: str) -> str:
        return sql.replace("%s", "?") if self.vendor == "sqlite" else sql

    def _connect(self):
        if self.vendor == "sqlite":
            return sqlite3.connect(self.name, timeout=20)
        return self._connect_server(self.name)

    def _connect_server(self, name: str | None):
        """A driver connection to the server, to database ``name`` (None: the server's maintenance one)."""
        host, user, password = self.server["HOST"], self.server["USER"], self.server["PASSWORD"]
        port = int(self.server["PORT"])
        if self.vendor == "postgresql":
            try:
                import psycopg as driver
            except ImportError:  # a site on psycopg2: the tests speak to the server with it too
                import psycopg2 as driver  # type: ignore[import-untyped,import-not-found,no-redef,unused-ignore]

            return driver.connect(
                host=host, port=port, user=user, password=password, dbname=name or "postgres", connect_timeout=10
            )
        import MySQLdb  # type: ignore[import-untyped,import-not-found,unused-ignore]  # no stubs

        options = {"database": name} if name else {}
        return MySQLdb.connect(
            host=host, port=port, user=user, password=password, charset="utf8mb4", connect_timeout=10, **options
        )

    def _on_server(self, *statements: str) -> None:
        """Run statements that cannot run in a transaction (CREATE/DROP DATABASE) on the server."""
        with closing(self._connect_server(None)) as connection:
            if self.vendor == "postgresql":
                connection.autocommit = True
            cursor = connection.cursor()
            for statement in statements:
                cursor.execute(statement)

    def _create(self) -> None:
        if self.vendor == "postgresql":
            self._on_server(f"CREATE DATABASE \"{self.name}\" ENCODING 'UTF8'")
        else:
            self._on_server(f"CREATE DATABASE `{self.name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")

    def _copy_mysql_tables(self, target: "ProcessDatabase") -> None:
        """Copy every table of this MySQL/MariaDB database, with its exact definition, keys and rows."""
        with closing(self._connect_server(target.name)) as connection:
            cursor = connection.cursor()
            cursor.execute(
                "SELECT table_name FROM information_schema.tables"
                " WHERE table_schema = %s AND table_type = 'BASE TABLE'",
                [self.name],
            )
            tables = [row[0] for row in cursor.fetchall()]
            cursor.execute("SET FOREIGN_KEY_CHECKS = 0")
            for table in tables:
                cursor.execute(f"SHOW CREATE TABLE `{self.name}`.`{table}`")
                definition = cursor.fetchone()[1]
                cursor.execute(definition)  # unqualified: made in the target, the connection's database
                cursor.execute(f"INSERT INTO `{table}` SELECT * FROM `{self.name}`.`{table}`")  # noqa: S608
            cursor.execute("SET FOREIGN_KEY_CHECKS = 1")
            connection.commit()


@contextmanager
def fresh_database(tmp_path: Path, label: str = "site") -> Iterator[ProcessDatabase]:
    """An empty database on this run's vendor for the duration of a test, dropped afterwards."""
    database = ProcessDatabase.create(tmp_path, label)
    try:
        yield database
    finally:
        database.drop()
