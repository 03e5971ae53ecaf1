# shellcheck shell=bash
# The build script's body: clone at the exact commit, restore the cache,
# run each step, save the cache. ``runner.script.BuildScript.render`` puts a
# header of shell-quoted variables above it:
#
#   REPO_URL COMMIT_SHA BRANCH  what to check out (into ./src)
#   ROOT_DIR        the directory of src the steps run in ("" for src)
#   STEPS           the step commands after the clone, in order
#   MARKER_PREFIX   "" when markers go to the runner's control channel
#                   (fd 9, acknowledged line by line); else the stdout
#                   prefix markers carry (a launcher without the channel)
#   CACHE_LOCKS CACHE_DIRS  the cache's lock-file globs and its paths
#                   relative to the workspace (both empty: no cache)
#   ANSWER_TIMEOUT  seconds to wait for an answer of the runner's
#
# Everything runs inside main, called on the last line: bash has then read
# the whole file, so a step that rewrites it changes nothing (bash reads a
# script as it goes). Steps never get fds 7, 8 (the cache pipes) or 9 (the
# control channel): a step cannot say where a step begins or ends, and a
# process it leaves behind cannot hold the pipes open.

# The header assigns the upper-case variables above.
# shellcheck disable=SC2154

# Tell the runner a marker ("begin:1", "end:1:0", "cache:save:2"). On the
# control channel, wait for its acknowledgement: the runner has then read
# every byte of output written before it, so the step's header lands in the
# log where the step began.
mark() {
  if [ -n "$MARKER_PREFIX" ]; then
    printf '%s:%s\n' "$MARKER_PREFIX" "$1"
    return 0
  fi
  printf '%s\n' "$1" >&9 2>/dev/null || return 0
  local i
  # Short reads: a stop request is noticed within a second (a trapped
  # signal does not interrupt read).
  for ((i = 0; i < ANSWER_TIMEOUT; i++)); do
    if IFS= read -r -t 1 -u 9 _; then return 0; fi
    if [ "$?" -le 128 ] || [ -n "${stopping:-}" ]; then return 0; fi
  done
}

# After each step: a failing step ends the script with its exit code, and
# so does a stop request (143, as for SIGTERM) even when the step exited 0.
stop_or_fail() {
  if [ "$1" -ne 0 ] || [ -n "${stopping:-}" ]; then exit "$(($1 ? $1 : 143))"; fi
}

clone() {
  set -e
  # The repository may belong to another uid (a local path given to the
  # sandbox read-only). git honours safe.directory only from global
  # config, also in the upload-pack it spawns.
  mkdir -p "$WS/.conveyor"
  export GIT_CONFIG_GLOBAL="$WS/.conveyor/clone.gitconfig"
  printf '[safe]\n\tdirectory = *\n' >"$GIT_CONFIG_GLOBAL"
  git init -q src
  cd src
  git remote add origin "$REPO_URL"
  # A shallow fetch of the exact commit; servers that refuse fetching by
  # id get the branch, then the full history.
  if ! git fetch -q --depth 1 origin "$COMMIT_SHA"; then
    git fetch -q origin "+refs/heads/$BRANCH" || git fetch -q origin
  fi
  git -c advice.detachedHead=false checkout -q --detach "$COMMIT_SHA"
  echo "checked out $(git rev-parse HEAD)"
}

there() { [ -e "$1" ] || [ -L "$1" ]; }
tracked() { [ -n "$(git -C "$WS/src" ls-files -- "$1" 2>/dev/null | head -c1)" ]; }

cache_key() {
  local p f files=()
  if [ "${#cached_dirs[@]}" -eq 0 ]; then echo none; return; fi
  shopt -s nullglob
  for p in "${CACHE_LOCKS[@]}"; do
    # Unquoted on purpose: the patterns are globs (checked to hold no
    # blank or shell syntax).
    # shellcheck disable=SC2206
    for f in $p; do [ -f "$f" ] && [ ! -L "$f" ] && files+=("$f"); done
  done
  shopt -u nullglob
  if [ "${#files[@]}" -eq 0 ]; then echo none; return; fi
  # Native modules differ by platform: the key includes it.
  {
    uname -m
    # shellcheck disable=SC1091  # the build host's, read at run time
    (. /etc/os-release 2>/dev/null; echo "${ID:-}-${VERSION_ID:-}")
    printf '%s\0' "${cached_dirs[@]}"
    printf '%s\0' "${files[@]}" | sort -zu |
      while IFS= read -r -d '' f; do printf '%s\0' "$f"; cat -- "$f"; done
  } | sha256sum | cut -c1-64
}

# Hash the lock files, ask the runner, unpack its answer. Paths the
# repository tracks (a committed vendor/) are not the cache's: neither
# restored over the checkout nor saved. The archive is unpacked aside and
# each path moved into place only when all of it unpacked, so a broken
# archive costs the time it saved, never the build; an exact entry that
# does not unpack is saved anew.
restore_cache() {
  local d i rc=0 aside
  cached_dirs=()
  for d in "${CACHE_DIRS[@]}"; do
    case $d in src/*)
      if tracked "${d#src/}"; then
        echo "cache: ${d#src/} is in the repository; it is not cached"
        continue
      fi
      ;;
    esac
    cached_dirs+=("$d")
  done
  cache_key=$(cache_key)
  mark "cache:restore:$cache_key"
  cache_verdict=miss
  for ((i = 0; i < ANSWER_TIMEOUT; i++)); do
    if IFS= read -r -t 1 cache_verdict <&7; then break; fi
    if [ "$?" -le 128 ] || [ -n "${stopping:-}" ]; then cache_verdict=miss; break; fi
  done
  if [ "$cache_verdict" = exact ] || [ "$cache_verdict" = fallback ]; then
    aside="$WS/.conveyor/.cache-restore"
    rm -rf -- "$aside"; mkdir -p -- "$aside"
    tar -xzf - --no-same-owner -C "$aside" <&7
    rc=$?
    if [ "$rc" -eq 0 ]; then
      for d in "${cached_dirs[@]}"; do
        if there "$aside/$d" && ! there "$WS/$d"; then
          mkdir -p -- "$(dirname -- "$WS/$d")" && mv -- "$aside/$d" "$WS/$d"
        fi
      done
    else
      cache_verdict=miss
    fi
    # Read-only directories (Go's module cache) would stop rm.
    chmod -R u+w -- "$aside" 2>/dev/null; rm -rf -- "$aside"
  fi
  exec 7<&-
  mark "cache:restored:$rc"
  if [ -n "${stopping:-}" ]; then exit 143; fi
}

# Stream a tar.gz of the cache paths present to the runner, unless there
# is no key or the restore was exact (same key, same content).
save_cache() {
  local d rc present=()
  if [ "$cache_key" != none ] && [ "$cache_verdict" != exact ]; then
    for d in "${cached_dirs[@]}"; do
      if there "$WS/$d"; then present+=("$d"); fi
    done
    mark "cache:save:${#present[@]}"
    if [ "${#present[@]}" -gt 0 ]; then
      # gzip -1: dependency trees compress well even so, and the save is
      # on every cache miss's critical path.
      (set -o pipefail; cd "$WS" && tar -cf - -- "${present[@]}" | gzip -1) >&8
      rc=$?
      exec 8>&-
      mark "cache:saved:$rc"
    fi
  fi
  # A stop during the save ends the build as stopped, not passed.
  if [ -n "${stopping:-}" ]; then exit 143; fi
}

main() {
  local i rc cache=
  set -u
  export GIT_TERMINAL_PROMPT=0
  WS=$PWD
  if [ "${#CACHE_LOCKS[@]}" -gt 0 ] && [ "${#CACHE_DIRS[@]}" -gt 0 ]; then cache=1; fi
  # On SIGTERM the script itself waits for the running step (it gets the
  # signal too) and then stops; a handler rather than an ignored signal, so
  # that steps start with the default action.
  trap 'stopping=1' TERM
  mark begin:0
  (clone) 7<&- 8>&- 9>&-
  rc=$?
  mark "end:0:$rc"
  stop_or_fail "$rc"
  cd "src${ROOT_DIR:+/$ROOT_DIR}" || { echo "root directory not found" >&2; exit 1; }
  if [ -n "$cache" ]; then restore_cache; fi
  for i in "${!STEPS[@]}"; do
    mark "begin:$((i + 1))"
    bash -e -o pipefail -c "${STEPS[$i]}" 7<&- 8>&- 9>&-
    rc=$?
    mark "end:$((i + 1)):$rc"
    stop_or_fail "$rc"
  done
  if [ -n "$cache" ]; then save_cache; fi
  exit 0
}

# main always exits: bash reads nothing after this line.
main
