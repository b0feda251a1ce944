"""``python -m eptlab.cli``."""

from . import run

run()
