"""``python -m p2pmega`` runs the command-line interface."""

from p2pmega.entry import main

main()
