#!/bin/bash
# benchmarks/run.sh - relayd vs Postfix, same load, same sink, one command.
#
#   benchmarks/run.sh [--quick] [--no-record] [N [SESSIONS [SIZE [REPS]]]]
#
# 1. Postfix side: ../shared/bench/run_load.sh (Postfix on POSTFIX_PORT -> smtp-sink on SINK_PORT).
# 2. relayd side: smtp-sink alone, relayd on RELAYD_PORT routing "*" to the sink, same load.
# 3. Prints a comparison table and appends it to benchmarks/RESULTS.md.
# Knobs (env): N=20000 SESSIONS=50 SIZE=1024 REPS=3 MAX_SECONDS=300 RELAYD_PORT=2535
#              POSTFIX_PORT=2525 SINK_PORT=2526 SOURCE_FLAGS="" KEEP_TMP=0 RECORD=1
# Needs root (configures and starts the system's Postfix, may apt-get install it).
# Loopback only; leaves no process behind (trap); every wait is bounded.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
BENCH_DIR=$REPO/benchmarks
SHARED=$REPO/../shared/bench
PEER=$SHARED/postfix_peer.sh
LOAD=$SHARED/run_load.sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH
ORIG_ARGS=("$@")
ENV_SET=""   # knobs given through the environment, shown in the printed command line
for v in N SESSIONS SIZE REPS MAX_SECONDS RELAYD_PORT POSTFIX_PORT SINK_PORT SOURCE_FLAGS KEEP_TMP RECORD RUN_DIR; do
  if [ -n "${!v+x}" ]; then ENV_SET="$ENV_SET$v=${!v@Q} "; fi
done

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }

QUICK=0
RECORD=${RECORD:-1}
POS=()
while [ $# -gt 0 ]; do
  case $1 in
    --quick) QUICK=1 ;;
    --no-record) RECORD=0 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "unknown option $1" >&2; usage >&2; exit 2 ;;
    *) POS+=("$1") ;;
  esac
  shift
done
if [ "$QUICK" = 1 ]; then N=${N:-2000}; REPS=${REPS:-1}; fi
N=${POS[0]:-${N:-20000}}
SESSIONS=${POS[1]:-${SESSIONS:-50}}
SIZE=${POS[2]:-${SIZE:-1024}}
REPS=${POS[3]:-${REPS:-3}}
MAX_SECONDS=${MAX_SECONDS:-300}
RELAYD_PORT=${RELAYD_PORT:-2535}
POSTFIX_PORT=${POSTFIX_PORT:-2525}
SINK_PORT=${SINK_PORT:-2526}
SOURCE_FLAGS=${SOURCE_FLAGS:-}
KEEP_TMP=${KEEP_TMP:-0}
export RUN_DIR=${RUN_DIR:-${TMPDIR:-/tmp}/relay-bench}
export SINK_ADDR=127.0.0.1 SINK_PORT MAX_SECONDS SOURCE_FLAGS
for v in N SESSIONS SIZE REPS MAX_SECONDS RELAYD_PORT POSTFIX_PORT SINK_PORT; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "$v must be a positive integer, got '${!v}'" >&2; exit 2; }
done

log() { echo "[bench] $*" >&2; }
die() { echo "[bench] ERROR: $*" >&2; exit 1; }
port_listening() { ss -ltn "sport = :$1" 2>/dev/null | grep -q LISTEN; }

CMDLINE="${ENV_SET}benchmarks/run.sh${ORIG_ARGS[*]:+ ${ORIG_ARGS[*]}}"
PARAMS="N=$N SESSIONS=$SESSIONS SIZE=$SIZE REPS=$REPS MAX_SECONDS=$MAX_SECONDS${SOURCE_FLAGS:+ SOURCE_FLAGS=\"$SOURCE_FLAGS\"}; ports: postfix $POSTFIX_PORT, relayd $RELAYD_PORT, sink $SINK_PORT"
[ -x "$LOAD" ] && [ -x "$PEER" ] || die "missing $SHARED/{run_load.sh,postfix_peer.sh} (shared/ must sit beside the repo)"
[ "$(id -u)" = 0 ] || die "must run as root (configures/starts Postfix, may install packages)"

# ---------------------------------------------------------------- state and cleanup
TMP=$(mktemp -d "${TMPDIR:-/tmp}/relayd-bench.XXXXXX")
RELAYD_PID=""
LOAD_PID=""
TAIL_PID=""
RELAYD_PIDFILE=$RUN_DIR/relayd.pid
mkdir -p "$RUN_DIR"

# our relayd only: the pid must still be a process running our venv's relayd
is_our_relayd() { [ -n "$1" ] && tr '\0' ' ' < "/proc/$1/cmdline" 2>/dev/null | grep -q "relayd --config .*relayd-bench\.[^/]*/relayd.toml"; }
# dead or zombie
gone() { local s; s=$(sed -E 's/^[0-9]+ \(.*\) ([A-Z]).*/\1/' "/proc/$1/stat" 2>/dev/null) || return 0; [ "$s" = Z ] || [ "$s" = X ]; }

RELAYD_RC=""
stop_relayd() {   # SIGTERM, wait shutdown_timeout (30 s) + margin, then SIGKILL; sets RELAYD_RC
  local p=$1 i
  [ -n "$p" ] || return 0
  if ! gone "$p"; then
    kill -TERM "$p" 2>/dev/null || true
    for i in $(seq 1 400); do gone "$p" && break; sleep 0.1; done
    if ! gone "$p"; then log "relayd pid $p did not stop within 40 s, SIGKILL"; kill -KILL "$p" 2>/dev/null || true; sleep 0.2; fi
  fi
  RELAYD_RC=0; wait "$p" 2>/dev/null || RELAYD_RC=$?
}

descendants() {   # pids of the live process tree under $1 (children first listed after parent)
  local c
  for c in $(cat /proc/"$1"/task/*/children 2>/dev/null); do echo "$c"; descendants "$c"; done
}

group_alive() { ps -e -o pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ {f = 1} END {exit !f}'; }

# run_load.sh runs in its own process group (setsid), but `timeout` moves smtp-source into a
# group of its own. Freeze run_load's group so that it cannot move on to its next step, stop
# the load generator first (so that Postfix is idle when run_load's own trap stops it), then
# terminate and resume the group.
stop_load() {
  local p=$1 i others
  [ -n "$p" ] || return 0
  if kill -0 "$p" 2>/dev/null; then
    kill -STOP -- "-$p" 2>/dev/null || true
    others=$(for c in $(descendants "$p"); do
      [ "$(ps -o pgid= -p "$c" 2>/dev/null | tr -d ' ')" = "$p" ] || echo "$c"; done | tr '\n' ' ')
    # shellcheck disable=SC2086
    [ -z "$others" ] || kill -TERM $others 2>/dev/null || true
    sleep 0.3
    kill -TERM -- "-$p" 2>/dev/null || true
    kill -CONT -- "-$p" 2>/dev/null || true
    for i in $(seq 1 100); do
      group_alive "$p" || { for c in $others; do gone "$c" || continue 2; done; break; }
      sleep 0.1
    done
    # shellcheck disable=SC2086
    kill -KILL -- "-$p" $others 2>/dev/null || true
  fi
  wait "$p" 2>/dev/null || true
  [ -z "$TAIL_PID" ] || { kill "$TAIL_PID" 2>/dev/null || true; wait "$TAIL_PID" 2>/dev/null || true; }
}

# A Postfix stopped in the middle of a reception (an aborted run) leaves incomplete files in
# incoming/: temporary "inode.usec" names and queue files without the owner-execute bit (the bit
# Postfix sets once a message is complete). At the next "postfix start", postsuper warns about
# the former ("bogus file name") and, running as the postfix user, cannot open maillog_file
# (root's /var/log/postfix-bench.log): fatal, Postfix does not start. Such files were never
# acknowledged to any client: remove them while Postfix is down. Complete queue files stay and
# are delivered (run_load waits for an empty queue before each rep).
postfix_queue_hygiene() {
  local q=/var/spool/postfix/incoming n
  [ -d "$q" ] || return 0
  postfix status >/dev/null 2>&1 && return 0
  n=$(find "$q" -maxdepth 1 -type f ! -perm -u+x | wc -l)
  [ "$n" = 0 ] && return 0
  log "removing $n incomplete files from $q (left by an aborted Postfix run)"
  find "$q" -maxdepth 1 -type f ! -perm -u+x -delete
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_load "$LOAD_PID"
  stop_relayd "$RELAYD_PID"
  rm -f "$RELAYD_PIDFILE"
  "$PEER" down >/dev/null 2>&1 || true      # postfix (only if started by postfix_peer.sh) + sink
  if [ "$KEEP_TMP" = 1 ] || { [ "$rc" != 0 ] && [ "$rc" != 130 ] && [ "$rc" != 143 ]; }; then log "kept $TMP (relayd.log, relayd.err, relayd.toml, load logs)"
  else rm -rf "$TMP"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# a relayd left behind by an earlier aborted run of this script (SIGKILLed)
if [ -s "$RELAYD_PIDFILE" ] && is_our_relayd "$(cat "$RELAYD_PIDFILE")"; then
  p=$(cat "$RELAYD_PIDFILE"); log "stopping stale benchmark relayd pid $p"
  kill -TERM "$p" 2>/dev/null || true
  for _ in $(seq 1 400); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$p" 2>/dev/null || true
fi
rm -f "$RELAYD_PIDFILE"

# ---------------------------------------------------------------- 1. tools
if ! command -v smtp-source >/dev/null || ! command -v smtp-sink >/dev/null \
   || ! command -v postfix >/dev/null || ! command -v bc >/dev/null; then
  log "installing postfix / smtp-source / smtp-sink / bc"
  "$PEER" install
fi
command -v smtp-source >/dev/null || die "smtp-source still missing after install"
RELAYD=$REPO/.venv/bin/relayd
VPY=$REPO/.venv/bin/python
if [ ! -x "$RELAYD" ]; then
  PY=$(command -v python3.11 || command -v python3) || die "no python3.11/python3 to build the venv"
  log "creating $REPO/.venv with $PY and installing relayd (pip install -e .)"
  [ -x "$VPY" ] || "$PY" -m venv "$REPO/.venv"
  "$REPO/.venv/bin/pip" install -q -e "$REPO"
fi
[ -x "$RELAYD" ] || die "$RELAYD missing after install"

# ---------------------------------------------------------------- helpers
kv() { sed -n "s/.*\\b$1=\\([^ ]*\\).*/\\1/p" <<<"$2" | head -1; }

# run_load.sh in the background, in its own process group, so that the trap can stop it whole.
# $1: stdout file, $2: stderr file, rest: env assignments; N SESSIONS SIZE REPS appended.
run_load() {
  local out=$1 err=$2 rc=0; shift 2
  log "+ $* $LOAD $N $SESSIONS $SIZE $REPS"
  : > "$err"
  env "$@" setsid "$LOAD" "$N" "$SESSIONS" "$SIZE" "$REPS" > "$out" 2> "$err" < /dev/null &
  LOAD_PID=$!
  tail -n +1 -f --pid="$LOAD_PID" "$err" >&2 &     # live progress; ends with run_load
  TAIL_PID=$!
  wait "$LOAD_PID" || rc=$?
  LOAD_PID=""
  wait "$TAIL_PID" || true
  TAIL_PID=""
  return "$rc"
}

START_DATE=$(date -u '+%Y-%m-%d %H:%M UTC')
LOADAVG=$(cut -d' ' -f1-3 /proc/loadavg)
GITREV=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
[ -n "$(git -C "$REPO" status --porcelain -- relayd pyproject.toml 2>/dev/null)" ] && GITREV="$GITREV+dirty"
log "command: $CMDLINE  ($PARAMS)"
log "temp dir: $TMP   run dir: $RUN_DIR   loadavg at start: $LOADAVG"

# ---------------------------------------------------------------- 2. Postfix side
for p in "$POSTFIX_PORT" "$RELAYD_PORT"; do
  port_listening "$p" && die "port $p is already in use (set POSTFIX_PORT / RELAYD_PORT)"
done
"$PEER" down >/dev/null 2>&1 || true       # stale postfix/sink of an aborted run (own PIDs only)
postfix_queue_hygiene
port_listening "$SINK_PORT" && die "port $SINK_PORT (sink) is in use by a process not started by postfix_peer.sh (set SINK_PORT)"
log "=== Postfix: 127.0.0.1:$POSTFIX_PORT -> smtp-sink 127.0.0.1:$SINK_PORT"
PF_CMD="MANAGE_PEER=1 TARGET_PORT=$POSTFIX_PORT SINK_PORT=$SINK_PORT"
run_load "$TMP/postfix.out" "$TMP/postfix.err" MANAGE_PEER=1 TARGET_PORT="$POSTFIX_PORT" \
  || die "Postfix run failed (run_load rc=$?), see $TMP/postfix.err"
PF=$(cat "$TMP/postfix.out")
log "postfix: $PF"
"$PEER" down >/dev/null 2>&1 || true       # make sure Postfix is stopped before relayd runs

# ---------------------------------------------------------------- 3. relayd side
log "=== relayd: 127.0.0.1:$RELAYD_PORT -> smtp-sink 127.0.0.1:$SINK_PORT"
"$PEER" sink-up
cat > "$TMP/relayd.toml" <<EOF
# generated by benchmarks/run.sh
[server]
hostname = "relayd.bench"
spool_path = "$TMP/spool/relayd.sqlite"
log_level = "info"
shutdown_timeout = "30s"

[[listeners]]
address = "127.0.0.1:$RELAYD_PORT"
kind = "relay"

[ingress]
trusted_networks = ["127.0.0.0/8"]

[routes]
"*" = "127.0.0.1:$SINK_PORT"

[shaping.default]
max_connections = 50
max_messages_per_connection = 1000
EOF
"$RELAYD" --check --config "$TMP/relayd.toml" >&2
"$RELAYD" --config "$TMP/relayd.toml" > "$TMP/relayd.log" 2> "$TMP/relayd.err" < /dev/null &
RELAYD_PID=$!
echo "$RELAYD_PID" > "$RELAYD_PIDFILE"
for _ in $(seq 1 300); do
  port_listening "$RELAYD_PORT" && break
  gone "$RELAYD_PID" && break
  sleep 0.1
done
port_listening "$RELAYD_PORT" && ! gone "$RELAYD_PID" \
  || { cat "$TMP/relayd.err" >&2; die "relayd did not start listening on $RELAYD_PORT within 30 s"; }
log "relayd pid $RELAYD_PID listening on 127.0.0.1:$RELAYD_PORT"
RD_RC=0
run_load "$TMP/relayd.out" "$TMP/relayd.load.err" RELAY_KIND=other MANAGE_PEER=0 \
  RELAY_PID="$RELAYD_PID" TARGET_PORT="$RELAYD_PORT" || RD_RC=$?
RD=$(cat "$TMP/relayd.out")
# VmHWM of relayd's two processes (queue process and its ingress process), summed
RSS_KB=$(for p in "$RELAYD_PID" $(cat /proc/"$RELAYD_PID"/task/*/children 2>/dev/null); do
  awk '/^VmHWM:/{print $2}' "/proc/$p/status" 2>/dev/null; done | awk '{s += $1} END {print s+0}')
SINK_TOTAL=$("$PEER" sink-count)
t_stop=$(date +%s.%N)
stop_relayd "$RELAYD_PID"
STOP_S=$(echo "$(date +%s.%N) - $t_stop" | bc -l)
RELAYD_PID=""; rm -f "$RELAYD_PIDFILE"
"$PEER" sink-down

# relayd's own account: events in its log, recipient states left in the spool
count() { grep -cE "\"event\": ?\"$1\"" "$TMP/relayd.log" || true; }
ACC=$(count accepted); DLV=$(count delivered); DEF=$(count deferred); BNC=$(count bounced)
ERRS=$(grep -cE '"level": ?"error"' "$TMP/relayd.log" || true)
STDERR_LINES=$(wc -l < "$TMP/relayd.err")
SPOOL=$("$VPY" - "$TMP/spool/relayd.sqlite" <<'EOF' 2>&1 || true
import sqlite3, sys
names = {0: "pending", 1: "deferred", 2: "delivered", 3: "bounced", 4: "held", 5: "active"}
c = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True)
rows = c.execute("SELECT state, count(*) FROM recipients GROUP BY state ORDER BY state").fetchall()
print(" ".join(f"{names.get(s, s)}={n}" for s, n in rows) or "empty")
EOF
)
EXPECT=$(( N * REPS ))
SANITY="relayd log: accepted=$ACC delivered=$DLV deferred=$DEF bounced=$BNC error_events=$ERRS stderr_lines=$STDERR_LINES; spool recipients: $SPOOL; sink received $SINK_TOTAL (expected $EXPECT); SIGTERM->exit $(printf '%.1f' "$STOP_S") s, exit status $RELAYD_RC"
log "$SANITY"
if [ "$RD_RC" != 0 ] || [ -z "$RD" ]; then
  grep '"level": "error"' "$TMP/relayd.log" | head -5 >&2 || true
  tail -20 "$TMP/relayd.err" >&2 || true
  die "relayd run failed (run_load rc=$RD_RC); logs in $TMP"
fi
PROBLEMS=""
[ "$DLV" = "$EXPECT" ] || PROBLEMS="$PROBLEMS delivered=$DLV!=$EXPECT"
[ "$ACC" = "$EXPECT" ] || PROBLEMS="$PROBLEMS accepted=$ACC!=$EXPECT"
[ "$ERRS" = 0 ] || PROBLEMS="$PROBLEMS error_events=$ERRS"
[ "$SINK_TOTAL" -ge "$EXPECT" ] || PROBLEMS="$PROBLEMS sink_received=$SINK_TOTAL<$EXPECT"
[ "$STDERR_LINES" = 0 ] || PROBLEMS="$PROBLEMS stderr_lines=$STDERR_LINES"
[ "$RELAYD_RC" = 0 ] || PROBLEMS="$PROBLEMS relayd_exit_status=$RELAYD_RC"
grep -qE 'pending|deferred|active' <<<"$SPOOL" && PROBLEMS="$PROBLEMS spool_not_drained($SPOOL)"

# ---------------------------------------------------------------- 4. table
ratio() { echo "scale=4; if ($2 > 0) $1 / $2 else 0" | bc -l | awk '{printf "%.2f", $1}'; }
ms_per_msg() { echo "scale=6; 1000 * $1 / $N" | bc -l | awk '{printf "%.2f", $1}'; }
r_i=$(kv ingress_msgs_per_s "$RD"); r_imin=$(kv ingress_min "$RD"); r_imax=$(kv ingress_max "$RD")
r_e=$(kv e2e_msgs_per_s "$RD"); r_emin=$(kv e2e_min "$RD"); r_emax=$(kv e2e_max "$RD")
r_c=$(kv relay_cpu_s_median "$RD")
p_i=$(kv ingress_msgs_per_s "$PF"); p_imin=$(kv ingress_min "$PF"); p_imax=$(kv ingress_max "$PF")
p_e=$(kv e2e_msgs_per_s "$PF"); p_emin=$(kv e2e_min "$PF"); p_emax=$(kv e2e_max "$PF")
p_c=$(kv relay_cpu_s_median "$PF")
r_cpm=$(ms_per_msg "$r_c"); p_cpm=$(ms_per_msg "$p_c")
RSS_MB=$(echo "scale=1; $RSS_KB / 1024" | bc -l)
# share of all vCPUs busy outside the relay and smtp-source during each rep (the sink, the
# kernel, anything else running on the machine): high values mean a noisy measurement
NCPU=$(nproc)
foreign() {
  grep -h '^rep=' "$1" | awk -v n="$NCPU" '{
      for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
      o = v["sys_cpu_busy_pct"] / 100 * n * v["e2e_s"] - v["relay_cpu_s"] - v["smtp_source_cpu_s"]
      printf "%s%.0f", (NR > 1 ? "/" : ""), 100 * o / (n * v["e2e_s"]) }'
}
r_f=$(foreign "$TMP/relayd.load.err"); p_f=$(foreign "$TMP/postfix.err")

TABLE=$(cat <<EOF
| metric (median of $REPS, min–max) | relayd | Postfix | relayd / Postfix |
|---|---:|---:|---:|
| ingress msgs/s | $r_i ($r_imin–$r_imax) | $p_i ($p_imin–$p_imax) | $(ratio "$r_i" "$p_i") |
| end-to-end msgs/s | $r_e ($r_emin–$r_emax) | $p_e ($p_emin–$p_emax) | $(ratio "$r_e" "$p_e") |
| CPU ms per message (relay process tree) | $r_cpm | $p_cpm | $(ratio "$r_cpm" "$p_cpm") |
| peak RSS (VmHWM) MB | $RSS_MB | – | |
| % of all CPUs busy outside relay & smtp-source, per rep | $r_f | $p_f | |
EOF
)
PERREP=$(grep -h '^rep=' "$TMP/postfix.err" | sed 's/^/postfix /'; grep -h '^rep=' "$TMP/relayd.load.err" | sed 's/^/relayd  /')

echo
echo "command: $CMDLINE"
echo "parameters: $PARAMS (relayd commit $GITREV; loadavg at start $LOADAVG)"
echo "postfix: $PF_CMD $LOAD $N $SESSIONS $SIZE $REPS"
echo "relayd:  RELAY_KIND=other MANAGE_PEER=0 RELAY_PID=<relayd pid> TARGET_PORT=$RELAYD_PORT SINK_PORT=$SINK_PORT $LOAD $N $SESSIONS $SIZE $REPS"
echo
echo "$TABLE"
echo
echo "$SANITY"
[ -z "$PROBLEMS" ] || echo "WARNING: relayd anomalies:$PROBLEMS (logs kept in $TMP)"

# ---------------------------------------------------------------- RESULTS.md
if [ "$RECORD" = 1 ]; then
  RES=$BENCH_DIR/RESULTS.md
  if [ ! -e "$RES" ]; then
    cat > "$RES" <<'EOF'
# relayd vs Postfix — benchmark results

Produced by `benchmarks/run.sh` (see `benchmarks/README.md`); each run appends a section.

What is measured: `smtp-source` pushes N messages (one recipient, SIZE bytes, SESSIONS parallel
sessions, a new connection per message) into the relay under test on 127.0.0.1, which relays
them to an `smtp-sink` on 127.0.0.1 (port 2526 unless SINK_PORT says otherwise).
*Ingress* = N / time until smtp-source has had its last 250; *end-to-end* = N / time until the
sink has counted all N. *CPU* = user+system CPU of the relay's process tree (relayd: its one
process, all threads; Postfix: master and all its children) during a rep, divided by N.
*Peak RSS* = relayd's VmHWM at the end of all reps. The last row is the share of the machine
busy with anything else during each rep (the sink, kernel work such as the ext4 journal, other
tenants): 3–11 % on a quiet machine; well above that the rep was disturbed.

Both acknowledge only mail that is on disk, in different ways:
- relayd answers 250 only after the message's group commit is durable: its SQLite spool runs in
  WAL mode with `synchronous=FULL` and fsyncs every group commit before the 250. It logs one
  JSON line per reception and per delivery at `info` level (to a file). Shaping: 50 connections
  to the sink, up to 1000 messages per connection; `delivery.max_active` at its default.
- Postfix runs with its defaults as configured by `../shared/bench/postfix_peer.sh`
  (concurrency 50 to the relayhost, `in_flow_delay = 1s`, no TLS, no chroot, logging through
  postlogd to `/var/log/postfix-bench.log`): its cleanup daemon fsyncs each queue file, one
  file and one fsync per message, before smtpd answers 250.

Both run one after the other on the same machine, never at the same time. Figures are noisy on
shared 2-vCPU machines: compare the min–max ranges, not only the medians.
EOF
  fi
  {
    echo
    echo "## $START_DATE — N=$N, $SESSIONS sessions, $SIZE B, $REPS rep(s)$([ "$QUICK" = 1 ] && echo " (quick)")"
    echo
    echo "Command: \`$CMDLINE\` ($PARAMS); relayd commit $GITREV; $(nproc) vCPU"
    echo "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); loadavg at start $LOADAVG."
    echo
    echo "$TABLE"
    echo
    echo "Check: $SANITY${PROBLEMS:+ — **anomalies:$PROBLEMS**}"
    echo
    echo '```'
    echo "$PERREP"
    echo '```'
  } >> "$RES"
  log "appended to $RES"
fi
[ -z "$PROBLEMS" ] || exit 7
