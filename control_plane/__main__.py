"""``python -m control_plane``: see :mod:`control_plane.cli`."""

import sys

from control_plane.cli import main

sys.exit(main())
