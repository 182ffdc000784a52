"""Launching runs above builders.train: sweeps (specs x grid) through submitit, and
running avi's commands on several processes and machines through existing launchers
(torchrun, SLURM's srun): reading where a process stands, and joining the process group."""
