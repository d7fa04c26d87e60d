"""``python -m pipeline.cli`` is the ``streamfit`` command."""

import sys

from pipeline.cli import main

sys.exit(main())
