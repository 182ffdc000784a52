#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine, for avi's sweep and srun tests and for
# trying `avi sweep --launcher slurm` on a workstation. Run as root. Idempotent: a cluster that
# already answers is left alone. Installs Debian's slurmctld, slurmd, slurm-client and munge
# where they are missing (about a minute). Not for a real cluster: no accounting, no cgroups.
#   bash tools/slurm/start.sh      # then: sinfo; sbatch --wrap hostname
# Environment: AVI_SLURM_WAIT (seconds to wait for the node to be idle, default 90).
set -euo pipefail
wait_s="${AVI_SLURM_WAIT:-90}"

say() { echo "tools/slurm/start.sh: $*" >&2; }

if sinfo -h -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
  say "SLURM already up: $(sinfo -h -o '%P %D %t' | tr '\n' ' ')"; exit 0
fi
if [ "$(id -u)" -ne 0 ]; then say "must run as root (it installs packages and starts daemons)"; exit 1; fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v munged >/dev/null; then
  say "installing slurmctld slurmd slurm-client munge (Debian packages)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q slurmctld slurmd slurm-client munge >/tmp/avi-slurm-apt.log 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q slurmctld slurmd slurm-client munge >/tmp/avi-slurm-apt.log 2>&1; } \
    || { say "apt-get install failed; see /tmp/avi-slurm-apt.log"; exit 1; }
fi

# munge authenticates every SLURM message; the package makes a key, make one if it did not.
mkdir -p /etc/munge /var/run/munge /var/lib/munge /var/log/munge
[ -s /etc/munge/munge.key ] || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
chown -R munge:munge /etc/munge /var/run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
chmod 0400 /etc/munge/munge.key
if ! pgrep -x munged >/dev/null; then
  runuser -u munge -- /usr/sbin/munged --force 2>/dev/null || /usr/sbin/munged --force
fi

host="$(hostname -s)"
cpus="$(nproc)"
mem_mb="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
# One node, one partition. linuxproc/none plugins: no cgroups in a container. A job's CPUs
# are not bound (CR_Core only counts them), so tests may oversubscribe this small machine.
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=avi-local
SlurmctldHost=${host}
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
SlurmctldPidFile=/var/run/slurmctld.pid
SlurmdPidFile=/var/run/slurmd.pid
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmUser=root
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
InactiveLimit=0
KillWait=10
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
MaxArraySize=1001
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem_mb} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF

pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld
pgrep -x slurmd >/dev/null || /usr/sbin/slurmd

for _ in $(seq "$wait_s"); do
  state="$(sinfo -h -o '%t' 2>/dev/null | head -1 || true)"
  case "$state" in
    idle|mix|alloc) say "SLURM up: partition debug, node ${host}, ${cpus} CPUs"; exit 0 ;;
    down*|drain*) scontrol update NodeName="${host}" State=RESUME 2>/dev/null || true ;;
  esac
  sleep 1
done
say "SLURM did not come up within ${wait_s}s; logs: /var/log/slurm/"
tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
exit 1
