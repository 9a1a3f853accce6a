"""The launcher: the experiment scripts' rings, checked and started on this machine or on Slurm.

- ``settings``: the settings, their defaults and checks, and an experiment script's settings block;
- ``rings``: the ring description the scripts hand over (one line per ring);
- ``plan``: every network's command, parsed by its training script's own parser, and the checks;
- ``supervisor``: one ring's processes, started, followed and stopped together (``RingSupervisor``);
- ``nohup``: the queue of rings on this machine's GPUs;
- ``slurm``: the job arrays, their job scripts and their submission;
- ``cli``: ``graft-launch``.
"""
