"""`python -m cnnpipe.cli`: the `cnnpipe` command."""

import sys

from cnnpipe.cli import main

sys.exit(main())
