"""epcomm launcher: builds and runs the mpirun command for a topology YAML (``python -m launch --help``).

Modules: ``launch.mpicmd`` (find mpirun, build the command), ``launch.rank_env`` (per-rank wrapper and the
environment each rank gets), ``launch.runner`` (exit codes, signals, timeout). Kept import-free so that
``python -m launch.rank_env`` starts clean.
"""
