"""`python -m cnnpipe.cli.warm SOCKET`: the warm worker that `cnnpipe server start` launches
(`cnnpipe.server.warm`), running each command as `cnnpipe` does."""

import sys
from pathlib import Path

from cnnpipe.cli import prepare, run
from cnnpipe.server.warm import serve

if __name__ == "__main__":
    serve(Path(sys.argv[1]), prepare, run)
