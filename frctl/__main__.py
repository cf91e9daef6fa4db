"""``python -m frctl``: the same as the ``frctl`` command."""

import sys

from frctl.main import main

sys.exit(main())
