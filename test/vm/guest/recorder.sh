#!/bin/sh
# The node's core_pattern before the agent: |/project/guest/recorder.sh %P %s %e
# Records its argv and the core it was given, unchanged.
d=/var/recorded
mkdir -p "$d"
printf '%s\n' "$@" >"$d/$1.args.tmp"
cat >"$d/$1.core"
mv "$d/$1.args.tmp" "$d/$1.args"
