#!/usr/bin/env bash
# mlflow_server.sh — an MLflow tracking server for sweeps that run on a cluster.
#
#   launchers/mlflow_server.sh [options] [BACKEND] [-- extra `mlflow server` args]
#   launchers/mlflow_server.sh stop [--state-dir DIR]
#   launchers/mlflow_server.sh install-postgres
#
# BACKEND   a sqlite file path (made absolute; default ./outputs/mlflow.db, the same store the
#           jobs use when tracking.uri is null), a database URL
#           (postgresql://user@db/mlflow, mysql://..., sqlite:////abs/path.db), or `postgres`:
#           a PostgreSQL of the server's own (Debian's packages, installed by install-postgres
#           when missing), data in <state-dir>/postgres/data, reached only over a unix socket
#           in <state-dir>/postgres/socket (no TCP). As root it runs as the `postgres` user
#           (PostgreSQL refuses root), which must be able to reach the state dir.
#           `stop` stops both the MLflow server and that PostgreSQL.
# Options:
#   --host H            interface to bind (default 0.0.0.0: reachable from compute nodes;
#                       127.0.0.1 for loopback-only, e.g. in tests)
#   --port P            port (default 5000)
#   --artifacts DIR|URI --artifacts-destination for the proxied artifact store
#                       (default ./outputs/mlartifacts); --serve-artifacts is always on, so jobs
#                       upload artifacts THROUGH the server and need no access to DIR
#   --workers N         server worker processes (default 2)
#   --background        start detached, log + pid in --state-dir, wait until /health answers
#   --state-dir DIR     where --background keeps mlflow_server.{pid,log}, and BACKEND=postgres
#                       its database (default ./outputs)
# Environment: MLFLOW_SERVER_ALLOWED_HOSTS replaces the computed --allowed-hosts list;
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION defaults to false here (MLflow 3's GenAI job runner
#   spawns ~8 extra processes that a training sweep never uses; set true to get it back).
# It prints the override jobs should use, e.g.
#   python -m sae_sweep -m hydra/launcher=slurm tracking.uri=http://login01:5000 ...
#
# When is a shared sqlite file unsafe, and why a server then?
#   With tracking.uri=null every job opens <paths.output_dir>/mlflow.db itself. That is fine
#   when all writers share one local disk (one machine, or a handful of jobs on one node):
#   SQLite serialises writers with POSIX file locks. On network filesystems (NFS, Lustre,
#   GPFS, BeeGFS, SMB) those locks are unreliable or disabled, so many concurrent writers from
#   different nodes — exactly what a SLURM array is — can hit "database is locked" errors,
#   lose writes or corrupt the file. Then run this server on ONE machine (login node, or a
#   long CPU job) with its sqlite file on that machine's LOCAL disk (or use a real database
#   URL), and point every job at it with tracking.uri=http://HOST:PORT: only the server
#   process touches the database.
set -euo pipefail

HOST=0.0.0.0
PORT=5000
WORKERS=2
ARTIFACTS=./outputs/mlartifacts
BACKEND=./outputs/mlflow.db
STATE_DIR=./outputs
BACKGROUND=0
EXTRA=()

log() { printf '[mlflow_server] %s\n' "$*" >&2; }
die() { printf '[mlflow_server] ERROR: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,31p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }

# -- BACKEND=postgres: a PostgreSQL of our own under $STATE_DIR/postgres --------------------------
PG_PORT=5432 # names the socket file only: the server listens on no TCP port
SUDO=()
[[ $(id -u) -eq 0 ]] || SUDO=(sudo)

pg_bindir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

install_postgres() {
    [[ -n "$(pg_bindir)" ]] && return 0
    log "installing PostgreSQL (Debian package postgresql)"
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" apt-get install -y -q --no-install-recommends postgresql >&2 ||
        { "${SUDO[@]}" apt-get update -q >&2 && "${SUDO[@]}" apt-get install -y -q --no-install-recommends postgresql >&2; } ||
        die "could not install PostgreSQL (apt-get install postgresql); install it, or give a database URL as BACKEND"
    [[ -n "$(pg_bindir)" ]] || die "postgresql installed, but no /usr/lib/postgresql/*/bin"
}

# PostgreSQL refuses to run as root: as root, run it as the `postgres` user the package creates.
as_pg() {
    if [[ $(id -u) -eq 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

pg_paths() {
    PG_DIR="$STATE_DIR/postgres"
    PG_DATA="$PG_DIR/data"
    PG_SOCKET="$PG_DIR/socket"
}

pg_running() { [[ -s "$PG_DATA/postmaster.pid" ]] && as_pg "$(pg_bindir)/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1; }

start_postgres() {
    install_postgres
    local bin
    bin="$(pg_bindir)"
    mkdir -p "$STATE_DIR"
    STATE_DIR="$(realpath "$STATE_DIR")"
    pg_paths
    mkdir -p "$PG_SOCKET"
    touch "$PG_DIR/postgres.log" # written by initdb (through our shell) and by the server
    [[ $(id -u) -ne 0 ]] || chown -R postgres: "$PG_DIR"
    chmod 700 "$PG_DIR" "$PG_SOCKET" # trust auth below: only who can reach the socket may connect
    as_pg test -w "$PG_DIR" ||
        die "PostgreSQL runs as user postgres here (it refuses root) and cannot reach $PG_DIR (a parent directory is not searchable by it): pick a --state-dir it can reach"
    # a unix socket path is limited to 107 bytes
    ((${#PG_SOCKET} + 14 <= 107)) ||
        die "--state-dir $STATE_DIR is too long for PostgreSQL's unix socket ($PG_SOCKET/.s.PGSQL.$PG_PORT, at most 107 bytes): pick a shorter one"
    if [[ ! -s "$PG_DATA/PG_VERSION" ]]; then
        log "initdb $PG_DATA"
        as_pg "$bin/initdb" -D "$PG_DATA" -U mlflow --auth-local=trust --auth-host=reject -E UTF8 --no-locale --no-instructions \
            >>"$PG_DIR/postgres.log" 2>&1 || { tail -n 20 "$PG_DIR/postgres.log" >&2; die "initdb failed"; }
    fi
    if pg_running; then
        log "PostgreSQL already running on $PG_DATA (pid $(head -n 1 "$PG_DATA/postmaster.pid")): using it"
    else
        as_pg "$bin/pg_ctl" -D "$PG_DATA" -l "$PG_DIR/postgres.log" -w -t 120 \
            -o "-c listen_addresses='' -k $PG_SOCKET -p $PG_PORT" start >/dev/null ||
            { tail -n 20 "$PG_DIR/postgres.log" >&2; die "PostgreSQL did not start (log $PG_DIR/postgres.log)"; }
        log "PostgreSQL up (pid $(head -n 1 "$PG_DATA/postmaster.pid"), data $PG_DATA, log $PG_DIR/postgres.log)"
    fi
    if [[ "$(as_pg "$bin/psql" -h "$PG_SOCKET" -p "$PG_PORT" -U mlflow -d postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname = 'mlflow'")" != 1 ]]; then
        as_pg "$bin/createdb" -h "$PG_SOCKET" -p "$PG_PORT" -U mlflow mlflow
    fi
    # the driver named: SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3, the extra installs psycopg2
    BACKEND_URI="postgresql+psycopg2://mlflow@/mlflow?host=$PG_SOCKET&port=$PG_PORT"
}

stop_postgres() {
    pg_paths
    [[ -s "$PG_DATA/postmaster.pid" ]] || return 0
    if ! pg_running; then
        log "PostgreSQL on $PG_DATA not running"
        return 0
    fi
    local pid i
    pid="$(head -n 1 "$PG_DATA/postmaster.pid")"
    log "stopping PostgreSQL (pid $pid, data $PG_DATA)"
    as_pg "$(pg_bindir)/pg_ctl" -D "$PG_DATA" -m fast -w -t 60 stop >/dev/null
    # pg_ctl returns once the pid file is gone; the postmaster exits a moment later
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    die "PostgreSQL (pid $pid) still running 10 s after pg_ctl stop"
}

stop_server() {
    stop_mlflow
    stop_postgres
}

stop_mlflow() {
    local pidfile="$STATE_DIR/mlflow_server.pid" pid i
    [[ -s "$pidfile" ]] || { log "no $pidfile: no MLflow server to stop"; return 0; }
    pid="$(tr -dc '0-9' <"$pidfile")"
    if [[ -z "$pid" ]] || ! kill -0 "$pid" 2>/dev/null; then
        log "server (pid ${pid:-?}) not running"
        rm -f "$pidfile"
        return 0
    fi
    # --background starts the server with setsid, so its pid is also its process-group id:
    # signal the group, or the uvicorn workers it forked outlive it.
    log "stopping mlflow server (process group $pid)"
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
    for ((i = 0; i < 60; i++)); do
        kill -0 -- "-$pid" 2>/dev/null || { rm -f "$pidfile"; return 0; }
        sleep 0.25
    done
    log "still running after 15 s; SIGKILL"
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$pidfile"
}

ACTION=start
case "${1:-}" in
stop | install-postgres) ACTION="$1"; shift ;;
esac
while (($#)); do
    case "$1" in
    --host) HOST="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --artifacts | --artifacts-destination) ARTIFACTS="$2"; shift 2 ;;
    --workers) WORKERS="$2"; shift 2 ;;
    --state-dir) STATE_DIR="$2"; shift 2 ;;
    --background) BACKGROUND=1; shift ;;
    -h | --help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    -*) die "unknown option $1 (pass mlflow's own options after --)" ;;
    *) BACKEND="$1"; shift ;;
    esac
done

case "$ACTION" in
stop) stop_server; exit 0 ;;
install-postgres) install_postgres; log "PostgreSQL binaries in $(pg_bindir)"; exit 0 ;;
esac

export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
command -v mlflow >/dev/null 2>&1 || die "mlflow not found on PATH (pip install mlflow)"

# backend: a URL as given, `postgres` -> ours (started below, once the port is known free),
# a path -> absolute sqlite URL
if [[ "$BACKEND" == *://* ]]; then
    BACKEND_URI="$BACKEND"
elif [[ "$BACKEND" == postgres ]]; then
    BACKEND_URI=
else
    mkdir -p "$(dirname "$BACKEND")"
    BACKEND_URI="sqlite:///$(realpath -m "$BACKEND")"
fi
# artifacts: a URI as given, a path -> absolute path
if [[ "$ARTIFACTS" != *://* ]]; then
    mkdir -p "$ARTIFACTS"
    ARTIFACTS="$(realpath "$ARTIFACTS")"
fi

# the name jobs will use to reach us
case "$HOST" in
0.0.0.0 | ::) ADVERTISE="$(hostname -f 2>/dev/null || hostname -s)" ;;
*) ADVERTISE="$HOST" ;;
esac

# mlflow >= 3 rejects requests whose Host header it does not know (DNS-rebinding guard; the
# default only allows localhost and private IPs), so allow this machine's names too.
allowed=("localhost" "localhost:$PORT" "127.0.0.1" "127.0.0.1:$PORT" "10.*" "192.168.*")
for n in $(seq 16 31); do allowed+=("172.$n.*"); done
for name in "$ADVERTISE" "$(hostname -s)" "$(hostname -f 2>/dev/null || true)" $(hostname -I 2>/dev/null || true); do
    [[ -n "$name" && "$name" != *:*:* ]] || continue # skip empty and IPv6
    allowed+=("$name" "$name:$PORT")
done
ALLOWED_HOSTS="${MLFLOW_SERVER_ALLOWED_HOSTS:-$(IFS=,; echo "${allowed[*]}")}"

# The port must be free: another process answering /health there would pass for this server.
# SO_REUSEADDR as the server binds: a listener there is refused, while the connections a killed
# server left in TIME_WAIT do not stop it from being restarted on its port.
port_free() {
    python3 - "$1" "$2" <<'PY'
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind((host, port))
except OSError as e:
    print(e.strerror or e, file=sys.stderr)
    sys.exit(1)
finally:
    s.close()
PY
}
if ! why="$(port_free "$HOST" "$PORT" 2>&1)"; then
    holder="$(ss -Hltnp "sport = :$PORT" 2>/dev/null | grep -o 'users:(.*)' | head -n 1 || true)"
    die "port $PORT on $HOST is not free ($why${holder:+; held by $holder}): pick another with --port"
fi

pidfile="$STATE_DIR/mlflow_server.pid"
if ((BACKGROUND)) && [[ -s "$pidfile" ]] && kill -0 "$(tr -dc '0-9' <"$pidfile")" 2>/dev/null; then
    die "a server is already running (pid $(cat "$pidfile")); '$0 stop --state-dir $STATE_DIR' first"
fi

# A PostgreSQL this run started is stopped again when the MLflow server fails to come up
# (foreground: when it exits); one found running on our data dir is left as it was.
STARTED_PG=0
stop_started_postgres() { ((STARTED_PG == 0)) || stop_postgres; }
if [[ -z "$BACKEND_URI" ]]; then
    pg_paths
    pg_running || STARTED_PG=1
    trap 'stop_started_postgres' EXIT # cleared once a background server is up
    start_postgres
fi

CMD=(mlflow server
    --backend-store-uri "$BACKEND_URI"
    --host "$HOST" --port "$PORT" --workers "$WORKERS"
    --serve-artifacts --artifacts-destination "$ARTIFACTS"
    --allowed-hosts "$ALLOWED_HOSTS"
    "${EXTRA[@]}")

URI="http://$ADVERTISE:$PORT"
cat >&2 <<EOF
[mlflow_server] backend:   $BACKEND_URI
[mlflow_server] artifacts: $ARTIFACTS (proxied: jobs upload through the server)
[mlflow_server] jobs should use:
    tracking.uri=$URI
  e.g. python -m sae_sweep -m hydra/launcher=slurm tracking.uri=$URI seed=42,49
EOF

# The process group of the process whose socket listens on TCP port $1 (empty when none is visible):
# the listening socket's inode from /proc/net/tcp{,6}, then the process holding it.
listener_pgid() {
    python3 - "$1" <<'PY'
import os, sys
port = int(sys.argv[1])
inodes = set()
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    try:
        rows = open(table).read().splitlines()[1:]
    except OSError:
        continue
    for row in rows:
        f = row.split()
        if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
            inodes.add(f[9])
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
        for fd in fds:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in {f"socket:[{i}]" for i in inodes}:
                print(os.getpgid(int(pid)))
                sys.exit(0)
    except OSError:
        continue
PY
}

if ((BACKGROUND)); then
    mkdir -p "$STATE_DIR"
    logfile="$STATE_DIR/mlflow_server.log"
    setsid "${CMD[@]}" >>"$logfile" 2>&1 </dev/null & # appended: a restart keeps the log of the server before it
    echo $! >"$pidfile"
    probe="http://127.0.0.1:$PORT/health"
    [[ "$HOST" == 0.0.0.0 || "$HOST" == :: ]] || probe="http://$HOST:$PORT/health"
    for ((i = 0; i < 360; i++)); do
        if python3 -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" "$probe" 2>/dev/null; then
            # the port was free when we started, so the answer is ours only while our server lives
            kill -0 "$(cat "$pidfile")" 2>/dev/null || { tail -n 30 "$logfile" >&2; rm -f "$pidfile"; die "mlflow server exited"; }
            # and only if the socket listening on the port belongs to our server's process group
            owner="$(listener_pgid "$PORT")"
            if [[ "$owner" != "$(cat "$pidfile")" ]]; then
                tail -n 30 "$logfile" >&2
                die "port $PORT answers /health, but its listening socket belongs to ${owner:-a process not visible here}, not to this server (process group $(cat "$pidfile"))"
            fi
            trap - EXIT
            log "up (pid $(cat "$pidfile"), log $logfile); stop with: $0 stop --state-dir $STATE_DIR"
            echo "tracking.uri=$URI"
            exit 0
        fi
        kill -0 "$(cat "$pidfile")" 2>/dev/null || { tail -n 30 "$logfile" >&2; rm -f "$pidfile"; die "mlflow server exited"; }
        sleep 0.5
    done
    tail -n 30 "$logfile" >&2
    die "mlflow server did not answer $probe within 180 s"
fi

echo "tracking.uri=$URI"
if [[ "$BACKEND" != postgres ]]; then
    exec "${CMD[@]}"
fi
"${CMD[@]}" # not exec'd: the EXIT trap stops the PostgreSQL started for it
