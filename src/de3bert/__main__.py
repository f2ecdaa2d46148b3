"""`python -m de3bert`: the command line."""

import sys

from de3bert.apps.cli import main

sys.exit(main())
