"""`python -m daemon` is `autoresearch`."""

import sys

from daemon.cli import main

sys.exit(main())
