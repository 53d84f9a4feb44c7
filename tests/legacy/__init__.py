"""Helpers for the upgrade test (``tests/test_upgrade.py``).

``venv.py`` builds a throwaway virtualenv holding the real django-mailer
2.3.2; ``build_legacy_db.py`` runs inside it to make a database the way a
django-mailer 2.3.2 site would. Nothing here imports the legacy package into
the test process: the two are both called ``mailer``.
"""
