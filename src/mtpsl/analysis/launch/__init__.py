"""Where a ``compare`` grid's cells train: the local launcher (this machine, ``--jobs N`` at
once) and the submitit launcher (a cluster job per cell), with the grid folder's record of
each cell's jobs that ``compare --status`` reads and a re-run of ``compare`` consults to launch
only what is missing. Modules: ``state`` (records, status), ``cell`` (training one cell,
anywhere), ``local``, ``cluster``; the package itself imports nothing, so a job on a cluster
node loads only what it runs."""
