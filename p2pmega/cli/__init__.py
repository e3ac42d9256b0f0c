"""The ``p2pmega`` command line: the only package that prints, reads argv or exits.

stdout carries only results (a link, a path, a report); progress, logs and errors go to stderr. Exit codes come
from the exception tree in errors.py; 130 means interrupted.

``base`` holds the app, the shared options and ``main``; ``files`` the share/fetch/check commands; ``peers`` the
seed/bootstrap/testnet/demo commands; ``ui`` the web app and ``ls``. Importing this package registers them all.
"""

from p2pmega.cli import files as files
from p2pmega.cli import peers as peers
from p2pmega.cli import ui as ui
from p2pmega.cli.base import (
    DEFAULT_COUNTRIES as DEFAULT_COUNTRIES,
)
from p2pmega.cli.base import (
    DEFAULT_GC_INTERVAL as DEFAULT_GC_INTERVAL,
)
from p2pmega.cli.base import (
    DEFAULT_QUOTA_BYTES as DEFAULT_QUOTA_BYTES,
)
from p2pmega.cli.base import (
    DEFAULT_REANNOUNCE_INTERVAL as DEFAULT_REANNOUNCE_INTERVAL,
)
from p2pmega.cli.base import (
    DEFAULT_REPAIR_INTERVAL as DEFAULT_REPAIR_INTERVAL,
)
from p2pmega.cli.base import app as app
from p2pmega.cli.base import main as main
