#!/usr/bin/env bash
# Runs the HOME stack on this machine: pool-managerd (one pool of the tiny model) and
# orchestratord, sharing a handoff directory.
#   stack.sh demo  submit one task, stream its tokens, print a summary, stop everything
#   stack.sh up    keep the stack in the foreground until Ctrl-C, print how to call it
set -euo pipefail

MODE="${1:-demo}"
BIN="${LLORCH_BIN_DIR:-${CARGO_TARGET_DIR:-target}/debug}"
CACHE="${LLORCH_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/llama-orch}"
ENGINE="${LLORCH_ENGINE_BINARY:-$CACHE/bin/llama-server}"
MODEL="${LLORCH_MODEL:-$CACHE/models/llorch-tiny.gguf}"
PROMPT="${LLORCH_PROMPT:-the river and the stone}"

say() { printf '[%s] %s\n' "$MODE" "$*" >&2; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

for f in "$BIN/pool-managerd" "$BIN/orchestratord" "$BIN/llorch" "$ENGINE" "$MODEL"; do
  [ -e "$f" ] || { say "missing $f (run through make: make $MODE)"; exit 1; }
done

WORK=$(mktemp -d -t llama-orch-XXXXXX)
if [ "$MODE" = up ]; then
  PM_PORT="${POOL_MANAGERD_PORT:-9200}"; OR_PORT="${ORCHD_PORT:-8080}"
else
  PM_PORT=$(free_port); OR_PORT=$(free_port)
fi
TOKEN="${LLORCH_API_TOKEN:-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')}"
export LLORCH_API_TOKEN="$TOKEN"
PIDS=()

cleanup() {
  local rc=$?
  set +e
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
  # No engine may survive the stack.
  if [ -n "${ENGINE_PIDS:-}" ]; then
    for pid in $ENGINE_PIDS; do
      if kill -0 "$pid" 2>/dev/null; then say "engine $pid survived shutdown"; rc=1; fi
    done
  fi
  if [ $rc -ne 0 ]; then
    say "logs: $WORK"; tail -n 20 "$WORK"/*.log >&2 2>/dev/null
  else
    rm -rf "$WORK"
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cat > "$WORK/pools.toml" <<TOML
[[pools]]
id = "pool-0"
model = "$MODEL"
model_id = "tiny"
slots = 2
ctx = 4096
args = ["--threads", "1"]
TOML

say "starting pool-managerd on 127.0.0.1:$PM_PORT and orchestratord on 127.0.0.1:$OR_PORT"
POOL_MANAGERD_BIND_ADDR="127.0.0.1:$PM_PORT" POOL_MANAGERD_CONFIG="$WORK/pools.toml" \
POOL_MANAGERD_RUNTIME_DIR="$WORK/run" POOL_MANAGERD_ENGINE_BINARY="$ENGINE" \
  "$BIN/pool-managerd" >"$WORK/pool-managerd.log" 2>&1 &
PIDS+=($!)
ORCHD_BIND_ADDR="127.0.0.1:$OR_PORT" ORCHD_RUNTIME_DIR="$WORK/run" ORCHD_DATA_DIR="$WORK/data" \
ORCHD_POOL_MANAGER_URL="http://127.0.0.1:$PM_PORT" \
  "$BIN/orchestratord" >"$WORK/orchestratord.log" 2>&1 &
PIDS+=($!)

deadline=$((SECONDS + 60))
until curl -sf "http://127.0.0.1:$OR_PORT/ready" >/dev/null; do
  for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null || { say "a daemon exited during start"; exit 1; }; done
  [ $SECONDS -lt $deadline ] || { say "stack not ready within 60 s"; exit 1; }
  sleep 0.1
done
ENGINE_PIDS=$(python3 -c 'import json,glob,sys; print(" ".join(str(json.load(open(f))["pid"]) for f in glob.glob(sys.argv[1]+"/*.json")))' "$WORK/run")
say "ready: pool-0 (tiny model, 2 slots)"

export LLORCH_URL="http://127.0.0.1:$OR_PORT"
if [ "$MODE" = demo ]; then
  say "submitting: \"$PROMPT\""
  "$BIN/llorch" submit --model tiny --prompt "$PROMPT" --max-tokens 48 --seed 7
  say "stopping"
else
  cat >&2 <<MSG

The stack is up (Ctrl-C stops it). In another shell:

  export LLORCH_API_TOKEN=$TOKEN
  curl -s -H "Authorization: Bearer \$LLORCH_API_TOKEN" -H 'content-type: application/json' \\
       -d '{"model_ref":"tiny","prompt":"hello","max_tokens":32}' http://127.0.0.1:$OR_PORT/v2/tasks
  curl -sN -H "Authorization: Bearer \$LLORCH_API_TOKEN" http://127.0.0.1:$OR_PORT/v2/tasks/<task_id>/events

  or: LLORCH_URL=http://127.0.0.1:$OR_PORT $BIN/llorch submit --model tiny --prompt hello

Logs: $WORK/*.log
MSG
  wait -n "${PIDS[@]}"
  say "a daemon exited"
  exit 1
fi
