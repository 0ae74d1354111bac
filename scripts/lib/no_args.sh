# Sourced by the sweep scripts, which take their settings from the environment, never from arguments:
# `--help` prints the calling script's header comment; any other argument is refused before anything runs.
if [[ $# -gt 0 ]]; then
  header=$(sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//')
  if [[ $1 == -h || $1 == --help ]]; then echo "$header"; exit 0; fi
  echo "$header" >&2
  echo "error: $(basename "$0") takes no arguments (got: $*)" >&2; exit 2
fi
