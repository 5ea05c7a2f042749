# shellcheck shell=bash
# Helpers sourced by launch/{tpu_vm,gpu,slurm}.sh (not run on its own).
#
#   run CMD ARGS...   print "+ CMD ARGS" (shell-quoted), then run it, unless DRY_RUN=1
#   setenv NAME VALUE print "+ export NAME=VALUE", then export it
#   quote ARG         ARG as you would type it in a shell ('single quotes' where needed)
#   quote_all ARGS... every ARG quoted, joined by spaces
#   usage             print the calling script's header comment (its --help)
#   die MESSAGE       print "error: MESSAGE" to stderr and exit 2

DRY_RUN=0

quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$1"
  elif [[ $1 =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then  # --flag='value', easier to read
    printf '%s' "${BASH_REMATCH[1]}"
    quote "${BASH_REMATCH[2]}"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"  # ' -> '\''
  fi
}

quote_all() {
  local out=() arg
  for arg in "$@"; do
    out+=("$(quote "$arg")")
  done
  printf '%s' "${out[*]}"
}

run() {
  echo "+ $(quote_all "$@")"
  if [[ $DRY_RUN != 1 ]]; then
    "$@"
  fi
}

setenv() {
  echo "+ export $1=$(quote "$2")"
  export "$1=$2"
}

usage() {
  # The header: the comment lines after the shebang, up to the first line that is not one.
  sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"
}

die() {
  echo "error: $*" >&2
  exit 2
}
