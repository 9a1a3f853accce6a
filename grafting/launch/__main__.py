"""``python -m grafting.launch``: the experiment scripts' hand-over (see grafting.launch.cli)."""

from grafting.launch.cli import main

main()
