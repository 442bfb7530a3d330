"""``python -m orbital`` runs the ``orbital`` command."""

from orbital.cli import main

main()
