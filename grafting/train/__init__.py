"""The run machinery both training scripts share: the run configuration and its command line, process
set-up, the learning-rate schedules, the epoch loop, a network's own files, and what a run reports."""
