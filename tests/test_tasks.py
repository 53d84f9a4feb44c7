"""Queued mail is sent by a Tasks worker as soon as the transaction that queued it commits (``mailer.tasks``).

With ``MAILER_TASK_BACKEND`` set, every way into the queue enqueues
``mailer.tasks.send_queued_mail`` after the commit: once per transaction,
never for one rolled back. The first tests run the task at once, with the
framework's ``ImmediateBackend``, in this process; the last ones run
django-tasks-db's ``db_worker`` as a real process, delivering to a real SMTP
server, as a site without cron would.

The Tasks framework is ``django.tasks`` on Django 6.0+ and the django-tasks
backport before; they are in the ``test`` extra, so CI (``CI`` set) fails
rather than skips without them.
"""

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import suppress
from importlib import import_module
from importlib.util import find_spec

import pytest
from django.core.mail import EmailMessage
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db import transaction

import mailer
from mailer import tasks
from mailer.backend import DbBackend
from mailer.engine import send_all
from mailer.exceptions import ConfigurationError
from mailer.models import Message
from tests.processes import MANAGE_PY, fresh_database, manage, process_environment

FRAMEWORK = next((name for name in tasks.FRAMEWORKS if find_spec(name) is not None), None)
HAS_DB_WORKER = FRAMEWORK is not None and find_spec("django_tasks_db") is not None
# On CI the packages are installed (the test extra): a missing one is a failure there, not a skip.
REQUIRED = bool(os.environ.get("CI"))

needs_framework = pytest.mark.skipif(
    FRAMEWORK is None and not REQUIRED,
    reason="no Tasks framework: Django 5.2 without the django-tasks package (pip install 'django-mailer-ng[tasks]')",
)
needs_db_worker = pytest.mark.skipif(
    not HAS_DB_WORKER and not REQUIRED,
    reason="django-tasks-db (and on Django 5.2 django-tasks) not installed (pip install 'django-mailer-ng[tasks]')",
)

TASK_PATH = "mailer.tasks.send_queued_mail"


class Boom(Exception):
    pass


@pytest.fixture
def immediate_tasks(settings, deliver_to_smtp):
    """Run mailer's task as soon as it is enqueued, in this process; deliver to the SMTP server (returned)."""
    settings.TASKS = {"default": {"BACKEND": f"{FRAMEWORK}.backends.immediate.ImmediateBackend"}}
    settings.MAILER_TASK_BACKEND = "default"
    return deliver_to_smtp


@pytest.fixture
def enqueued():
    """The path of every task enqueued during the test, in order (the framework's ``task_enqueued`` signal)."""
    task_enqueued = import_module(f"{FRAMEWORK}.signals").task_enqueued
    paths: list[str] = []

    def record(sender, task_result, **kwargs):
        paths.append(task_result.task.module_path)

    task_enqueued.connect(record)
    yield paths
    task_enqueued.disconnect(record)


def queue(subject: str, to: str = "ada@example.com") -> None:
    assert mailer.send_mail(subject, "Body", "site@example.com", [to]) == 1


def subjects(server) -> list[str]:
    return [received.message["Subject"] for received in server.received]


def queued() -> list[str]:
    return sorted(message.subject for message in Message.objects.all())


@needs_framework
@pytest.mark.django_db(transaction=True)
def test_mail_queued_outside_a_transaction_is_sent_at_once(immediate_tasks, enqueued):
    queue("Welcome")

    assert subjects(immediate_tasks) == ["Welcome"]
    assert immediate_tasks.received[0].rcpt_tos == ["ada@example.com"]
    assert queued() == []
    assert enqueued == [TASK_PATH]


WAYS_IN = {
    "send_mail": lambda: mailer.send_mail("Way in", "Body", "site@example.com", ["ada@example.com"]),
    "send_html_mail": lambda: mailer.send_html_mail("Way in", "B", "<p>B</p>", "site@example.com", ["ada@example.com"]),
    "send_mass_mail": lambda: mailer.send_mass_mail([("Way in", "Body", "site@example.com", ["ada@example.com"])]),
    "DbBackend": lambda: DbBackend().send_messages(
        [EmailMessage("Way in", "Body", "site@example.com", ["ada@example.com"])]
    ),
}


@needs_framework
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("way_in", WAYS_IN)
def test_every_way_into_the_queue_has_the_mail_sent(immediate_tasks, enqueued, way_in):
    """Django's own send_mail and EmailMessage.send() reach the queue through DbBackend."""
    assert WAYS_IN[way_in]() == 1

    assert subjects(immediate_tasks) == ["Way in"]
    assert enqueued == [TASK_PATH]


@needs_framework
@pytest.mark.django_db(transaction=True)
def test_mail_queued_in_a_transaction_is_sent_only_after_it_commits(immediate_tasks, enqueued):
    """A worker that looked before the commit would not see the rows, and the mail would wait for cron."""
    with transaction.atomic():
        queue("Order confirmed")
        mailer.send_html_mail("Receipt", "Body", "<p>Body</p>", "site@example.com", ["ada@example.com"])
        assert enqueued == []
        assert immediate_tasks.received == []

    assert sorted(subjects(immediate_tasks)) == ["Order confirmed", "Receipt"]
    assert queued() == []


@needs_framework
@pytest.mark.django_db(transaction=True)
def test_a_rolled_back_transaction_enqueues_nothing(settings, immediate_tasks, enqueued):
    settings.MAILER_TASK_BACKEND = None
    queue("Left for cron")  # queued before the feature is on: only a pass would send it
    settings.MAILER_TASK_BACKEND = "default"

    with pytest.raises(Boom), transaction.atomic():
        queue("Never")
        raise Boom

    assert enqueued == []
    assert immediate_tasks.received == []
    assert queued() == ["Left for cron"]


@needs_framework
@pytest.mark.django_db(transaction=True)
def test_one_transaction_enqueues_one_task_for_all_its_mail(immediate_tasks, enqueued):
    with transaction.atomic():
        for number in range(3):
            queue(f"Single {number}")
        mailer.send_mass_mail([(f"Mass {n}", "Body", "site@example.com", ["bob@example.com"]) for n in range(2)])
        DbBackend().send_messages([EmailMessage("Through Django", "Body", "site@example.com", ["cy@example.com"])])

    assert enqueued == [TASK_PATH]
    assert len(immediate_tasks.received) == 6
    assert immediate_tasks.connections == 1  # one pass sent them all
    assert queued() == []


@needs_framework
@pytest.mark.django_db(transaction=True)
def test_a_rolled_back_savepoint_does_not_take_the_task_of_the_mail_queued_after_it(immediate_tasks, enqueued):
    """Had the task been asked for only once, in the savepoint, it would go with it, and "Kept" would wait."""
    with transaction.atomic():
        with suppress(Boom), transaction.atomic():
            queue("Dropped")
            raise Boom
        queue("Kept")

    assert subjects(immediate_tasks) == ["Kept"]
    assert enqueued == [TASK_PATH]


@needs_framework
@pytest.mark.django_db(transaction=True)
def test_mail_queued_in_a_savepoint_shares_the_task_of_the_transaction(immediate_tasks, enqueued):
    with transaction.atomic():
        queue("First")
        with transaction.atomic():
            queue("Second")

    assert sorted(subjects(immediate_tasks)) == ["First", "Second"]
    assert enqueued == [TASK_PATH]


@needs_framework
@pytest.mark.django_db(transaction=True)
def test_without_the_setting_mail_waits_for_cron(settings, immediate_tasks, enqueued):
    settings.MAILER_TASK_BACKEND = None

    queue("Cron's")

    assert enqueued == []
    assert immediate_tasks.received == []
    assert queued() == ["Cron's"]


@needs_framework
@pytest.mark.django_db(transaction=True)
def test_a_backend_that_cannot_take_the_task_does_not_fail_the_caller_and_cron_still_sends(
    settings, immediate_tasks, enqueued, caplog
):
    """The mail is in the queue whatever the Tasks backend does: a warning says so, and the next pass sends it."""
    settings.MAILER_TASK_BACKEND = "mail"  # not (or no longer) a backend of TASKS

    with transaction.atomic():
        queue("Still queued")

    assert enqueued == []
    [warning] = [record for record in caplog.records if record.name == "mailer.tasks"]
    assert warning.levelname == "WARNING"
    assert "'mail'" in warning.getMessage()
    assert "the mail stays queued" in warning.getMessage()
    assert queued() == ["Still queued"]

    send_all()  # cron's send_mail

    assert subjects(immediate_tasks) == ["Still queued"]


@pytest.mark.django_db(transaction=True)
def test_without_a_tasks_framework_the_setting_is_a_configuration_error(settings, monkeypatch):
    """As on Django 5.2 without django-tasks (simulated: the suite installs it): said at start-up and when queueing."""
    monkeypatch.setattr(tasks, "FRAMEWORKS", ("django_tasks_not_installed",))
    settings.MAILER_TASK_BACKEND = "default"

    with pytest.raises(SystemCheckError, match=r"(?s)mailer\.E009.*django-tasks"):
        call_command("check")
    with pytest.raises(ConfigurationError, match="MAILER_TASK_BACKEND is set, but there is no Tasks framework"):
        queue("Hello")

    settings.MAILER_TASK_BACKEND = None
    queue("Hello")  # without the setting, no framework is needed
    call_command("check")


@needs_framework
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("value", [True, "", ["default"]])
def test_a_setting_that_is_not_an_alias_is_a_configuration_error(settings, value):
    settings.MAILER_TASK_BACKEND = value

    with pytest.raises(SystemCheckError, match=r"mailer\.E009.*MAILER_TASK_BACKEND must be None or the alias"):
        call_command("check")
    with pytest.raises(ConfigurationError, match="MAILER_TASK_BACKEND must be None or the alias"):
        queue("Hello")


@needs_framework
def test_the_check_names_a_backend_missing_from_tasks_and_a_queue_it_does_not_serve(settings):
    settings.TASKS = {"default": {"BACKEND": f"{FRAMEWORK}.backends.immediate.ImmediateBackend", "QUEUES": ["mail"]}}
    settings.MAILER_TASK_BACKEND = "default"

    with pytest.raises(SystemCheckError, match=r"mailer\.E009.*[Qq]ueue"):
        call_command("check")
    settings.MAILER_TASK_QUEUE = "mail"
    call_command("check")  # passes

    settings.MAILER_TASK_BACKEND = "elsewhere"
    with pytest.raises(SystemCheckError, match=r"mailer\.E009.*elsewhere"):
        call_command("check")


# A site without cron: django-tasks-db's worker as a real process -------------


def site(*args: str, db, smtp_port: int | None = None, lock_path, timeout: float = 60):
    """Run ``manage.py *args`` of the Tasks site (``tests.tasks_settings``); return the CompletedProcess."""
    return manage(
        *args,
        db=db,
        smtp_port=smtp_port,
        timeout=timeout,
        DJANGO_SETTINGS_MODULE="tests.tasks_settings",
        MAILER_PROCESS_LOCK_PATH=str(lock_path),
    )


def in_site(code: str, *, db, lock_path) -> str:
    """Run Python ``code`` in a ``manage.py shell`` of the Tasks site, as a view would run it; return its output."""
    result = site(
        "shell", "-c", f"import json, mailer\nfrom django.db import transaction\n{code}", db=db, lock_path=lock_path
    )
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


def task_statuses(db, lock_path) -> list[str]:
    output = in_site(
        "from django_tasks_db.models import DBTaskResult\n"
        "print(json.dumps(sorted(DBTaskResult.objects.values_list('status', flat=True))))",
        db=db,
        lock_path=lock_path,
    )
    return json.loads(output.strip().splitlines()[-1])


def queue_size(db) -> int:
    [(count,)] = db.query("SELECT COUNT(*) FROM mailer_message")
    return count


def wait_for(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.fixture
def tasks_db(tmp_path):
    """A database of the Tasks site, with mailer's tables and django-tasks-db's."""
    with fresh_database(tmp_path, "tasks") as db:
        result = site("migrate", "-v", "0", db=db, lock_path=tmp_path / "send_mail")
        assert result.returncode == 0, result.stderr
        yield db


@pytest.fixture
def start_worker(tmp_path, smtp_server, tasks_db):
    """Start ``manage.py db_worker`` on the Tasks site; every worker started is stopped (SIGTERM) at the end."""
    workers: list[subprocess.Popen] = []

    def start(*options: str) -> subprocess.Popen:
        env = process_environment(
            tasks_db,
            smtp_server.port,
            DJANGO_SETTINGS_MODULE="tests.tasks_settings",
            MAILER_PROCESS_LOCK_PATH=str(tmp_path / "send_mail"),
        )
        command = ["db_worker", "--interval", "0.1", "--no-startup-delay", "--no-reload", *options]
        worker = subprocess.Popen(
            [sys.executable, "-W", "error::DeprecationWarning", str(MANAGE_PY), *command],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
        try:
            worker.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.communicate()


@needs_db_worker
@pytest.mark.slow
def test_the_db_worker_sends_mail_queued_by_the_site_without_cron(tmp_path, smtp_server, tasks_db, start_worker):
    worker = start_worker()
    lock_path = tmp_path / "send_mail"

    in_site(
        "with transaction.atomic():\n"
        "    for n in range(3):\n"
        "        mailer.send_mail(f'Order {n}', 'Body', 'site@example.com', ['ada@example.com'])",
        db=tasks_db,
        lock_path=lock_path,
    )
    wait_for(lambda: len(smtp_server.received) == 3)

    assert sorted(subjects(smtp_server)) == ["Order 0", "Order 1", "Order 2"], worker.poll()
    wait_for(lambda: task_statuses(tasks_db, lock_path) == ["SUCCESSFUL"], timeout=30)
    assert task_statuses(tasks_db, lock_path) == ["SUCCESSFUL"]  # one task for the transaction's three messages
    assert queue_size(tasks_db) == 0

    worker.send_signal(signal.SIGTERM)
    _, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err
    assert "3 sent" in err  # the pass ran in the worker


@needs_db_worker
@pytest.mark.slow
def test_the_site_enqueues_no_task_for_a_rolled_back_transaction(tmp_path, smtp_server, tasks_db):
    lock_path = tmp_path / "send_mail"

    in_site(
        "with transaction.atomic():\n"
        "    mailer.send_mail('Never', 'Body', 'site@example.com', ['ada@example.com'])\n"
        "    transaction.set_rollback(True)",
        db=tasks_db,
        lock_path=lock_path,
    )

    assert task_statuses(tasks_db, lock_path) == []
    assert queue_size(tasks_db) == 0


@needs_db_worker
@pytest.mark.slow
def test_mail_queued_while_the_worker_is_down_is_sent_once_by_whichever_pass_comes_first(
    tmp_path, smtp_server, tasks_db, start_worker
):
    """The task waits in its queue; cron's pass sends the mail; the task, run later, finds nothing left to send."""
    lock_path = tmp_path / "send_mail"
    in_site(
        "mailer.send_mail('While down', 'Body', 'site@example.com', ['ada@example.com'])",
        db=tasks_db,
        lock_path=lock_path,
    )
    assert task_statuses(tasks_db, lock_path) == ["READY"]

    cron = site("send_mail", db=tasks_db, smtp_port=smtp_server.port, lock_path=lock_path)
    assert cron.returncode == 0, cron.stderr
    assert subjects(smtp_server) == ["While down"]

    worker = start_worker("--batch")  # runs what is waiting, then exits
    _, err = worker.communicate(timeout=60)

    assert worker.returncode == 0, err
    assert task_statuses(tasks_db, lock_path) == ["SUCCESSFUL"]
    assert subjects(smtp_server) == ["While down"]  # not twice
    assert "0 sent" in err


@needs_db_worker
@pytest.mark.slow
def test_a_tasks_backend_that_cannot_store_the_task_leaves_the_mail_to_cron(tmp_path, smtp_server, process_db):
    """``process_db`` has mailer's tables but not django-tasks-db's: enqueueing fails after the commit."""
    lock_path = tmp_path / "send_mail"

    output = in_site(
        "print('queued', mailer.send_mail('Unlucky', 'Body', 'site@example.com', ['ada@example.com']))",
        db=process_db,
        lock_path=lock_path,
    )

    assert "queued 1" in output  # the caller carried on
    assert "could not enqueue mailer's send_queued_mail task on the Tasks backend 'default'" in output
    assert queue_size(process_db) == 1
    cron = site("send_mail", db=process_db, smtp_port=smtp_server.port, lock_path=lock_path)
    assert cron.returncode == 0, cron.stderr
    assert subjects(smtp_server) == ["Unlucky"]
