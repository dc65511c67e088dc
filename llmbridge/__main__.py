"""``python -m llmbridge``: the same as the ``llmbridge`` command."""

from __future__ import annotations

import sys

from llmbridge._cli.main import main

if __name__ == "__main__":
    sys.exit(main())
