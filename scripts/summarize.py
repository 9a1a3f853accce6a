"""Results of run folders grouped by experiment, next to the paper's numbers, as markdown, csv or json (graft-summary).

Run with --help for the flags; the logic lives in grafting/tools/summary.py.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from grafting.tools.summary import main

if __name__ == "__main__":
    main()
