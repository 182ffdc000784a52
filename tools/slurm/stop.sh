#!/usr/bin/env bash
# Stop the one-node SLURM cluster that tools/slurm/start.sh started (its jobs are killed).
set -uo pipefail
scancel --user="$(id -un)" 2>/dev/null || true
pkill -x slurmd 2>/dev/null || true
pkill -x slurmctld 2>/dev/null || true
pkill -x munged 2>/dev/null || true
echo "tools/slurm/stop.sh: SLURM stopped" >&2
