"""Where work runs: DDP process groups and launchers (``ddp``) and Dask clusters on
workstations and batch schedulers (``jobqueue``)."""
