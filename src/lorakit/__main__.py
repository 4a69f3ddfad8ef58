"""``python -m lorakit ...``: the same command line as the ``lorakit`` script."""

import sys

from lorakit.cli import main

sys.exit(main())
