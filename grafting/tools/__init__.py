"""Comparing runs with the paper: the published numbers (:mod:`.published`), run folders and their
metrics (:mod:`.runs`), checkpoints as the tools read them (:mod:`.checkpoints`), and the command-line
tools ``graft-summary`` (:mod:`.summary`), ``graft-plot`` (:mod:`.plot`), ``graft-filters``
(:mod:`.filters`), ``graft-ensemble`` (:mod:`.ensemble`) and ``graft-data`` (:mod:`.data`)."""
