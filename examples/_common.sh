# Shell functions sourced by examples/quickstart_cpu.sh, examples/reproduce_osp_small.sh and
# tools/device_checks.sh (bash >= 4.2, safe under set -u). Not a script to run.

# abs_paths VAR...: a relative path the user gave in VAR becomes absolute from the current directory, so
# that it keeps its meaning after the script changes to the repository root (where it used to resolve,
# putting the output inside the checkout). Unset or empty variables stay as they are.
abs_paths() {
  local v
  for v in "$@"; do
    if [[ -n ${!v:-} && ${!v} != /* ]]; then printf -v "$v" %s "$PWD/${!v}"; fi
  done
}

# check_switches CODE VAR...: each VAR, where set, is 0 or 1; another value (true, yes) used to mean 0
# without a word. Exits with CODE naming the first that is not.
check_switches() {
  local code=$1 v
  shift
  for v in "$@"; do
    if ! [[ ${!v:-0} =~ ^[01]$ ]]; then echo "error: $v=${!v}: 1 (on) or 0 (off)" >&2; exit "$code"; fi
  done
}
