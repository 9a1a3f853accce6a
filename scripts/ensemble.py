"""Test accuracy of the softmax average of K checkpoints (graft-ensemble).

Run with --help for the flags; the logic lives in grafting/tools/ensemble.py.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from grafting.tools.ensemble import main

if __name__ == "__main__":
    main()
