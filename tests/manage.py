#!/usr/bin/env python
"""``manage.py`` for tests that run the commands as real processes.

Its settings (``tests.process_settings``) read where to store the queue and
where to deliver from the environment; see ``tests/processes.py``.
"""

import os
import sys

if __name__ == "__main__":
    # The checkout, for the tests package. Under tox (MAILER_TEST_INSTALLED=1)
    # it goes after site-packages, so that mailer is the installed one, as in
    # the tests that start this process (see tox.ini).
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.environ.get("MAILER_TEST_INSTALLED") == "1":
        sys.path.append(checkout)
    else:
        sys.path.insert(0, checkout)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.process_settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
