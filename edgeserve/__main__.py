"""``python -m edgeserve``: the same as the ``edgeserve`` command."""

from edgeserve.cli import main

main()
