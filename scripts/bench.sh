#!/usr/bin/env bash
# Benchmarks (BENCHMARKS.md): cochat against the Socket.IO + Redis adapter peer in bench/socketio.
#
#   scripts/bench.sh          full run: release build, the largest sizes this machine allows,
#                             results in bench/results/<scenario>.json
#   scripts/bench.sh smoke    a few seconds of every scenario with tiny numbers on a debug build;
#                             no thresholds, only that each runs and writes its JSON
#                             (bench/results/tmp/smoke/, git-ignored). The peer is skipped with a
#                             note unless bench/socketio/node_modules is installed; Postgres
#                             scenarios are skipped with a note when no Postgres answers.
#
# What it starts, all on 127.0.0.1 and all stopped at exit: cochat processes (SQLite in a temp
# dir, or a Postgres database created for the run and dropped after), a private redis-server on a
# free port, the Socket.IO peer (node), the fake AI provider (cochat-bench fake-llm). Environment:
# BENCH_POSTGRES_URL (admin URL, default postgres://postgres@127.0.0.1:5432/postgres),
# BENCH_SCENARIOS (a subset of "idle fanout fanout-busy durable cluster ai floor"), BENCH_NO_BUILD=1.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE="${1:-full}"
case "$MODE" in
full | smoke) ;;
*)
    echo "usage: scripts/bench.sh [full|smoke]" >&2
    exit 2
    ;;
esac

PG_ADMIN_URL="${BENCH_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}"

# BENCH_SCENARIOS="ai" (or any of: idle fanout fanout-busy durable cluster ai floor; cluster includes reconnect) runs
# only those; the default is all of them.
ALL_SCENARIOS="idle fanout fanout-busy durable cluster ai floor"
SCENARIOS="${BENCH_SCENARIOS:-$ALL_SCENARIOS}"
want() { [[ " $SCENARIOS " == *" $1 "* ]]; }

# BENCH_NO_BUILD=1 uses the binaries already in target/ (e.g. built a moment ago).
if [ "$MODE" = smoke ]; then
    [ -n "${BENCH_NO_BUILD:-}" ] || cargo build -p cochat -p cochat-bench
    BIN_DIR=target/debug
    OUT=bench/results/tmp/smoke
else
    [ -n "${BENCH_NO_BUILD:-}" ] || cargo build --release -p cochat -p cochat-bench
    BIN_DIR=target/release
    OUT=bench/results
fi
COCHAT="$PWD/$BIN_DIR/cochat"
BENCH="$PWD/$BIN_DIR/cochat-bench"
mkdir -p "$OUT"

WORK="$(mktemp -d /tmp/cochat-bench.XXXXXX)"
PIDS=()
DBS=()
SKIPPED=()
cleanup() {
    local pid db
    for pid in "${PIDS[@]}"; do
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    for db in "${DBS[@]}"; do
        psql "$PG_ADMIN_URL" -q -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

note() { echo "== $*" >&2; }
skip() {
    note "SKIPPED: $*"
    SKIPPED+=("$*")
}

free_port() { "$BENCH" free-port; }

wait_http() { # URL PID NAME
    local i
    for i in $(seq 1 300); do
        if curl -sf -o /dev/null "$1"; then return 0; fi
        if ! kill -0 "$2" 2>/dev/null; then
            echo "$3 exited during start; its log:" >&2
            tail -n 30 "$WORK/$3.log" >&2 || true
            return 1
        fi
        sleep 0.1
    done
    echo "$3 did not answer $1 within 30 s" >&2
    return 1
}

# start_cochat NAME PORT DATABASE_URL [VAR=VALUE ...]: sets STARTED_PID.
start_cochat() {
    local name="$1" port="$2" db="$3"
    shift 3
    mkdir -p "$WORK/$name"
    env COCHAT_BIND="127.0.0.1:$port" DATABASE_URL="$db" COCHAT_DATA_DIR="$WORK/$name" \
        JWT_SECRET="bench-secret-bench-secret-bench-secret" COCHAT_NODE_ID="$name" \
        COCHAT_RATE_PER_S=1000000 COCHAT_RATE_BURST=1000000 RUST_LOG=warn "$@" \
        "$COCHAT" >"$WORK/$name.log" 2>&1 &
    STARTED_PID=$!
    PIDS+=("$STARTED_PID")
    wait_http "http://127.0.0.1:$port/readyz" "$STARTED_PID" "$name"
}

stop_pid() {
    local pid="$1" i
    kill -TERM "$pid" 2>/dev/null || return 0
    for i in $(seq 1 30); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

HAVE_PG=0
if command -v psql >/dev/null && psql "$PG_ADMIN_URL" -q -c "select 1" >/dev/null 2>&1; then HAVE_PG=1; fi

# create_db: a new database (dropped at exit); its URL in DB.
create_db() {
    local name="cochat_bench_$(date +%s)_$RANDOM"
    psql "$PG_ADMIN_URL" -q -c "CREATE DATABASE $name" >/dev/null
    DBS+=("$name")
    DB="${PG_ADMIN_URL%/*}/$name"
}

REDIS_URL_PRIVATE=""
start_redis() {
    [ -n "$REDIS_URL_PRIVATE" ] && return 0
    command -v redis-server >/dev/null || return 1
    local port i
    port="$(free_port)"
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no >"$WORK/redis.log" 2>&1 &
    PIDS+=("$!")
    for i in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            REDIS_URL_PRIVATE="redis://127.0.0.1:$port/"
            return 0
        fi
        sleep 0.1
    done
    return 1
}

HAVE_PEER=0
if [ -d bench/socketio/node_modules/socket.io ]; then
    HAVE_PEER=1
elif [ "$MODE" = full ] && command -v npm >/dev/null; then
    note "installing the Socket.IO peer (npm ci in bench/socketio)"
    if (cd bench/socketio && npm ci --no-audit --no-fund >"$WORK/npm.log" 2>&1); then HAVE_PEER=1; else cat "$WORK/npm.log" >&2; fi
fi

# start_peer NAME PORT: the Socket.IO server with its Redis adapter; sets STARTED_PID.
start_peer() {
    local name="$1" port="$2"
    start_redis || { echo "redis-server is needed for the peer's adapter" >&2; return 1; }
    env PORT="$port" REDIS_URL="$REDIS_URL_PRIVATE" node bench/socketio/server.js >"$WORK/$name.log" 2>&1 &
    STARTED_PID=$!
    PIDS+=("$STARTED_PID")
    wait_http "http://127.0.0.1:$port/readyz" "$STARTED_PID" "$name"
}

run() { # OUTFILE ARGS...: runs the generator, keeps its JSON
    local file="$OUT/$1"
    shift
    note "cochat-bench $* --out $file"
    "$BENCH" "$@" --out "$file" >"$WORK/last.json"
}

# ------------------------------------------------------------------------------------------
# Sizes
if [ "$MODE" = smoke ]; then
    IDLE_CONNS=60 IDLE_WORKERS=2 IDLE_HOLD=1
    FAN_ROOMS=2 FAN_MEMBERS=5 FAN_SENDERS=2 FAN_RATES="40" FAN_DURATION=2 FAN_WORKERS=1
    FAN_BUSY_ROOMS=1 FAN_BUSY_MEMBERS=5 FAN_BUSY_RATES="40"
    DUR_CONNS=4 DUR_WINDOW=2 DUR_DURATION=2
    CL_RATES="40" RC_CONNS=30 RC_TIMEOUT=30
    AI_MEMBERS="5" AI_ROOMS=1 AI_ANSWERS=2 AI_TOKENS=10 AI_WORKERS=1
    FLOOR_FAN_RATES="40" FLOOR_DURATION=2 PGF_DURATION=2
else
    IDLE_CONNS="${BENCH_IDLE_CONNS:-19500}" IDLE_WORKERS=2 IDLE_HOLD=10
    FAN_ROOMS=20 FAN_MEMBERS=500 FAN_SENDERS=20 FAN_RATES="${BENCH_FAN_RATES:-50 100 150 250 1000 2000}" FAN_DURATION=10 FAN_WORKERS=2
    FAN_BUSY_ROOMS=2 FAN_BUSY_MEMBERS=500 FAN_BUSY_RATES="${BENCH_FAN_BUSY_RATES:-600 1200}"
    DUR_CONNS=64 DUR_WINDOW=8 DUR_DURATION=15
    CL_RATES="${BENCH_CL_RATES:-250 1000}" RC_CONNS=3000 RC_TIMEOUT=60
    AI_MEMBERS="${BENCH_AI_MEMBERS:-10 100 1000}" AI_ROOMS=1 AI_ANSWERS=10 AI_TOKENS=100 AI_WORKERS=2
    # From 300 msgs/s on the floor server falls seconds behind (28 s at 1,000): nothing more to learn.
    FLOOR_FAN_RATES="${BENCH_FLOOR_FAN_RATES:-50 100 150 200 250 300 500}" FLOOR_DURATION=10 PGF_DURATION=15
fi
PGF_CLIENTS=4 PGF_BATCH=250 # the Postgres floor: transactions in flight, messages per transaction
AI_RATE=50 # tokens/s from the fake provider

# run.json describes a run of every scenario; a partial run writes run-<scenarios>.json instead.
RUN_JSON=run.json
[ "$SCENARIOS" = "$ALL_SCENARIOS" ] || RUN_JSON="run-$(echo $SCENARIOS | tr ' ' '-').json"
{
    echo "{"
    echo "  \"mode\": \"$MODE\","
    echo "  \"date_utc\": \"$(date -u +%Y-%m-%dT%H:%M:%SZ)\","
    echo "  \"git_head\": \"$(git rev-parse --short HEAD 2>/dev/null || echo '?')\","
    echo "  \"loadavg_at_start\": \"$(cut -d' ' -f1-3 /proc/loadavg)\","
    echo "  \"nproc\": $(nproc),"
    echo "  \"cpu_model\": \"$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')\","
    echo "  \"mem_total_kib\": $(awk '/MemTotal/ {print $2}' /proc/meminfo),"
    echo "  \"open_files_limit\": \"$(ulimit -n)\","
    echo "  \"scenarios\": \"$SCENARIOS\""
    echo "}"
} >"$OUT/$RUN_JSON"

# ------------------------------------------------------------------------------------------
# idle
if want idle; then
note "idle: cochat"
PORT="$(free_port)"
start_cochat idle "$PORT" "sqlite://$WORK/idle/cochat.db"
run idle-cochat.json idle --target cochat --nodes "127.0.0.1:$PORT" --conns "$IDLE_CONNS" \
    --workers "$IDLE_WORKERS" --hold "$IDLE_HOLD" --server-pid "$STARTED_PID" --label "sqlite, 1 node"
stop_pid "$STARTED_PID"

if [ "$HAVE_PEER" = 1 ]; then
    note "idle: socket.io peer"
    PORT="$(free_port)"
    start_peer peer-idle "$PORT"
    run idle-socketio.json idle --target socketio --nodes "127.0.0.1:$PORT" --conns "$IDLE_CONNS" \
        --workers "$IDLE_WORKERS" --hold "$IDLE_HOLD" --server-pid "$STARTED_PID" --label "socket.io + redis adapter, 1 process"
    stop_pid "$STARTED_PID"
else
    skip "socket.io peer (bench/socketio/node_modules not installed: cd bench/socketio && npm ci)"
fi
fi

# ------------------------------------------------------------------------------------------
# fanout, one node (SQLite: the single-node default; Postgres would share the 2 cores too)
# fanout_pair NAME ROOMS MEMBERS SENDERS RATE: cochat, then the peer, on that shape and rate.
fanout_pair() {
    local name="$1" rooms="$2" members="$3" senders="$4" rate="$5"
    note "$name: cochat, $rate msgs/s, $rooms rooms x $members members"
    PORT="$(free_port)"
    start_cochat "$name-$rate" "$PORT" "sqlite://$WORK/$name-$rate/cochat.db"
    run "$name-cochat-r$rate.json" fanout --target cochat --nodes "127.0.0.1:$PORT" --rooms "$rooms" \
        --members "$members" --senders "$senders" --rate "$rate" --duration "$FAN_DURATION" \
        --workers "$FAN_WORKERS" --server-pid "$STARTED_PID" --label "sqlite, 1 node"
    stop_pid "$STARTED_PID"
    if [ "$HAVE_PEER" = 1 ]; then
        note "$name: socket.io peer, $rate msgs/s"
        PORT="$(free_port)"
        start_peer "peer-$name-$rate" "$PORT"
        run "$name-socketio-r$rate.json" fanout --target socketio --nodes "127.0.0.1:$PORT" --rooms "$rooms" \
            --members "$members" --senders "$senders" --rate "$rate" --duration "$FAN_DURATION" \
            --workers "$FAN_WORKERS" --server-pid "$STARTED_PID" --label "socket.io + redis adapter, 1 process"
        stop_pid "$STARTED_PID"
    fi
}
if want fanout; then
for RATE in $FAN_RATES; do
    fanout_pair fanout "$FAN_ROOMS" "$FAN_MEMBERS" "$FAN_SENDERS" "$RATE"
done
fi
# The same with fewer, busier sockets: at 600k deliveries/s each of 1,000 receivers gets a frame
# every 1.7 ms (each of the 10,000 above, every 17 ms), so frames can share a write.
if want fanout-busy; then
for RATE in $FAN_BUSY_RATES; do
    fanout_pair fanout-busy "$FAN_BUSY_ROOMS" "$FAN_BUSY_MEMBERS" "$FAN_BUSY_ROOMS" "$RATE"
done
fi

# ------------------------------------------------------------------------------------------
# durable: acked sends on SQLite and on Postgres
if want durable; then
note "durable: sqlite"
PORT="$(free_port)"
start_cochat durable-sqlite "$PORT" "sqlite://$WORK/durable-sqlite/cochat.db"
run durable-sqlite.json durable --nodes "127.0.0.1:$PORT" --conns "$DUR_CONNS" --window "$DUR_WINDOW" \
    --duration "$DUR_DURATION" --backend sqlite --server-pid "$STARTED_PID" --label "sqlite (WAL), 1 node"
stop_pid "$STARTED_PID"

if [ "$HAVE_PG" = 1 ]; then
    note "durable: postgres"
    create_db
    PORT="$(free_port)"
    start_cochat durable-postgres "$PORT" "$DB"
    run durable-postgres.json durable --nodes "127.0.0.1:$PORT" --conns "$DUR_CONNS" --window "$DUR_WINDOW" \
        --duration "$DUR_DURATION" --backend postgres --server-pid "$STARTED_PID" --label "postgres (local, default fsync), 1 node"
    stop_pid "$STARTED_PID"
else
    skip "durable on Postgres, cluster and reconnect (no Postgres at $PG_ADMIN_URL)"
fi
fi

# ------------------------------------------------------------------------------------------
# cluster (3 nodes, Postgres + Redis) and reconnect
if want cluster; then
if [ "$HAVE_PG" = 1 ]; then
    if start_redis; then
        start_cluster() { # sets NODES, NODE_PIDS
            local i port prefix="bench$RANDOM:"
            create_db
            NODES="" NODE_PIDS=()
            for i in 1 2 3; do
                port="$(free_port)"
                start_cochat "node-$i-$RANDOM" "$port" "$DB" REDIS_URL="$REDIS_URL_PRIVATE" \
                    COCHAT_REDIS_PREFIX="$prefix" COCHAT_DRAIN_WINDOW_S=2
                NODES="${NODES:+$NODES,}127.0.0.1:$port"
                NODE_PIDS+=("$STARTED_PID")
            done
        }
        for RATE in $CL_RATES; do
            note "cluster: 3 nodes, $RATE msgs/s"
            start_cluster
            run "cluster-cochat-r$RATE.json" fanout --name cluster --target cochat --nodes "$NODES" --rooms "$FAN_ROOMS" \
                --members "$FAN_MEMBERS" --senders "$FAN_SENDERS" --rate "$RATE" --duration "$FAN_DURATION" \
                --workers "$FAN_WORKERS" --server-pid "$(
                    IFS=,
                    echo "${NODE_PIDS[*]}"
                )" --label "3 nodes, postgres + redis"
            for pid in "${NODE_PIDS[@]}"; do stop_pid "$pid"; done
        done
        for SIGNAL in KILL TERM; do
            note "reconnect: $RC_CONNS clients, kill -$SIGNAL of their node"
            start_cluster
            run "reconnect-$(echo "$SIGNAL" | tr 'A-Z' 'a-z').json" reconnect --nodes "$NODES" --victim-pid "${NODE_PIDS[0]}" \
                --signal "$SIGNAL" --conns "$RC_CONNS" --timeout "$RC_TIMEOUT" --label "3 nodes, postgres + redis, drain window 2 s"
            for pid in "${NODE_PIDS[@]}"; do stop_pid "$pid"; done
        done
    else
        skip "cluster and reconnect (redis-server not installed)"
    fi
fi
fi

# ------------------------------------------------------------------------------------------
# ai: a fake provider (cochat-bench fake-llm) streaming timestamped tokens at $AI_RATE/s; rooms of
# M subscribed members, one more member asks `/ai go` AI_ANSWERS times (answered one after another)
start_fake_llm() { # sets FAKE_PORT, STARTED_PID
    local i
    FAKE_PORT="$(free_port)"
    "$BENCH" fake-llm --listen "127.0.0.1:$FAKE_PORT" --tokens "$AI_TOKENS" --rate "$AI_RATE" >"$WORK/fake-llm.log" 2>&1 &
    STARTED_PID=$!
    PIDS+=("$STARTED_PID")
    for i in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$FAKE_PORT") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "fake-llm did not listen on $FAKE_PORT" >&2
    cat "$WORK/fake-llm.log" >&2
    return 1
}
if want ai; then
start_fake_llm
FAKE_PID="$STARTED_PID"
for M in $AI_MEMBERS; do
    note "ai: rooms of $M members, $AI_ANSWERS answers of $AI_TOKENS tokens at $AI_RATE tokens/s"
    PORT="$(free_port)"
    start_cochat "ai-$M" "$PORT" "sqlite://$WORK/ai-$M/cochat.db" AI_BASE_URL="http://127.0.0.1:$FAKE_PORT/v1" AI_MODEL=fake \
        COCHAT_AI_TRIGGERS_PER_MIN_USER=1000000 COCHAT_AI_TRIGGERS_PER_MIN_ROOM=1000000 \
        COCHAT_AI_TOKENS_PER_DAY_USER=1000000000 COCHAT_AI_TOKENS_PER_DAY_ROOM=1000000000
    run "ai-m$M.json" ai --nodes "127.0.0.1:$PORT" --rooms "$AI_ROOMS" --members "$M" --answers "$AI_ANSWERS" \
        --tokens "$AI_TOKENS" --rate "$AI_RATE" --workers "$AI_WORKERS" --server-pid "$STARTED_PID" \
        --label "sqlite, 1 node, fake provider at $AI_RATE tokens/s"
    stop_pid "$STARTED_PID"
done
stop_pid "$FAKE_PID"
fi

# ------------------------------------------------------------------------------------------
# floor: what this machine gives any server. The fanout and ai shapes against a do-nothing
# WebSocket server (one write per delivery, no work), and Postgres alone running the durable
# scenario's append statements (bench/postgres-floor.sql under pgbench).
postgres_cpu_ticks() { # user + system ticks of every Postgres process, exited backends included
    local p
    for p in $(pgrep -u postgres); do awk '{print $14 + $15 + $16 + $17}' "/proc/$p/stat" 2>/dev/null; done |
        awk '{s += $1} END {print s + 0}'
}
postgres_floor() {
    local dir="$WORK/postgres-floor" before after
    mkdir -p "$dir"
    create_db
    for f in sql/postgres/*.sql; do psql "$DB" -q -v ON_ERROR_STOP=1 -f "$f" >/dev/null; done
    psql "$DB" -q -v ON_ERROR_STOP=1 -c "CREATE SEQUENCE floor_batches" \
        -c "INSERT INTO rooms (id, name, created_by, created_at) SELECT 'r_floor_' || i, 'floor', 'u_floor', 0 FROM generate_series(1, 64) i" >/dev/null
    note "floor: postgres alone, $PGF_CLIENTS transactions of $PGF_BATCH messages in flight, ${PGF_DURATION}s"
    before="$(postgres_cpu_ticks)"
    (cd "$dir" && pgbench -n -c "$PGF_CLIENTS" -j 1 -T "$PGF_DURATION" -D batch="$PGF_BATCH" -l \
        -f "$OLDPWD/bench/postgres-floor.sql" "$DB" >pgbench.txt 2>&1) || { cat "$dir/pgbench.txt" >&2; return 1; }
    sleep 1 # backends that just exited are reaped and counted
    after="$(postgres_cpu_ticks)"
    cat "$dir"/pgbench_log.* | awk '{print $3}' | sort -n >"$dir/latency_us"
    awk -v ticks="$((after - before))" -v batch="$PGF_BATCH" -v secs="$PGF_DURATION" \
        -v clients="$PGF_CLIENTS" -v date="$(date -u +%Y-%m-%dT%H:%M:%SZ)" '
        { lat[NR] = $1 }
        END {
            n = NR; msgs = n * batch; cpu = ticks / 100
            p50 = lat[int(n * 0.50) + 1] / 1000; p99 = lat[int(n * 0.99) + 1] / 1000
            printf "{\n  \"scenario\": \"floor-postgres\",\n  \"date_utc\": \"%s\",\n", date
            printf "  \"params\": {\"clients\": %d, \"messages_per_transaction\": %d, \"duration_s\": %d},\n", clients, batch, secs
            printf "  \"results\": {\"transactions\": %d, \"messages_per_s\": %.0f, \"transaction_p50_ms\": %.1f, \"transaction_p99_ms\": %.1f, ", n, msgs / secs, p50, p99
            printf "\"postgres_cpu_s\": %.2f, \"postgres_cpu_us_per_message\": %.1f}\n}\n", cpu, (msgs > 0 ? cpu * 1e6 / msgs : 0)
        }' "$dir/latency_us" >"$OUT/floor-postgres.json"
    cat "$OUT/floor-postgres.json" >&2
}
if want floor; then
for RATE in $FLOOR_FAN_RATES; do
    note "floor: fanout shape, $RATE msgs/s"
    run "floor-fanout-r$RATE.json" floor --conns "$((FAN_ROOMS * FAN_MEMBERS))" --rooms "$FAN_ROOMS" --rate "$RATE" \
        --duration "$FLOOR_DURATION" --workers "$FAN_WORKERS" --label "do-nothing server, fanout shape"
done
for RATE in $FAN_BUSY_RATES; do
    note "floor: fanout-busy shape, $RATE msgs/s"
    run "floor-fanout-busy-r$RATE.json" floor --conns "$((FAN_BUSY_ROOMS * FAN_BUSY_MEMBERS))" --rooms "$FAN_BUSY_ROOMS" \
        --rate "$RATE" --duration "$FLOOR_DURATION" --workers "$FAN_WORKERS" --label "do-nothing server, fanout-busy shape"
done
for M in $AI_MEMBERS; do
    note "floor: ai shape, rooms of $M members, $AI_RATE deltas/s"
    run "floor-ai-m$M.json" floor --conns "$M" --rooms 1 --rate "$AI_RATE" \
        --duration "$((FLOOR_DURATION * 2))" --workers "$AI_WORKERS" --label "do-nothing server, ai shape"
done
if [ "$HAVE_PG" = 1 ] && command -v pgbench >/dev/null; then
    postgres_floor
else
    skip "the Postgres floor (needs Postgres at $PG_ADMIN_URL and pgbench)"
fi
fi

note "results in $OUT/"
ls -1 "$OUT"/*.json >&2
if [ "${#SKIPPED[@]}" -gt 0 ]; then
    note "skipped:"
    printf '   %s\n' "${SKIPPED[@]}" >&2
fi
echo "bench.sh $MODE: done"
