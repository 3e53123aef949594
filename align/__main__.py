"""`python -m align ...` is `align ...`."""

import sys

from align.cli.main import main

sys.exit(main())
