"""``python -m mapsim``: the command line."""

import sys

from mapsim.cli import main

sys.exit(main())
