#!/usr/bin/env bash
# bash_completion_test.sh COMPLETION TVILLINGCTL: the completion offers tvillingctl's commands and
# the options of the global level and of a command, read from the real binary's --help.
set -uo pipefail
completion=$1 ctl=$(realpath "$2")
# shellcheck source=/dev/null
source "$completion"
complete_line() {  # complete_line WORD...: the completions for the last word
  COMP_WORDS=("$ctl" "$@")
  COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
  _tvillingctl
  [ ${#COMPREPLY[@]} -eq 0 ] || printf '%s\n' "${COMPREPLY[@]}" | sort | tr '\n' ' '
}
fail=0
expect() {  # expect "WANT" WORD...
  local want=$1 got
  shift
  got=$(complete_line "$@")
  if [ "$got" != "$want" ]; then
    echo "FAIL: tvillingctl $* <TAB>: got '$got', want '$want'"
    fail=1
  else
    echo "ok: tvillingctl $* <TAB> -> $got"
  fi
}
expect "demote divergent failover history pause promote resume status switchover verify " ""
expect "status " "st"
expect "switchover " "sw"
expect "" "nothing"
expect "--socket --state-dir " "--s"
expect "--count --help --json --watch " "status" "--"
expect "--json " "--socket" "/tmp/x.sock" "status" "--j"
expect "demote divergent failover history pause promote resume status switchover verify " "--timeout" "3" ""
expect "--dry-run " "switchover" "--group" "g0" "--d"
expect "--all-groups " "switchover" "--al"
expect "--concurrency " "switchover" "--all-groups" "--c"
expect "--from " "switchover" "--all-groups" "--f"
expect "--order " "switchover" "--all-groups" "--o"
expect "" "switchover" "--all-groups" "--concurrency" ""
expect "--rate --resync --resync-timeout " "verify" "--group" "g0" "--r"
expect "" "verify" "--rate" ""
dir=$(mktemp -d /tmp/tvilling-compl.XXXXXX)
mkdir "$dir/state-a"
expect "$dir/state-a " "--state-dir" "$dir/sta"
rm -rf "$dir"
exit $fail
