# shellcheck shell=bash
# The local launcher's shim (bash -c, as root, on the host, before anything
# forks): mount the workspace filesystem ($1, if any) on the workspace ($2),
# join the build's cgroups (the $4 files that follow), tell the runner on
# fd $3, and become the rest of the command line (setpriv first: root ends
# here).
img=$1 ws=$2 ready=$3 n=$4
shift 4
if [ -n "$img" ]; then
  mount -t ext4 -o loop,nosuid,nodev,noatime "$img" "$ws" ||
    { echo "conveyor: could not mount the workspace filesystem" >&2; exit 125; }
  rm -f -- "$img"; chmod 0700 -- "$ws"; rmdir -- "$ws/lost+found" 2>/dev/null
fi
cd -- "$ws" || exit 125
while [ "$n" -gt 0 ]; do
  echo 0 >"$1" || { echo "conveyor: could not join the cgroup $1" >&2; exit 125; }
  shift; n=$((n - 1))
done
printf ready >&"$ready"
exec {ready}>&-
exec "$@"
