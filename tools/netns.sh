#!/usr/bin/env bash
# Runs a command in a new, loopback-only network namespace: `lo` is up, there is no other interface and
# no route out, so pod addresses added to `lo` (tools/cluster/podrunner.py) answer inside it and
# nothing can leave. It also gets a PID namespace whose init is the command: when the command ends,
# the kernel ends every process it left behind (cluster components, pods' processes), even after a
# crash or a SIGKILL. Needs root (CAP_SYS_ADMIN), as the pod runner's mount namespaces do. Build
# everything first: there is no registry in here.
#
#   tools/netns.sh COMMAND [ARGS...]
set -euo pipefail
if [ "${SD_NETNS:-}" = "1" ]; then
  exec "$@"  # already inside one
fi
if [ "$(id -u)" != "0" ]; then
  echo "tools/netns.sh: needs root (unshare --net and the pod runner's mounts)" >&2
  exit 2
fi
exec unshare --net --pid --fork --mount-proc --kill-child -- env SD_NETNS=1 bash -c 'ip link set lo up && exec "$@"' netns "$@"
