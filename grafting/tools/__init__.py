"""Comparing runs with the paper: the published numbers (:mod:`.published`), run folders
(:mod:`.runs`), and the command-line tools ``graft-summary`` (:mod:`.summary`), ``graft-filters``
(:mod:`.filters`) and ``graft-ensemble`` (:mod:`.ensemble`)."""
