"""``python -m archir.cli``: the same as the ``archir`` command."""

import sys

from archir.cli import main

sys.exit(main())
