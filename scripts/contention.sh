#!/usr/bin/env bash
# Server throughput when one busy process shares the machine: quiet, then with the load.
#
# What it measures (the issue's recipe): for each SERVER (tokenmill, llama-server) and SETUP,
# start the server, wait until it answers, run `tokenmill bench serve` (chat, 32-word prompts,
# exactly 64 output tokens: max_tokens = min_tokens with ignore_eos, greedy) at concurrency 1 and
# 8 on the quiet machine, then again with one pure-Python busy loop
# (`python3 -c 'while True: pass'`) running beside it, print one line per measurement and a
# table of the throughput each kept, and stop the server.
#
# SETUP decides which scheduling group the server is in. With the kernel's autogroup
# scheduling (/proc/sys/kernel/sched_autogroup_enabled = 1, the default on desktop and most
# server kernels) every session (setsid) is one group and CPU time is shared between groups
# first, then between the threads inside a group:
#   own-session   the server is started under `setsid`, in a session of its own, as a systemd
#                 service or a container runs; the busy loop and the benchmark client run in
#                 this script's session. The server's group gets about half the machine.
#   same-session  the server, the busy loop and the client all run in this script's session
#                 (no setsid): one group, time shared between threads.
# The busy loop is started by this script (its session) right before each loaded measurement and
# killed right after. BUSY_FROM=bench instead lets the benchmark start it
# (`tokenmill bench serve --background-load 1`: after the warm-up, in a session of its own).
#
# Usage:
#   scripts/contention.sh [SERVER...] [SETUP...]       (default: both servers, both setups)
#     SERVER: tokenmill | llama-server     SETUP: own-session | same-session
#   e.g. TOKENMILL_TREE=/work/before scripts/contention.sh tokenmill own-session
#
# Environment (defaults in brackets):
#   TOKENMILL_TREE   the tokenmill source tree the server runs from, put first on PYTHONPATH
#                    [this repository]. The benchmark client always runs from this repository.
#   PYTHON           the Python with tokenmill's dependencies [this repository's .venv, else python3]
#   TOKENMILL_ARGS   extra `tokenmill serve` flags [--disable-log-requests]
#   LLAMA_SERVER     llama.cpp's llama-server binary [/work/bench/llama-server]
#   LLAMA_ARGS       its flags after -m/--port [-np 8 -c 16384 -t 2]
#   GGUF             model file for llama-server [the bundled SmolLM2-135M-Instruct Q4_1 GGUF,
#                    the file `tokenmill serve` loads by default]
#   REQUESTS_C1 / REQUESTS_C8            quiet requests per level [4 / 16]
#   BUSY_REQUESTS_C1 / BUSY_REQUESTS_C8  loaded requests per level [2 / 8]: a 50x slowdown must
#                    still fit in LIMIT_S
#   LIMIT_S          seconds one measurement may run [180]; past it the line reads
#                    "<X (timed out)", X = the requested tokens / LIMIT_S, an upper bound
#   OUTPUT_TOKENS    [64]     BUSY [1] busy loops     BUSY_FROM [script] script | bench
#   OUT_DIR          the JSON of every measurement, server logs, per-thread CPU, results.tsv
#                    (appended to) [/tmp/contention-<date>]
#
# Ports are fixed (tokenmill 8000, llama-server 8080); the script refuses to run when one is
# taken, so a stray server (with a warm prefix cache) can never be measured by mistake.
# Next to tok/s each line gives the CPU the server and the busy loop got during it (cores,
# from /proc/PID/task/*/stat), the server threads' run-queue wait (from schedstat) per second
# of wall time, and the whole machine's CPU (/proc/stat; the client's included): when it is
# well above srv_cpu + busy_cpu + ~0.2, something else ran and the line is not clean.
# Per-thread figures of every measurement: $OUT_DIR/*.threads.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOKENMILL_TREE=$(cd "${TOKENMILL_TREE:-$ROOT}" && pwd)
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x $ROOT/.venv/bin/python ]]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
TOKENMILL_ARGS=${TOKENMILL_ARGS---disable-log-requests}
LLAMA_SERVER=${LLAMA_SERVER:-/work/bench/llama-server}
LLAMA_ARGS=${LLAMA_ARGS:--np 8 -c 16384 -t 2}
REQUESTS_C1=${REQUESTS_C1:-4}
REQUESTS_C8=${REQUESTS_C8:-16}
BUSY_REQUESTS_C1=${BUSY_REQUESTS_C1:-2}
BUSY_REQUESTS_C8=${BUSY_REQUESTS_C8:-8}
LIMIT_S=${LIMIT_S:-180}
OUTPUT_TOKENS=${OUTPUT_TOKENS:-64}
BUSY=${BUSY:-1}
BUSY_FROM=${BUSY_FROM:-script}
OUT_DIR=${OUT_DIR:-/tmp/contention-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT_DIR"

servers=() setups=()
for arg in "$@"; do
    case $arg in
        tokenmill | llama-server) servers+=("$arg") ;;
        own-session | same-session) setups+=("$arg") ;;
        -h | --help) sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "contention.sh: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
    esac
done
((${#servers[@]})) || servers=(tokenmill llama-server)
((${#setups[@]})) || setups=(own-session same-session)
case $BUSY_FROM in script | bench) ;; *) echo "BUSY_FROM must be script or bench" >&2; exit 2 ;; esac

port_of() { if [[ $1 == tokenmill ]]; then echo 8000; else echo 8080; fi; }

for server in "${servers[@]}"; do
    port=$(port_of "$server")
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "contention.sh: port $port is taken; stop whatever listens there first" >&2
        exit 1
    fi
done
if [[ " ${servers[*]} " == *" llama-server "* && ! -x $LLAMA_SERVER ]]; then
    echo "contention.sh: no llama-server at $LLAMA_SERVER (set LLAMA_SERVER)" >&2
    exit 1
fi
if [[ $(cat /proc/sys/kernel/sched_autogroup_enabled 2>/dev/null || echo 0) != 1 ]]; then
    echo "contention.sh: note: autogroup scheduling is off here; both setups share by thread" >&2
fi

# --------------------------------------------------------------------------------------
# Per-thread CPU: snapshot PIDs' threads (utime+stime, run-queue wait) to a JSON file, and the
# difference of two snapshots over the wall time between them.
# --------------------------------------------------------------------------------------
read -r -d '' CPU_PY <<'EOF' || true
import json, os, sys, time
tick = os.sysconf("SC_CLK_TCK")
def threads(pid):
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                run_ns, wait_ns, _ = map(int, f.read().split())
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out[tid] = {"name": name, "cpu": (int(fields[11]) + int(fields[12])) / tick,
                    "wait": wait_ns / 1e9}
    return out
if sys.argv[1] == "snap":
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:9]]
    snap = {"time": time.monotonic(), "pids": {}, "busy_s": (sum(ticks) - ticks[3] - ticks[4]) / tick}
    for pid in sys.argv[3:]:
        try:
            snap["pids"][pid] = threads(pid)
        except OSError:
            pass
    json.dump(snap, open(sys.argv[2], "w"))
else:  # diff A B SERVER_PID BUSY_PIDS...: "server_cpu busy_cpu server_wait all_cpu", threads file
    a, b = (json.load(open(p)) for p in sys.argv[2:4])
    wall = b["time"] - a["time"]
    def delta(pid):
        old, new = a["pids"].get(pid, {}), b["pids"].get(pid, {})
        return {t: (v["name"], v["cpu"] - old.get(t, {"cpu": 0})["cpu"],
                    v["wait"] - old.get(t, {"wait": 0})["wait"]) for t, v in new.items()}
    server = delta(sys.argv[4])
    busy = sum(c for pid in sys.argv[5:] for _, c, _ in delta(pid).values())
    with open(sys.argv[2].replace(".a.json", ".threads"), "w") as f:
        f.write(f"wall {wall:.1f} s; per server thread: CPU cores, run-queue wait s/s\n")
        for tid, (name, cpu, wait) in sorted(server.items(), key=lambda kv: -kv[1][1]):
            if cpu > 0.005 * wall or wait > 0.005 * wall:
                f.write(f"{tid:>8} {name:<16} {cpu / wall:5.2f} {wait / wall:5.2f}\n")
        if sys.argv[5:]:
            f.write(f"busy loop(s): {busy / wall:.2f} cores\n")
    cpu = sum(c for _, c, _ in server.values()) / wall
    wait = sum(w for _, _, w in server.values()) / wall
    machine = (b["busy_s"] - a["busy_s"]) / wall  # every process's CPU, the client's too
    busy_col = f"{busy / wall:.2f}" if sys.argv[5:] else "-"
    print(f"{cpu:.2f} {busy_col} {wait:.2f} {machine:.2f}")
EOF

# --------------------------------------------------------------------------------------
# Servers and the busy loop
# --------------------------------------------------------------------------------------
server_pid="" busy_pids=() bench_pid=""

gguf() {
    if [[ -n ${GGUF:-} ]]; then echo "$GGUF"; return; fi
    PYTHONPATH=$TOKENMILL_TREE "$PYTHON" -c \
        'from tokenmill.model.loader import bundled_model_path; print(bundled_model_path())'
}

start_server() {  # SERVER SETUP: starts it, sets server_pid, waits until it answers
    local server=$1 setup=$2 port pidfile log cmd launcher=()
    port=$(port_of "$server")
    pidfile=$OUT_DIR/$server-$setup.pid log=$OUT_DIR/$server-$setup.log
    rm -f "$pidfile"
    if [[ $server == tokenmill ]]; then
        local bin
        bin=$(dirname "$PYTHON")/tokenmill
        # shellcheck disable=SC2206
        if [[ -x $bin ]]; then cmd=("$bin"); else cmd=("$PYTHON" -c \
            'import sys; from tokenmill.server.cli import main; sys.exit(main())'); fi
        # shellcheck disable=SC2206
        cmd+=(serve --port "$port" $TOKENMILL_ARGS)
    else
        # shellcheck disable=SC2206
        cmd=("$LLAMA_SERVER" -m "$(gguf)" --port "$port" $LLAMA_ARGS)
    fi
    [[ $setup == own-session ]] && launcher=(setsid)
    # The launcher shell writes its own PID and execs the server: the PID is the server's.
    PYTHONPATH=$TOKENMILL_TREE "${launcher[@]}" bash -c 'echo $$ >"$0"; exec "$@"' \
        "$pidfile" "${cmd[@]}" </dev/null >"$log" 2>&1 &
    for _ in $(seq 100); do [[ -s $pidfile ]] && break; sleep 0.1; done
    server_pid=$(cat "$pidfile")
    echo "# $server ($setup): pid $server_pid, session $(ps -o sid= -p "$server_pid" | tr -d ' ')" \
        "(this script's: $(ps -o sid= -p $$ | tr -d ' ')), $(cat "/proc/$server_pid/autogroup")," \
        "log $log" >&2
    echo "#   ${cmd[*]}" >&2
    local deadline=$((SECONDS + 300))
    until curl -sf -o /dev/null "http://127.0.0.1:$port/v1/models"; do
        if ! kill -0 "$server_pid" 2>/dev/null; then
            echo "contention.sh: $server exited while starting; see $log" >&2
            tail -5 "$log" >&2
            exit 1
        fi
        if ((SECONDS > deadline)); then echo "contention.sh: $server not ready in 300 s" >&2; exit 1; fi
        sleep 0.5
    done
}

stop_server() {
    [[ -n $server_pid ]] || return 0
    local pid=$server_pid
    server_pid=""
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 400); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    echo "contention.sh: server $pid ignored SIGTERM for 40 s; killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
}

start_busy() {  # in this script's session: not setsid
    local i
    for ((i = 0; i < BUSY; i++)); do
        python3 -c 'while True: pass' </dev/null &
        busy_pids+=($!)
    done
}

stop_busy() {
    local pid
    for pid in "${busy_pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    for pid in "${busy_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    busy_pids=()
}

cleanup() {
    if [[ -n $bench_pid ]]; then kill -TERM "$bench_pid" 2>/dev/null || true; fi
    stop_busy
    stop_server
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --------------------------------------------------------------------------------------
# One measurement: prints a line and appends it to results.tsv
# --------------------------------------------------------------------------------------
run_id=$(date +%H%M%S)

measure() {  # SERVER SETUP LOAD(quiet|busy) CONCURRENCY REQUESTS
    local server=$1 setup=$2 load=$3 c=$4 n=$5 port name json warmup=2 extra=() rc=0
    port=$(port_of "$server")
    name=$server-$setup-$load-c$c-$run_id
    json=$OUT_DIR/$name.json
    if [[ $load == busy ]]; then
        if [[ $BUSY_FROM == bench ]]; then extra=(--background-load "$BUSY"); else warmup=0; fi
    fi
    [[ $load == busy && $BUSY_FROM == script ]] && start_busy
    local pids=("$server_pid" "${busy_pids[@]}")
    "$PYTHON" -c "$CPU_PY" snap "$OUT_DIR/$name.a.json" "${pids[@]}"
    # In the background and waited for, so that an interrupt of this script acts at once.
    PYTHONPATH=$ROOT timeout -k 10 "$LIMIT_S" "$PYTHON" -m tokenmill.bench.serve \
        --base-url "http://127.0.0.1:$port/v1" --endpoint chat --concurrency "$c" \
        --num-requests "$n" --prompt-tokens 32 --output-tokens "$OUTPUT_TOKENS" \
        --warmup "$warmup" --prompt-seed "$load-" --request-timeout "$LIMIT_S" \
        --json "$json" "${extra[@]}" >"$OUT_DIR/$name.out" 2>&1 &
    bench_pid=$!
    wait "$bench_pid" || rc=$?
    bench_pid=""
    "$PYTHON" -c "$CPU_PY" snap "$OUT_DIR/$name.b.json" "${pids[@]}"
    local cpu
    cpu=$("$PYTHON" -c "$CPU_PY" diff "$OUT_DIR/$name.a.json" "$OUT_DIR/$name.b.json" "${pids[@]}")
    stop_busy
    local tps tpr wall
    if ((rc == 124 || rc == 137)); then
        tps="<$(awk -v t=$((n * OUTPUT_TOKENS)) -v s="$LIMIT_S" 'BEGIN { printf "%.2f", t / s }') (timed out)"
        tpr=- wall=">$LIMIT_S"
        sleep 3  # the server drops the abandoned streams
    elif ((rc != 0)); then
        echo "contention.sh: the benchmark failed (exit $rc); see $OUT_DIR/$name.out" >&2
        tail -5 "$OUT_DIR/$name.out" >&2
        exit 1
    else
        read -r tps tpr wall < <("$PYTHON" -c '
import json, sys
level = json.load(open(sys.argv[1]))["runs"][0]["levels"][0]
if level["num_errors"]:
    print("contention.sh: errors:", level["first_error"], file=sys.stderr)
tps, wall = level["output_throughput"], level["duration_s"]
print(f"{tps:.2f}", level["mean_output_tokens"], f"{wall:.1f}")
' "$json")
    fi
    local srv_cpu busy_cpu srv_wait all_cpu
    read -r srv_cpu busy_cpu srv_wait all_cpu <<<"$cpu"
    printf '%-12s %-12s %-5s %2s %4s %18s %7s %7s %7s %7s %8s %7s\n' "$server" "$setup" "$load" \
        "$c" "$n" "$tps" "$tpr" "$wall" "$srv_cpu" "$busy_cpu" "$srv_wait" "$all_cpu" >&2
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$run_id" "$server" \
        "$setup" "$load" "$c" "$n" "$tps" "$tpr" "$wall" "$srv_cpu" "$busy_cpu" "$srv_wait" \
        "$all_cpu" >>"$OUT_DIR/results.tsv"
}

# --------------------------------------------------------------------------------------
echo "# tokenmill tree $TOKENMILL_TREE ($(git -C "$TOKENMILL_TREE" rev-parse --short HEAD 2>/dev/null || echo '?')$(
    git -C "$TOKENMILL_TREE" diff --quiet HEAD -- 2>/dev/null || echo ', with uncommitted changes')), client $ROOT, python $PYTHON" >&2
echo "# $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg), busy loops $BUSY from $BUSY_FROM, out $OUT_DIR" >&2
printf '%-12s %-12s %-5s %2s %4s %18s %7s %7s %7s %7s %8s %7s\n' server setup load c reqs \
    "out tok/s" tok/req wall_s srv_cpu busy_cpu srv_wait all_cpu >&2
for server in "${servers[@]}"; do
    for setup in "${setups[@]}"; do
        start_server "$server" "$setup"
        measure "$server" "$setup" quiet 1 "$REQUESTS_C1"
        measure "$server" "$setup" quiet 8 "$REQUESTS_C8"
        measure "$server" "$setup" busy 1 "$BUSY_REQUESTS_C1"
        measure "$server" "$setup" busy 8 "$BUSY_REQUESTS_C8"
        stop_server
    done
done

# Kept = loaded / quiet throughput, per server, setup and concurrency (this run's lines).
echo >&2
"$PYTHON" - "$OUT_DIR/results.tsv" "$run_id" >&2 <<'EOF'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.startswith(sys.argv[2] + "\t")]
tps = {(r[1], r[2], r[3], r[4]): r[6] for r in rows}
print(f"{'server':<12} {'setup':<12} {'c':>2} {'quiet tok/s':>12} {'busy tok/s':>18} {'kept':>6}")
for server, setup, load, c in tps:
    if load != "quiet":
        continue
    quiet, busy = tps[(server, setup, "quiet", c)], tps.get((server, setup, "busy", c), "-")
    try:
        kept = f"{float(busy.lstrip('<').split()[0]) / float(quiet):.3f}"
        kept = ("<" + kept) if busy.startswith("<") else kept
    except ValueError:
        kept = "-"
    print(f"{server:<12} {setup:<12} {c:>2} {quiet:>12} {busy:>18} {kept:>6}")
EOF
