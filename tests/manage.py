#!/usr/bin/env python
"""``manage.py`` for tests that run the commands as real processes.

Its settings (``tests.process_settings``) read where to store the queue and
where to deliver from the environment; see ``tests/processes.py``.
"""

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.process_settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
