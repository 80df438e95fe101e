"""``python -m medgn``: the same as the ``medgn`` command."""

from medgn.cli import console_main

console_main()
