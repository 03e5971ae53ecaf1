# shellcheck shell=bash
# The local launcher's first command in the sandbox (bash -c, as the build's
# user): say "up" on the pipe $4 (or "-") once the sandbox is set up; export
# the job's variables, read NUL-separated from the pipe whose number is $1;
# put the build-cache pipes $2 and $3 (or "-") at fds 7 and 8 and the
# control channel $5 (or "-") at fd 9, through free fds, as any of them may
# already be 7, 8 or 9; then become the rest of the command line (the build
# script).
fd=$1 cin=$2 cout=$3 up=$4 ctl=$5
shift 5
if [ "$up" != - ]; then printf up >&"$up"; exec {up}>&-; fi
while IFS= read -r -d '' -u "$fd" kv; do
  # "name=value": exported as such.
  # shellcheck disable=SC2163
  export -- "$kv" 2>/dev/null ||
    printf 'conveyor: ignored the environment variable %s (not a valid name)\n' "${kv%%=*}" >&2
done
exec {fd}<&-
if [ "$cin" != - ]; then exec {a}<&"$cin" {b}>&"$cout"; exec {cin}<&- {cout}>&-; fi
if [ "$ctl" != - ]; then exec {c}>&"$ctl"; exec {ctl}>&-; fi
if [ "$cin" != - ]; then exec 7<&"$a" 8>&"$b"; exec {a}<&- {b}>&-; fi
if [ "$ctl" != - ]; then exec 9>&"$c"; exec {c}>&-; fi
exec "$@"
