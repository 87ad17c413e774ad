#!/usr/bin/env bash
# Start (or stop) a throw-away single-node SLURM cluster on 127.0.0.1 for the tests:
# partitions `cpu` and `gpu` (one fake GPU gres, no device file), munge, no accounting.
#   .ci/slurm-cluster.sh start DIR   -> writes DIR/slurm.conf, starts munged/slurmctld/slurmd
#   .ci/slurm-cluster.sh stop DIR    -> stops only the daemons started from DIR
# Needs root and Debian's slurmctld, slurmd, slurm-client, munge (install: .ci/slurm-cluster.sh install).
set -euo pipefail
cmd=${1:?start|stop|install}
dir=${2:-/tmp/dh-slurm}

case "$cmd" in
install)
  command -v slurmctld >/dev/null && command -v munged >/dev/null && exit 0
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
  ;;
start)
  mkdir -p "$dir"/{state,spool,log,munge}
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown -R root:root /etc/munge "$dir/munge"
  chmod 0755 "$dir/munge"
  chmod 0400 /etc/munge/munge.key
  # as root (--force): the test owns these daemons and nothing else uses them
  munged --force --socket="$dir/munge/munge.socket" --pid-file="$dir/munge/munged.pid" \
    --log-file="$dir/log/munged.log" --seed-file="$dir/munge/seed" --key-file=/etc/munge/munge.key
  cat > "$dir/slurm.conf" <<CONF
ClusterName=dhtest
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldPort=16817
SlurmdPort=16818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=3600
MpiDefault=none
GresTypes=gpu
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem Gres=gpu:1 State=UNKNOWN
PartitionName=cpu Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
PartitionName=gpu Nodes=$host MaxTime=INFINITE State=UP
CONF
  echo "NodeName=$host Name=gpu File=/dev/null Count=1" > "$dir/gres.conf"
  export SLURM_CONF="$dir/slurm.conf"
  # srun inside jobs (Snakemake's jobstep executor) looks for the default path only
  if [ ! -e /etc/slurm/slurm.conf ]; then
    mkdir -p /etc/slurm
    ln -s "$dir/slurm.conf" /etc/slurm/slurm.conf
    ln -sf "$dir/gres.conf" /etc/slurm/gres.conf
    touch "$dir/linked-etc"
  fi
  slurmctld -f "$dir/slurm.conf"
  slurmd -f "$dir/slurm.conf"
  for _ in $(seq 1 30); do
    if sinfo -h -o '%T' 2>/dev/null | grep -qE 'idle|mixed'; then exit 0; fi
    sleep 1
  done
  echo "slurm did not come up; see $dir/log" >&2
  exit 1
  ;;
stop)
  if [ -e "$dir/linked-etc" ]; then
    rm -f /etc/slurm/slurm.conf /etc/slurm/gres.conf "$dir/linked-etc"
  fi
  for pid in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
    [ -s "$pid" ] && kill "$(cat "$pid")" 2>/dev/null || true
  done
  ;;
esac
