"""python -m crossgrad: the same as the `crossgrad` console script."""

import sys

from crossgrad.cli import main

sys.exit(main())
