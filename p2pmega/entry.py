"""The console script's entry point: the cycle collector goes off before the CLI's modules load.

Loading them makes no garbage worth collecting, yet the collector ran ~50 times over their objects
(~14 ms a command here); ``cli._run`` freezes what is loaded and turns it back on.
"""

import gc


def main() -> None:
    """Run the command line (``p2pmega`` and ``python -m p2pmega``)."""
    gc.disable()
    from p2pmega.cli import main as cli_main

    cli_main()
