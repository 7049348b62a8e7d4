"""`python -m tokenrig.cli`: the `tokenrig` command."""

import sys

from tokenrig.cli import main

sys.exit(main())
