"""`python -m fused_rnn`: the fused-rnn command (see fused_rnn.cli)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
