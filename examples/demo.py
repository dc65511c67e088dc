"""Serve the Flask example app on the simulated engine: ``python examples/demo.py``.

The same as ``llmbridge demo`` (``llmbridge demo --help`` lists the options): a threaded
werkzeug server on 127.0.0.1 serving ``examples/flask_app``, a few completions streamed
side by side in the terminal as a self-check, then serving until Ctrl-C. The first
Ctrl-C lets open streams finish, the second stops at once.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run from a clone without installing: the checkout's own llmbridge comes first.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmbridge._cli.main import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
