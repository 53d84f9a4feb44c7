#!/usr/bin/env python
"""The demo site's ``manage.py``: ``demo.py`` runs ``manage.py send_mail`` with it, as cron would."""

import os
import sys

if __name__ == "__main__":
    # Python puts this directory first on sys.path, so "settings" is demo/settings.py.
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
