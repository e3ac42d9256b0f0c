"""``python -m p2pmega`` runs the command-line interface."""

from p2pmega.cli import main

main()
