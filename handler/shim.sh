#!/bin/sh
# coredump.example.io core_pattern shim (POSIX sh; installed on the host by coredump-agent).
#
#   core_pattern: |/var/lib/coredump/shim %P %I %s %t %c %e
#
# The kernel runs this in the host's namespaces, as root, with the core on stdin; Python may not exist here.
#
# It enters only the agent: the agent publishes "<pid> <starttime> <mount ns>" in agent.pid, and the shim
# enters that mount namespace only if the pid's start time (/proc/PID/stat field 22) and mount namespace
# (readlink /proc/PID/ns/mnt) both still match. It opens the namespace first and checks after, so the
# namespace entered is the one checked. On any mismatch (agent dead, pid reused, another namespace) or when the
# handler could not start, it spools the raw core on the host (with the crashing process's cgroup, read while
# the process still exists) and exits at once; the agent files spooled cores when it comes back.
#
# Nothing the entered namespace prints is run or evaluated here. For a process outside any pod the handler
# exits 10, and the shim runs the node's previous pipe pattern itself, from forward.sh, which the agent wrote
# when it took core_pattern over (literal words quoted, specifiers as "${sp_X}" variables set below).
#
# Every write to the spool is checked (cat, head, mv). A core the spool cannot take whole is kept as far as it
# got, with "truncated=<reason>" and "rest=<bytes not kept>" in its .info (the drain files it truncated with
# that reason); a spool that cannot take it at all is logged to shim.log and the kernel log, and counted (an
# outcome record the agent turns into coredump_handler_errors_total{source="shim"}).
#
# Settings: defaults below, overridden by shim.conf next to this file (written by the agent).

DIR=${0%/*}
AGENT_PID_FILE="$DIR/agent.pid"
SPOOL_DIR="$DIR/spool"
SPOOL_MAX_BYTES=0
LOG_FILE="$DIR/shim.log"
FORWARD_FILE="$DIR/forward.sh"
OUTCOMES_DIR="$DIR/state/outcomes"
KMSG=/dev/kmsg
HANDLER="coredump-handler"
NSENTER="nsenter"
PROC=/proc
[ -r "$DIR/shim.conf" ] && . "$DIR/shim.conf"
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH

pid=$1 tid=$2 sig=$3 t=$4 rlimit=$5
shift 5 2>/dev/null
comm=$*
case $pid in '' | *[!0-9]*) pid=0 ;; esac
case $sig in '' | *[!0-9]*) sig=0 ;; esac

log() {
    printf '%s shim[%s]: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$$" "$*" >>"$LOG_FILE" 2>/dev/null
}

# Loudly: shim.log, the kernel log, and an outcome record the agent counts. $1 is a fixed text of ours.
fail() {
    log "ERROR: $1"
    printf '<3>coredump-shim[%s]: %s\n' "$$" "$1" >>"$KMSG" 2>/dev/null
    mkdir -p "$OUTCOMES_DIR" 2>/dev/null
    o="$(date +%s)000000000-$$-shim.json"
    printf '{"result":"error","source":"shim","pid":%s,"signal":%s,"reason":"%s"}\n' "$pid" "$sig" "$1" \
        >"$OUTCOMES_DIR/.$o.tmp" 2>/dev/null && mv "$OUTCOMES_DIR/.$o.tmp" "$OUTCOMES_DIR/$o" 2>/dev/null
}

spool() {
    umask 077
    mkdir -p "$SPOOL_DIR" 2>/dev/null
    rnd=$(od -An -N4 -tx4 /dev/urandom 2>/dev/null | tr -d ' \n')
    name="$t-$pid-$sig-$$${rnd:+-$rnd}"
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
    } >"$info" || {
        rm -f "$info"
        fail "cannot write to the spool $SPOOL_DIR; core of pid $pid lost"
        exit 1
    }
    truncated=
    if [ "$SPOOL_MAX_BYTES" -gt 0 ] 2>/dev/null; then
        head -c "$SPOOL_MAX_BYTES" >"$tmp"
        status=$?
        rest=$(wc -c)
        rest=$(printf '%s' "$rest" | tr -d ' ')
        if [ "$status" -ne 0 ]; then
            truncated="spool write failed (head exit $status): spool full or unwritable"
        elif [ "${rest:-0}" -gt 0 ] 2>/dev/null; then
            truncated="spooled by the shim: larger than its maximum of $SPOOL_MAX_BYTES bytes"
        fi
    else
        cat >"$tmp"
        status=$?
        rest=0
        if [ "$status" -ne 0 ]; then
            # What cat read but could not write is lost; what it never read is counted here.
            truncated="spool write failed (cat exit $status): spool full or unwritable"
            rest=$(wc -c)
            rest=$(printf '%s' "$rest" | tr -d ' ')
        fi
    fi
    if [ ! -s "$tmp" ]; then
        rm -f "$tmp" "$info"
        [ "$status" -eq 0 ] || fail "spooling the core of pid $pid failed (exit $status); core lost"
        return
    fi
    {
        echo "rest=${rest:-0}"
        [ -z "$truncated" ] || echo "truncated=$truncated"
    } >>"$info" || { fail "cannot complete the spool entry of pid $pid; core kept unlisted in $tmp"; return; }
    # The .info file is the commit point: renamed last, and only after the data kept its name.
    if ! mv "$tmp" "$SPOOL_DIR/$name.core"; then
        fail "cannot name the spooled core of pid $pid; kept unlisted in $tmp"
        return
    fi
    if ! mv "$info" "$SPOOL_DIR/$name.info"; then
        fail "cannot commit the spooled core of pid $pid; kept unlisted as $SPOOL_DIR/$name.core"
        return
    fi
    if [ -n "$truncated" ] && [ "$SPOOL_MAX_BYTES" -le 0 ] 2>/dev/null; then
        fail "the spool took only part of the core of pid $pid; spooled truncated"
    fi
    log "spooled core of pid $pid (signal $sig): $1${truncated:+ (truncated: $truncated)}"
}

# Sets why= and returns 1 unless agent.pid names a live agent; on success fd 3 holds its mount namespace.
agent_ok() {
    why="agent not running"
    [ -r "$AGENT_PID_FILE" ] || return 1
    a_pid= a_start= a_mnt=
    read -r a_pid a_start a_mnt <"$AGENT_PID_FILE" 2>/dev/null
    case $a_pid in '' | *[!0-9]*) why="agent identity unreadable"; return 1 ;; esac
    case $a_start in '' | *[!0-9]*) why="agent identity unreadable"; return 1 ;; esac
    [ -n "$a_mnt" ] || { why="agent identity unreadable"; return 1; }
    # Open the namespace first, check the process after: if pid still has the agent's start time now, the
    # namespace opened before was the agent's (a pid never goes back to an earlier process).
    # "command": a failed redirection of a special builtin must not end the shim.
    { command exec 3<"$PROC/$a_pid/ns/mnt"; } 2>/dev/null || { why="agent not running (pid $a_pid is gone)"; return 1; }
    st=$(cat "$PROC/$a_pid/stat" 2>/dev/null) || { why="agent not running (pid $a_pid is gone)"; return 1; }
    st=${st##*)}
    set -f
    # shellcheck disable=SC2086 # split on purpose: the fields after the comm
    set -- $st
    set +f
    [ $# -ge 20 ] || { why="agent not running (pid $a_pid has no stat)"; return 1; }
    shift 19
    [ "$1" = "$a_start" ] || { why="pid $a_pid is not the agent (started at $1, the agent at $a_start)"; return 1; }
    mnt=$(readlink /proc/self/fd/3 2>/dev/null)
    [ -n "$mnt" ] && [ "$mnt" = "$a_mnt" ] || {
        why="pid $a_pid is not in the agent's mount namespace ($mnt, the agent's is $a_mnt)"
        return 1
    }
    return 0
}

# The pid namespace's own number of $1 (NSpid's last field), or $2 when unknown.
nspid() {
    v=$2
    while read -r key rest; do
        [ "$key" = "NSpid:" ] && v=${rest##*[	 ]}
    done <"$1" 2>/dev/null
    printf '%s' "$v"
}

# A non-pod core: run the node's previous pipe pattern here, from what the agent wrote (never the handler).
forward() {
    [ -r "$FORWARD_FILE" ] || return 1
    sp_P=$pid sp_I=$tid sp_s=$sig sp_t=$t sp_c=$rlimit sp_C=$rlimit sp_e=$comm sp_d=0
    sp_h=$(uname -n 2>/dev/null)
    sp_u=0 sp_g=0
    while read -r key v1 rest; do
        case $key in Uid:) sp_u=$v1 ;; Gid:) sp_g=$v1 ;; esac
    done <"$PROC/$pid/status" 2>/dev/null
    sp_p=$(nspid "$PROC/$pid/status" "$pid")
    sp_i=$(nspid "$PROC/$pid/task/$tid/status" "$tid")
    exe=$(readlink "$PROC/$pid/exe" 2>/dev/null)
    sp_E=$(printf '%s' "$exe" | tr / !)
    sp_f=${exe##*/}
    [ -n "$sp_f" ] || sp_f=$comm
    set --
    . "$FORWARD_FILE"
    [ $# -gt 0 ] || return 1
    exec 3<&- "$@"
}

if agent_ok; then
    # $HANDLER is a command line: split on purpose. Its stdout is not read: nothing it prints is run.
    $NSENTER --mount=/proc/self/fd/3 -- $HANDLER capture "$pid" "$tid" "$sig" "$t" "$rlimit" "$comm" \
        >/dev/null 2>>"$LOG_FILE"
    rc=$?
    exec 3<&-
    case $rc in
    0) exit 0 ;;
    10)
        # A non-pod process: the handler read nothing.
        forward || spool "not in a pod, and no previous pipe pattern to forward to"
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
exec 3<&- 2>/dev/null
log "not entering: $why"
spool "$why"
exit 0
