#!/usr/bin/env bash
# Side by side: tokenmill BEFORE a change, tokenmill AFTER it, and llama.cpp's llama-server, on
# the bundled GGUF, interleaved, with a table of medians and ratios.
#
# What it measures (the workloads of docs/benchmarks.md's side-by-side runs, "How to reproduce"):
#   c1      chat, ~32-word prompts (~62 tokens after the chat template), exactly 128 output
#           tokens (max_tokens = min_tokens, ignore_eos, greedy), concurrency 1, 6 requests:
#           output tok/s, ITL p50
#   c32     the same at concurrency 32, 64 requests: output tok/s, TTFT p50, ITL p50
#   long    a ~1,000-word prompt (~1,030 tokens), 8 output tokens, concurrency 1, 4 requests:
#           TTFT p50
#   c8      (not in the default set) concurrency 8, 16 requests: output tok/s
#   prefix  (not in the default set) ~1,010-word prompts sharing their first 1,000 words, 8
#           output tokens, concurrency 1, 4 requests (the warm-up fills the prefix cache):
#           warm TTFT p50
# Order: round after round (N rounds); in each round, scenario after scenario; in each scenario
# the three servers one after the other, before and after swapping places every round (odd
# rounds before, after, llama-server; even rounds after, before, llama-server), so a slow
# minute of the shared machine falls on both trees alike. Each measurement starts its server
# fresh (one server on the machine at a time, under `setsid`: its own scheduling group, as a
# service runs), waits until GET /v1/models answers, runs `tokenmill bench serve` against it
# with a prompt seed of its own (no prefix-cache hit across measurements), and stops it.
# Ratios are taken per round (after/before of the same round, after/llama-server of the same
# round) and their median is reported with the range; the medians of the raw figures beside.
#
# Usage:
#   scripts/compare_trees.sh [SCENARIO...]            (default: c1 c32 long)
#   e.g. N=1 REQUESTS_C32=8 scripts/compare_trees.sh c1 c32     (a dry run)
#
# Environment (defaults in brackets):
#   N                rounds [3]
#   BEFORE_REV       the commit "before" is [178d561]
#   BEFORE_TREE      a checkout of it [/tmp/before]; created with `git worktree add --detach`
#                    when missing (remove it later with `git worktree remove BEFORE_TREE`)
#   AFTER_TREE       the tree "after" is [this repository's working tree, as it is when it runs]
#   CLIENT_TREE      the tree whose `tokenmill.bench.serve` drives the load [BEFORE_TREE: the
#                    same client for all three servers, whatever the change did to bench/]
#   PYTHON           the Python with tokenmill's dependencies [this repository's .venv]
#                    Every tree runs with PYTHONPATH=<tree> from OUT_DIR as the working
#                    directory (a cwd holding a tokenmill/ would shadow PYTHONPATH); the server
#                    is started through the tree's own pyproject.toml entry point and refuses
#                    to start when `tokenmill` imports from anywhere else.
#   TOKENMILL_ARGS   `tokenmill serve` flags for both trees [--disable-log-requests]
#   BEFORE_ARGS / AFTER_ARGS   per tree, instead of TOKENMILL_ARGS
#   LLAMA_SERVER     llama-server binary [/work/bench/llama-server]
#   LLAMA_ARGS       its flags after -m/--port [-np 32 -c 65536 -t 2]
#   GGUF             model for llama-server [the bundled SmolLM2-135M-Instruct Q4_1 GGUF, the
#                    file `tokenmill serve` loads by default]
#   SERVERS          which of before, after, llama-server to run [all three]
#   REQUESTS_C1 [6]  REQUESTS_C8 [16]  REQUESTS_C32 [64]  REQUESTS_LONG [4]  REQUESTS_PREFIX [4]
#   OUTPUT_TOKENS [128]  LONG_PROMPT_TOKENS [1000]  LONG_OUTPUT_TOKENS [8]
#   LIMIT_S          seconds one measurement may run [600]
#   PORT_BEFORE / PORT_AFTER / PORT_LLAMA   [18000 / 18001 / 18080]; the script refuses to
#                    run when one is taken, so a stray server (with a warm prefix cache) is
#                    never measured
#   OUT_DIR          every measurement's JSON and client output, server logs, results.tsv and
#                    summary.txt / summary.md [/tmp/compare-<date>]
# While it runs it keeps /tmp/BENCH_RUNNING (other sessions' sign to leave the CPUs alone).
# Next to the figures each line gives the CPU the server used during the measurement (cores,
# from /proc/PID/stat) and the whole machine's (from /proc/stat, the client's included): when
# all_cpu is well above srv_cpu + ~0.3 (the client), something else ran and the line is not
# clean; rerun it, or the whole comparison, on a quieter machine.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
N=${N:-3}
BEFORE_REV=${BEFORE_REV:-178d561}
BEFORE_TREE=${BEFORE_TREE:-/tmp/before}
AFTER_TREE=$(cd "${AFTER_TREE:-$ROOT}" && pwd)
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x $ROOT/.venv/bin/python ]]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
TOKENMILL_ARGS=${TOKENMILL_ARGS---disable-log-requests}
BEFORE_ARGS=${BEFORE_ARGS-$TOKENMILL_ARGS}
AFTER_ARGS=${AFTER_ARGS-$TOKENMILL_ARGS}
LLAMA_SERVER=${LLAMA_SERVER:-/work/bench/llama-server}
LLAMA_ARGS=${LLAMA_ARGS:--np 32 -c 65536 -t 2}
SERVERS=${SERVERS:-before after llama-server}
REQUESTS_C1=${REQUESTS_C1:-6}
REQUESTS_C8=${REQUESTS_C8:-16}
REQUESTS_C32=${REQUESTS_C32:-64}
REQUESTS_LONG=${REQUESTS_LONG:-4}
REQUESTS_PREFIX=${REQUESTS_PREFIX:-4}
OUTPUT_TOKENS=${OUTPUT_TOKENS:-128}
LONG_PROMPT_TOKENS=${LONG_PROMPT_TOKENS:-1000}
LONG_OUTPUT_TOKENS=${LONG_OUTPUT_TOKENS:-8}
LIMIT_S=${LIMIT_S:-600}
PORT_BEFORE=${PORT_BEFORE:-18000}
PORT_AFTER=${PORT_AFTER:-18001}
PORT_LLAMA=${PORT_LLAMA:-18080}
OUT_DIR=${OUT_DIR:-/tmp/compare-$(date +%Y%m%d-%H%M%S)}

scenarios=()
for arg in "$@"; do
    case $arg in
        c1 | c8 | c32 | long | prefix) scenarios+=("$arg") ;;
        -h | --help) sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "compare_trees.sh: unknown scenario '$arg' (c1 c8 c32 long prefix; see --help)" >&2; exit 2 ;;
    esac
done
((${#scenarios[@]})) || scenarios=(c1 c32 long)
read -r -a servers <<<"$SERVERS"
for server in "${servers[@]}"; do
    case $server in before | after | llama-server) ;; *)
        echo "compare_trees.sh: SERVERS may hold before, after, llama-server; got '$server'" >&2; exit 2 ;;
    esac
done

mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)

if [[ ! -d $BEFORE_TREE ]]; then
    echo "# creating $BEFORE_TREE: git worktree add --detach $BEFORE_TREE $BEFORE_REV" >&2
    git -C "$ROOT" worktree add --detach "$BEFORE_TREE" "$BEFORE_REV" >&2
fi
BEFORE_TREE=$(cd "$BEFORE_TREE" && pwd)
CLIENT_TREE=$(cd "${CLIENT_TREE:-$BEFORE_TREE}" && pwd)
if [[ $(git -C "$BEFORE_TREE" rev-parse HEAD) != $(git -C "$ROOT" rev-parse "$BEFORE_REV^{commit}") ]]; then
    echo "compare_trees.sh: $BEFORE_TREE is at $(git -C "$BEFORE_TREE" rev-parse --short HEAD), not" \
        "$BEFORE_REV (set BEFORE_TREE, or remove it: git worktree remove $BEFORE_TREE)" >&2
    exit 1
fi

port_of() {
    case $1 in before) echo "$PORT_BEFORE" ;; after) echo "$PORT_AFTER" ;; *) echo "$PORT_LLAMA" ;; esac
}
for server in "${servers[@]}"; do
    port=$(port_of "$server")
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "compare_trees.sh: port $port is taken; stop whatever listens there first" >&2
        exit 1
    fi
done
if [[ " ${servers[*]} " == *" llama-server "* && ! -x $LLAMA_SERVER ]]; then
    echo "compare_trees.sh: no llama-server at $LLAMA_SERVER (set LLAMA_SERVER, or SERVERS without it)" >&2
    exit 1
fi

in_tree() {  # TREE CMD...: run CMD with TREE first on PYTHONPATH, from OUT_DIR
    local tree=$1
    shift
    (cd "$OUT_DIR" && PYTHONPATH=$tree "$@")
}

if [[ -z ${GGUF:-} ]]; then
    GGUF=$(in_tree "$BEFORE_TREE" "$PYTHON" -c \
        'from tokenmill.model.loader import bundled_model_path; print(bundled_model_path())')
fi

# Starts `tokenmill` of the tree given as argv[1] through that tree's own pyproject.toml entry
# point, with the remaining arguments; refuses when tokenmill imports from another tree.
read -r -d '' LAUNCH_PY <<'EOF' || true
import importlib, pathlib, sys, tomllib
tree = pathlib.Path(sys.argv[1]).resolve()
package = pathlib.Path(importlib.import_module("tokenmill").__file__).resolve()
if tree not in package.parents:
    sys.exit(f"compare_trees.sh: tokenmill imports from {package}, not from {tree}")
with open(tree / "pyproject.toml", "rb") as f:
    module, _, func = tomllib.load(f)["project"]["scripts"]["tokenmill"].partition(":")
print(f"# tokenmill from {package.parent}, entry point {module}:{func}", file=sys.stderr, flush=True)
sys.argv = ["tokenmill", *sys.argv[2:]]
sys.exit(getattr(importlib.import_module(module), func)())
EOF

server_pid="" bench_pid=""

start_server() {  # SERVER: starts it under setsid, sets server_pid, waits until it answers
    local server=$1 port pidfile log cmd tree=""
    port=$(port_of "$server")
    pidfile=$OUT_DIR/$server.pid log=$OUT_DIR/$server.log
    rm -f "$pidfile"
    case $server in
        before) tree=$BEFORE_TREE ;;
        after) tree=$AFTER_TREE ;;
    esac
    if [[ -n $tree ]]; then
        local args=$BEFORE_ARGS
        [[ $server == after ]] && args=$AFTER_ARGS
        # shellcheck disable=SC2206
        cmd=("$PYTHON" -c "$LAUNCH_PY" "$tree" serve --port "$port" $args)
    else
        # shellcheck disable=SC2206
        cmd=("$LLAMA_SERVER" -m "$GGUF" --port "$port" $LLAMA_ARGS)
    fi
    if [[ -n $tree ]]; then
        echo "=== $(date +%T) $server: PYTHONPATH=$tree tokenmill ${cmd[*]:4}" >>"$log"
    else
        echo "=== $(date +%T) $server: ${cmd[*]}" >>"$log"
    fi
    # The launcher shell writes its own PID and execs the server: the PID is the server's.
    (cd "$OUT_DIR" && PYTHONPATH=$tree setsid bash -c 'echo $$ >"$0"; exec "$@"' \
        "$pidfile" "${cmd[@]}" </dev/null >>"$log" 2>&1 &)
    for _ in $(seq 100); do [[ -s $pidfile ]] && break; sleep 0.1; done
    server_pid=$(cat "$pidfile")
    local deadline=$((SECONDS + 300))
    until curl -sf -o /dev/null "http://127.0.0.1:$port/v1/models"; do
        if ! kill -0 "$server_pid" 2>/dev/null; then
            echo "compare_trees.sh: $server exited while starting; see $log" >&2
            tail -5 "$log" >&2
            server_pid=""
            exit 1
        fi
        if ((SECONDS > deadline)); then echo "compare_trees.sh: $server not ready in 300 s" >&2; exit 1; fi
        sleep 0.5
    done
}

stop_server() {
    [[ -n $server_pid ]] || return 0
    local pid=$server_pid
    server_pid=""
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 400); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    echo "compare_trees.sh: server $pid ignored SIGTERM for 40 s; killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
}

cpu_ticks() {  # [PID]: "<machine busy ticks> <PID's utime+stime ticks>"
    local machine server=0
    machine=$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8; exit }' /proc/stat)
    if [[ -n ${1:-} && -r /proc/$1/stat ]]; then
        server=$(sed 's/.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }')
    fi
    echo "$machine $server"
}

marker=""
cleanup() {
    if [[ -n $bench_pid ]]; then kill -TERM "$bench_pid" 2>/dev/null || true; fi
    stop_server
    if [[ -n $marker ]]; then rm -f "$marker"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
if [[ ! -e /tmp/BENCH_RUNNING ]]; then marker=/tmp/BENCH_RUNNING; touch "$marker"; fi

workload_of() {  # SCENARIO: the client's flags
    case $1 in
        c1) echo "--concurrency 1 --num-requests $REQUESTS_C1 --prompt-tokens 32 --output-tokens $OUTPUT_TOKENS --warmup 2" ;;
        c8) echo "--concurrency 8 --num-requests $REQUESTS_C8 --prompt-tokens 32 --output-tokens $OUTPUT_TOKENS --warmup 2" ;;
        c32) echo "--concurrency 32 --num-requests $REQUESTS_C32 --prompt-tokens 32 --output-tokens $OUTPUT_TOKENS --warmup 2" ;;
        long) echo "--concurrency 1 --num-requests $REQUESTS_LONG --prompt-tokens $LONG_PROMPT_TOKENS --output-tokens $LONG_OUTPUT_TOKENS --warmup 1" ;;
        prefix) echo "--concurrency 1 --num-requests $REQUESTS_PREFIX --prompt-tokens $((LONG_PROMPT_TOKENS + 10)) --shared-prefix-tokens $LONG_PROMPT_TOKENS --output-tokens $LONG_OUTPUT_TOKENS --warmup 1" ;;
    esac
}

run_id=$(date +%H%M%S)

measure() {  # ROUND SCENARIO SERVER: one line on stderr, one row in results.tsv
    local round=$1 scenario=$2 server=$3 port name json cpu rc=0
    port=$(port_of "$server")
    name=$run_id-r$round-$scenario-$server
    json=$OUT_DIR/$name.json
    start_server "$server"
    local t0 t1 cpu0 cpu1
    t0=$(date +%s.%N)
    cpu0=$(cpu_ticks "$server_pid")
    # shellcheck disable=SC2046
    (cd "$OUT_DIR" && PYTHONPATH=$CLIENT_TREE exec timeout -k 10 "$LIMIT_S" "$PYTHON" -m tokenmill.bench.serve \
        --base-url "http://127.0.0.1:$port/v1" --endpoint chat --name "$server" \
        --prompt-seed "$name-" --request-timeout "$LIMIT_S" --json "$json" \
        $(workload_of "$scenario")) >"$OUT_DIR/$name.out" 2>&1 &
    bench_pid=$!
    wait "$bench_pid" || rc=$?
    bench_pid=""
    cpu1=$(cpu_ticks "$server_pid")
    t1=$(date +%s.%N)
    stop_server
    # "srv_cpu all_cpu": cores used by the server and by the whole machine over the measurement
    cpu=$(awk -v a="$cpu0" -v b="$cpu1" -v t0="$t0" -v t1="$t1" -v hz="$(getconf CLK_TCK)" 'BEGIN {
        split(a, x, " "); split(b, y, " "); w = (t1 - t0) * hz
        printf "%.2f %.2f", (y[2] - x[2]) / w, (y[1] - x[1]) / w }')
    if ((rc != 0)); then
        echo "compare_trees.sh: the benchmark failed (exit $rc); see $OUT_DIR/$name.out" >&2
        tail -5 "$OUT_DIR/$name.out" >&2
        exit 1
    fi
    "$PYTHON" - "$json" "$run_id" "$round" "$scenario" "$server" "$cpu" "$OUT_DIR/results.tsv" <<'EOF' >&2
import json, sys
path, run_id, rnd, scenario, server, cpu, tsv = sys.argv[1:]
srv_cpu, all_cpu = cpu.split()
data = json.load(open(path))
level = data["runs"][0]["levels"][0]
want = data["workload"]["output_tokens"]
fields = [level["output_throughput"], level["ttft_ms_p50"], level["itl_ms_p50"],
          level["mean_prompt_tokens"], level["mean_output_tokens"], level["num_errors"],
          level["duration_s"]]
with open(tsv, "a") as f:
    f.write("\t".join(map(str, [run_id, rnd, scenario, server, *fields, srv_cpu, all_cpu])) + "\n")
note = ""
if level["num_errors"]:
    note += f"  {level['num_errors']} errors: {level['first_error']}"
if level["mean_output_tokens"] not in (None, want):
    note += f"  (asked for {want} output tokens each)"
fmt = lambda v, p=1: "-" if v is None else f"{v:.{p}f}"
print(f"{rnd:>5} {scenario:<6} {server:<12} {fmt(level['output_throughput']):>9} "
      f"{fmt(level['ttft_ms_p50'], 0):>9} {fmt(level['itl_ms_p50']):>8} "
      f"{fmt(level['mean_prompt_tokens'], 0):>7} {fmt(level['mean_output_tokens'], 0):>7} "
      f"{level['duration_s']:>7.1f} {srv_cpu:>7} {all_cpu:>7}{note}", flush=True)
EOF
}

git_desc() {  # TREE: its commit, and whether its files differ from it
    if ! git -C "$1" rev-parse --short HEAD 2>/dev/null; then echo "not a git checkout"; return; fi
    if [[ -n $(git -C "$1" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
        echo "with uncommitted changes"
    fi
}
echo "# before $BEFORE_TREE ($(git_desc "$BEFORE_TREE" | paste -sd' ')); after $AFTER_TREE" \
    "($(git_desc "$AFTER_TREE" | paste -sd' '))" >&2
# The after tree as measured: its commit and its uncommitted changes, for the record.
if git -C "$AFTER_TREE" rev-parse HEAD >"$OUT_DIR/$run_id-after.commit" 2>/dev/null; then
    git -C "$AFTER_TREE" diff HEAD >"$OUT_DIR/$run_id-after.diff" 2>/dev/null || true
    git -C "$AFTER_TREE" status --porcelain >"$OUT_DIR/$run_id-after.status" 2>/dev/null || true
fi
echo "# llama-server $LLAMA_SERVER ($("$LLAMA_SERVER" --version 2>&1 | grep -m1 -o 'commit [0-9a-f]*' || echo '?')) $LLAMA_ARGS; model $GGUF" >&2
echo "# client $CLIENT_TREE; python $PYTHON; $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2
echo "# N=$N, scenarios: ${scenarios[*]}, servers: ${servers[*]}; out $OUT_DIR" >&2
printf '%5s %-6s %-12s %9s %9s %8s %7s %7s %7s %7s %7s\n' round scen server "out tok/s" "TTFT p50" \
    "ITL p50" prompt output wall_s srv_cpu all_cpu >&2

for ((round = 1; round <= N; round++)); do
    order=("${servers[@]}")
    if ((round % 2 == 0)) && [[ " ${servers[*]} " == *" before "* && " ${servers[*]} " == *" after "* ]]; then
        for i in "${!order[@]}"; do  # even rounds: before and after swap places
            case ${order[$i]} in before) order[i]=after ;; after) order[i]=before ;; esac
        done
    fi
    for scenario in "${scenarios[@]}"; do
        for server in "${order[@]}"; do
            measure "$round" "$scenario" "$server"
        done
    done
done

# --------------------------------------------------------------------------------------
# Medians and per-round ratios of this run's rows; summary.txt and summary.md in OUT_DIR
# --------------------------------------------------------------------------------------
"$PYTHON" - "$OUT_DIR" "$run_id" <<'EOF'
import statistics, sys
out_dir, run_id = sys.argv[1:]
rows = [l.rstrip("\n").split("\t") for l in open(f"{out_dir}/results.tsv") if l.startswith(run_id + "\t")]
COL = {"tok/s": 4, "ttft": 5, "itl": 6}
METRICS = [  # scenario, column, label, higher is better
    ("c1", "tok/s", "c=1 output tok/s", True), ("c1", "itl", "c=1 ITL p50 ms", False),
    ("c8", "tok/s", "c=8 output tok/s", True),
    ("c32", "tok/s", "c=32 output tok/s", True), ("c32", "ttft", "c=32 TTFT p50 ms", False),
    ("c32", "itl", "c=32 ITL p50 ms", False),
    ("long", "ttft", "~1,030-token prompt TTFT p50 ms", False),
    ("prefix", "ttft", "shared 1,000-token prefix, warm TTFT p50 ms", False),
]
values = {}  # (scenario, column, server) -> {round: value}
for r in rows:
    for col, i in COL.items():
        if r[i] not in ("None", ""):
            values.setdefault((r[2], col, r[3]), {})[int(r[1])] = float(r[i])

def med(d):
    return statistics.median(d.values()) if d else None

def ratio(a, b):  # median and range of per-round a/b
    rs = sorted(a[k] / b[k] for k in a.keys() & b.keys() if b[k])
    if not rs:
        return "-"
    text = f"{statistics.median(rs):.2f}"
    return text + (f" ({rs[0]:.2f}-{rs[-1]:.2f})" if len(rs) > 1 else "")

fmt = lambda v: "-" if v is None else (f"{v:.1f}" if v < 1000 else f"{v:.0f}")
table = [["metric", "before", "after", "llama-server", "after/before", "after/llama-server", "better"]]
for scenario, col, label, higher in METRICS:
    b, a, l = (values.get((scenario, col, s), {}) for s in ("before", "after", "llama-server"))
    if not (a or b or l):
        continue
    table.append([label, fmt(med(b)), fmt(med(a)), fmt(med(l)), ratio(a, b), ratio(a, l),
                  "higher" if higher else "lower"])
rounds = len({r[1] for r in rows})
head = (f"medians over {rounds} round(s); ratios: median of the per-round ratios (range); "
        "'better' says which way a ratio is good")
widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
text = "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                           enumerate(zip(row, widths))) for row in table)
md = "\n".join("| " + " | ".join(row) + " |" for row in table[:1] + [["---"] * len(table[0])] + table[1:])
open(f"{out_dir}/summary.txt", "w").write(head + "\n" + text + "\n")
open(f"{out_dir}/summary.md", "w").write(head + "\n\n" + md + "\n")
print("\n" + head + "\n" + text)
EOF
