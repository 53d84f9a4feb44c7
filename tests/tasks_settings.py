"""Settings for ``tests/manage.py`` processes of a site that sends its queue with a Tasks worker.

Those of ``tests.process_settings`` (the database, the SMTP server, read
from the environment), plus django-tasks-db's database backend as the
``default`` Tasks backend, and ``MAILER_TASK_BACKEND`` pointing at it: queued
mail is sent by ``manage.py db_worker``, without cron. On Django 5.2 the
Tasks framework is the django-tasks backport, an app of its own.
"""

import django

from tests.process_settings import *  # noqa: F403
from tests.process_settings import INSTALLED_APPS

INSTALLED_APPS = [*INSTALLED_APPS, "django_tasks_db"]
if django.VERSION < (6, 0):
    INSTALLED_APPS.append("django_tasks")

TASKS = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend"}}
MAILER_TASK_BACKEND = "default"
