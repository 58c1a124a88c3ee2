"""Launching on SLURM (or on this machine) with submitit: `seer launch pretrain|eval|collect|status`.

- ``seer.launch.executor``: the resource arguments and their checks, the submitit executor, the sbatch script.
- ``seer.launch.jobs``: what runs inside the tasks (``PretrainJob``, the eval suite's array tasks); submitit pickles
  them, so they are part of the installed package.
- ``seer.launch.cli``: the command-line mains.

Nothing is imported here: ``seer launch --dry-run`` loads only what it uses.
"""
