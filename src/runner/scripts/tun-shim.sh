# shellcheck shell=bash
# The user-network launcher's tun shim (bash -c, as root, in a mount
# namespace of slirp4netns's own): a /dev/net holding a tun device node
# (numbers $3 $4) that the build uid ($1:$2) owns, so the host device's own
# mode does not matter; then become the rest of the command line (setpriv
# first: root ends here).
uid=$1 gid=$2 major=$3 minor=$4
shift 4
if ! { mount -t tmpfs -o size=16k,mode=0755,nosuid,noexec conveyor-tun /dev/net &&
  mknod -m 0600 /dev/net/tun c "$major" "$minor" &&
  chown "$uid:$gid" /dev/net/tun; }; then
  echo "conveyor: could not make a tun device for slirp4netns" >&2
  exit 125
fi
exec "$@"
