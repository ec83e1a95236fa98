#!/bin/sh
# coredump.example.io core_pattern shim (POSIX sh; installed on the host by coredump-agent).
#
#   core_pattern: |/var/lib/coredump/shim %P %I %s %t %c %e
#
# The kernel runs this in the host's namespaces, as root, with the core on stdin; Python may not exist
# here. It enters the agent container's mount namespace (the agent publishes its pid) and runs the handler
# there. When the agent is not running, or the handler could not start, it spools the raw core on the host
# (with the crashing process's cgroup, read while the process still exists) and exits at once; the agent
# files spooled cores when it comes back. Cores of non-pod processes come back from the handler as the
# previous core_pattern's command, run here on the host.
#
# Settings: defaults below, overridden by shim.conf next to this file (written by the agent).

DIR=${0%/*}
AGENT_PID_FILE="$DIR/agent.pid"
SPOOL_DIR="$DIR/spool"
SPOOL_MAX_BYTES=0
LOG_FILE="$DIR/shim.log"
HANDLER="coredump-handler"
NSENTER="nsenter"
PROC=/proc
[ -r "$DIR/shim.conf" ] && . "$DIR/shim.conf"
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH

pid=$1 tid=$2 sig=$3 t=$4 rlimit=$5
shift 5 2>/dev/null
comm=$*

log() {
    printf '%s shim[%s]: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$$" "$*" >>"$LOG_FILE" 2>/dev/null
}

spool() {
    umask 077
    mkdir -p "$SPOOL_DIR" 2>/dev/null
    name="$t-$pid-$sig-$$"
    tmp="$SPOOL_DIR/.$name.core.tmp"
    info="$SPOOL_DIR/.$name.info.tmp"
    {
        echo "pid=$pid"
        echo "tid=$tid"
        echo "signal=$sig"
        echo "time=$t"
        echo "rlimit=$rlimit"
        printf 'comm=%s\n' "$comm" | tr -d '\r' | head -n 1
        echo "reason=$1"
        sed 's/^/cgroup=/' "$PROC/$pid/cgroup" 2>/dev/null
    } >"$info" || { log "cannot write to $SPOOL_DIR; core of pid $pid lost"; exit 1; }
    if [ "$SPOOL_MAX_BYTES" -gt 0 ] 2>/dev/null; then
        head -c "$SPOOL_MAX_BYTES" >"$tmp"
        rest=$(wc -c | tr -d ' ')
    else
        cat >"$tmp"
        rest=0
    fi
    status=$?
    if [ ! -s "$tmp" ]; then
        rm -f "$tmp" "$info"
        [ "$status" -eq 0 ] || log "spooling core of pid $pid failed"
        return
    fi
    echo "rest=$rest" >>"$info"
    # The .info file is the commit point: renamed last.
    mv "$tmp" "$SPOOL_DIR/$name.core" && mv "$info" "$SPOOL_DIR/$name.info"
    log "spooled core of pid $pid (signal $sig): $1"
}

agent=
[ -r "$AGENT_PID_FILE" ] && read -r agent <"$AGENT_PID_FILE"
case $agent in '' | *[!0-9]*) agent= ;; esac

if [ -n "$agent" ] && [ -e "$PROC/$agent/ns/mnt" ]; then
    # $HANDLER is a command line: split on purpose.
    out=$($NSENTER -t "$agent" -m -- $HANDLER capture "$pid" "$tid" "$sig" "$t" "$rlimit" "$comm" 2>>"$LOG_FILE")
    rc=$?
    case $rc in
    0) exit 0 ;;
    10)
        # A non-pod process: the handler read nothing and printed the previous pattern's command.
        [ -n "$out" ] && eval "exec $out"
        exit 0
        ;;
    1 | 2 | 126 | 127)
        # nsenter, Python or its argument parsing stopped the handler before it read: whatever it did not read goes to the spool.
        spool "handler did not run (exit $rc)"
        exit 0
        ;;
    *)
        log "handler failed for pid $pid (exit $rc); see the handler log"
        exit 0
        ;;
    esac
fi
spool "agent not running"
exit 0
