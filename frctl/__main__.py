"""``python -m frctl``: the same as the ``frctl`` command."""

from frctl import run

run()
