"""``python -m mlodsl ...`` is the ``mlodsl`` command."""

import sys

from mlodsl.cli import main

sys.exit(main())
