#!/usr/bin/env bash
# A one-machine Ray cluster made with `ray up deploy/cluster-local.yaml`, with the disagg app on it.
#
#   scripts/local-cluster.sh up [--config deploy/tiny.yaml]
#       1. installs openssh-server and rsync with apt if missing (the local provider needs them)
#       2. generates a key pair under ~/.cache/disagg/cluster/ and adds it to ~/.ssh/authorized_keys
#       3. starts an sshd of its own on 127.0.0.1 (port 22 if free, else one of its own)
#       4. `ray up` on deploy/cluster-local.yaml with that user, key and port
#       5. `disagg serve --config ... --address auto --detach`, waits for /health, prints the URL
#   scripts/local-cluster.sh down
#       Serve shut down, this cluster's Ray stopped, `ray down`, the sshd stopped, the
#       authorized_keys entry and the keys removed. Other Ray instances on the machine are left alone.
#   scripts/local-cluster.sh status
#
# Both are idempotent. Settings (environment): DISAGG_RAY_PORT (GCS port, default 6379),
# DISAGG_SSH_PORT (default 22 if free, else the first free port from 2222),
# DISAGG_CLUSTER_DIR (state, keys and logs; default ~/.cache/disagg/cluster).
# Clients of the cluster: RAY_ADDRESS=127.0.0.1:$DISAGG_RAY_PORT RAY_AUTH_MODE=token (the token is
# ~/.ray/auth_token, which `node-start` generates if missing; Ray clients read it from there).
#
# node-start / node-stop run on the node, through Ray's SSH session: the start command of
# deploy/cluster-local.yaml calls node-start.
set -euo pipefail

PROJECT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${DISAGG_CLUSTER_DIR:-$HOME/.cache/disagg/cluster}"
RAY_PORT="${DISAGG_RAY_PORT:-$(cat "$STATE/ray-port" 2>/dev/null || echo 6379)}"
PY="$PROJECT/.venv/bin/python"
RAY="$PROJECT/.venv/bin/ray"
SSHD=/usr/sbin/sshd
USER_NAME="$(id -un)"
KEY="$STATE/id_ed25519"
CLUSTER_YAML="$STATE/cluster-local.yaml"
KEY_TAG="disagg-local-cluster"

say() { echo "[local-cluster] $*"; }
die() { echo "[local-cluster] error: $*" >&2; exit 1; }

usage() { awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "${BASH_SOURCE[0]}"; }

# ---------------------------------------------------------------- small helpers

pid_of() {  # the pid in $1 if that process is alive and its command line contains $2
  local pid
  [[ -f "$1" ]] || return 1
  pid="$(cat "$1")"
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$2" || return 1
  echo "$pid"
}

wait_gone() {  # pid, seconds: 0 once the process is gone
  local i
  for ((i = 0; i < $2 * 5; i++)); do
    kill -0 "$1" 2>/dev/null || return 0
    sleep 0.2
  done
  return 1
}

port_free() {  # nothing listens on this TCP port, on 127.0.0.1 or on every address
  # SO_REUSEADDR as servers do: connections of a stopped server (TIME_WAIT) do not count
  "$PY" - "$1" <<'EOF'
import socket, sys
for host in ("127.0.0.1", "0.0.0.0"):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, int(sys.argv[1])))
        except OSError:
            sys.exit(1)
EOF
}

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

http_ok() {  # GET $1 answers 200 within 5 s
  "$PY" - "$1" <<'EOF' 2>/dev/null
import sys, urllib.request
sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=5).status == 200 else 1)
EOF
}

elapsed() { echo $(($(date +%s) - $1)); }

ray_env() { env RAY_ADDRESS="127.0.0.1:$RAY_PORT" RAY_AUTH_MODE=token "$@"; }

need_venv() {
  [[ -x "$RAY" && -x "$PY" ]] || die "no environment at $PROJECT/.venv: run bash scripts/install.sh"
}

# ---------------------------------------------------------------- on the node

node_stop() {  # stop the Ray node that node-start started here (pid file), nothing else
  local pid
  if pid="$(pid_of "$STATE/ray-node.pid" "--block")"; then
    say "stopping this cluster's Ray node (pid $pid; Ray drains it first, up to 30 s)"
    kill -TERM "$pid"
    if ! wait_gone "$pid" 60; then
      say "Ray node $pid still up after 60 s: SIGKILL (its processes die with it)"
      kill -KILL "$pid" 2>/dev/null || true
      wait_gone "$pid" 10 || die "Ray node $pid does not exit"
    fi
  fi
  rm -f "$STATE/ray-node.pid"
}

node_start() {  # node-start ray start ARGS...: that command, kept under a pid file
  [[ "${1:-}" == ray && "${2:-}" == start ]] || die "usage: node-start ray start ARGS..."
  shift 2
  [[ -x "$RAY" ]] || die "no Ray at $RAY on $(hostname): install the project there" \
    "(bash scripts/install.sh), or set DISAGG_HOME in this node's ~/.bashrc"
  mkdir -p "$STATE"
  node_stop
  # token auth: every client and node of this cluster needs the token (here: same machine)
  "$RAY" get-auth-token --generate >/dev/null
  local dashboard_port=8265
  port_free "$dashboard_port" || dashboard_port="$(free_port)"
  ulimit -n 65536 2>/dev/null || true
  # --block: this process owns the node's processes (they die with it), so stopping its pid
  # stops this cluster only. setsid + nohup: it outlives the SSH session that starts it.
  # Ray runs its workers at niceness 15 unless told otherwise, and the vLLM engines the
  # replicas spawn inherit it (then any Ray daemon on an engine's core preempts the engine).
  # No task events per actor call and no idle workers kept warm: CPU the engines need
  # (runtime/serve_cli.py LEAN_RAY_ENV, which `disagg serve` applies to a Ray it starts)
  RAY_worker_niceness="${RAY_worker_niceness:-0}" RAY_AUTH_MODE=token \
    RAY_task_events_report_interval_ms="${RAY_task_events_report_interval_ms:-0}" \
    RAY_enable_worker_prestart="${RAY_enable_worker_prestart:-0}" \
    RAY_prestart_worker_first_driver="${RAY_prestart_worker_first_driver:-0}" \
    setsid nohup "$RAY" start "$@" --block \
    --dashboard-port="$dashboard_port" --dashboard-agent-listen-port=0 \
    --ray-client-server-port="$(free_port)" >"$STATE/ray-node.log" 2>&1 </dev/null &
  local pid=$!
  echo "$pid" >"$STATE/ray-node.pid"
  local i
  for ((i = 0; i < 120; i++)); do
    if grep -qs "Ray runtime started" "$STATE/ray-node.log"; then
      say "Ray node up (pid $pid, dashboard 127.0.0.1:$dashboard_port, log $STATE/ray-node.log)"
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 1
  done
  tail -n 30 "$STATE/ray-node.log" >&2 || true
  node_stop
  die "ray start failed (log above, $STATE/ray-node.log)"
}

# ---------------------------------------------------------------- SSH for the local provider

ensure_packages() {
  local missing=()
  [[ -x "$SSHD" ]] || missing+=(openssh-server)
  command -v rsync >/dev/null || missing+=(rsync)
  command -v ssh >/dev/null || missing+=(openssh-client)
  ((${#missing[@]})) || return 0
  command -v apt-get >/dev/null || die "missing: ${missing[*]} (install them; no apt-get here)"
  local sudo=()
  if ((EUID != 0)); then
    command -v sudo >/dev/null || die "missing: ${missing[*]}; install them as root"
    sudo=(sudo)
  fi
  say "installing ${missing[*]} with apt-get (Ray's local provider reaches the node over SSH" \
    "and syncs files with rsync; if the package starts the system's sshd, this script does" \
    "not use it)"
  "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null ||
    { "${sudo[@]}" apt-get update -q >/dev/null &&
      "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; } ||
    die "apt-get install ${missing[*]} failed"
}

ensure_keys() {
  [[ -f "$KEY" ]] || ssh-keygen -q -t ed25519 -N "" -C "$KEY_TAG" -f "$KEY"
  [[ -f "$STATE/ssh_host_ed25519_key" ]] ||
    ssh-keygen -q -t ed25519 -N "" -C "$KEY_TAG-host" -f "$STATE/ssh_host_ed25519_key"
}

key_blob() { awk '{print $2}' "$KEY.pub"; }

ensure_authorized_key() {
  local ssh_dir="$HOME/.ssh" auth="$HOME/.ssh/authorized_keys"
  if [[ ! -d "$ssh_dir" ]]; then
    mkdir -m 700 "$ssh_dir"
    touch "$STATE/created-ssh-dir"
  fi
  if [[ ! -f "$auth" ]]; then
    (umask 077 && touch "$auth")
    touch "$STATE/created-authorized-keys"
  fi
  grep -qF "$(key_blob)" "$auth" && return 0
  # from=: the key only logs in from this machine
  echo "from=\"127.0.0.1\" $(cat "$KEY.pub")" >>"$auth"
  say "added this cluster's key to $auth (tagged $KEY_TAG; down removes it)"
}

remove_authorized_key() {
  local auth="$HOME/.ssh/authorized_keys"
  if [[ -f "$KEY.pub" && -f "$auth" ]] && grep -qF "$(key_blob)" "$auth"; then
    grep -vF "$(key_blob)" "$auth" >"$auth.disagg-tmp" || true
    cat "$auth.disagg-tmp" >"$auth"  # in place: keeps the file's owner and mode
    rm -f "$auth.disagg-tmp"
    say "removed this cluster's key from $auth"
  fi
  if [[ -f "$STATE/created-authorized-keys" ]]; then
    [[ -s "$auth" ]] || rm -f "$auth"
    rm -f "$STATE/created-authorized-keys"
  fi
  if [[ -f "$STATE/created-ssh-dir" ]]; then
    rmdir "$HOME/.ssh" 2>/dev/null || true
    rm -f "$STATE/created-ssh-dir"
  fi
}

choose_ssh_port() {
  if [[ -n "${DISAGG_SSH_PORT:-}" ]]; then
    echo "$DISAGG_SSH_PORT"
  elif ((EUID == 0)) && port_free 22; then
    echo 22
  else
    local port
    for ((port = 2222; port < 2300; port++)); do
      port_free "$port" && { echo "$port"; return; }
    done
    die "no free port in 2222-2299 for the sshd: set DISAGG_SSH_PORT"
  fi
}

sshd_config() {  # port
  cat <<EOF
# sshd for the local Ray cluster of $PROJECT (scripts/local-cluster.sh); 127.0.0.1 only
Port $1
ListenAddress 127.0.0.1
HostKey $STATE/ssh_host_ed25519_key
PidFile $STATE/sshd.pid
AuthorizedKeysFile .ssh/authorized_keys
AllowUsers $USER_NAME
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
X11Forwarding no
AllowAgentForwarding no
AllowTcpForwarding local
PrintMotd no
# the node side of deploy/cluster-local.yaml: where the project is, which GCS port
SetEnv "DISAGG_HOME=$PROJECT" "DISAGG_RAY_PORT=$RAY_PORT" "DISAGG_CLUSTER_DIR=$STATE"
Subsystem sftp internal-sftp
EOF
}

ensure_sshd() {
  local pid="" port
  if pid="$(pid_of "$STATE/sshd.pid" "$STATE/sshd_config")"; then
    port="${DISAGG_SSH_PORT:-$(cat "$STATE/ssh-port")}"
    if [[ "$(sshd_config "$port")" == "$(cat "$STATE/sshd_config")" ]]; then
      say "sshd already up (pid $pid, 127.0.0.1:$port)"
      return 0
    fi
    say "restarting the sshd (its settings changed)"
    stop_sshd
  else
    port="$(choose_ssh_port)"
  fi
  port_free "$port" || die "port $port is taken: set DISAGG_SSH_PORT to a free port"
  # sshd refuses to start as root without its privilege separation directory
  if ((EUID == 0)) && [[ ! -d /run/sshd ]]; then
    mkdir -m 755 /run/sshd
    touch "$STATE/created-run-sshd"
  fi
  sshd_config "$port" >"$STATE/sshd_config"
  "$SSHD" -t -f "$STATE/sshd_config" || die "sshd rejects $STATE/sshd_config (above)"
  "$SSHD" -f "$STATE/sshd_config" -E "$STATE/sshd.log"
  echo "$port" >"$STATE/ssh-port"
  local i
  for ((i = 0; i < 50; i++)); do
    ssh_check && { say "sshd up on 127.0.0.1:$port (pid $(cat "$STATE/sshd.pid"))"; return 0; }
    sleep 0.2
  done
  tail -n 20 "$STATE/sshd.log" >&2 || true
  die "cannot log in over SSH to $USER_NAME@127.0.0.1:$port with $KEY (sshd log above)"
}

ssh_opts() {
  echo -i "$KEY" -p "$(cat "$STATE/ssh-port")" -o BatchMode=yes -o IdentitiesOnly=yes \
    -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR \
    -o ConnectTimeout=5
}

ssh_check() {
  # shellcheck disable=SC2046
  ssh $(ssh_opts) "$USER_NAME@127.0.0.1" true 2>/dev/null
}

stop_sshd() {
  local pid sessions
  if pid="$(pid_of "$STATE/sshd.pid" "$STATE/sshd_config")"; then
    sessions="$(ps -o pid= --ppid "$pid" || true)"  # connections it serves (Ray's SSH master)
    kill -TERM "$pid"
    wait_gone "$pid" 10 || kill -KILL "$pid" 2>/dev/null || true
    for pid in $sessions; do
      kill -TERM "$pid" 2>/dev/null || true
      wait_gone "$pid" 5 || kill -KILL "$pid" 2>/dev/null || true
    done
    say "sshd stopped"
  fi
  rm -f "$STATE/sshd.pid"
  if [[ -f "$STATE/created-run-sshd" ]]; then
    rmdir /run/sshd 2>/dev/null || true
    rm -f "$STATE/created-run-sshd"
  fi
}

render_cluster_yaml() {  # deploy/cluster-local.yaml with this user, key and SSH port
  local port proxy=""
  port="$(cat "$STATE/ssh-port")"
  if [[ "$port" != 22 ]]; then
    # the local provider has no port setting: hop through the sshd itself (-W) to its port
    proxy="ssh -i $KEY -p $port -o BatchMode=yes -o IdentitiesOnly=yes -o StrictHostKeyChecking=no"
    proxy+=" -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -W 127.0.0.1:$port"
    proxy+=" $USER_NAME@127.0.0.1"
  fi
  "$PY" - "$PROJECT/deploy/cluster-local.yaml" "$CLUSTER_YAML" "$USER_NAME" "$KEY" "$proxy" <<'EOF'
import sys
import yaml
src, dst, user, key, proxy = sys.argv[1:]
with open(src) as f:
    config = yaml.safe_load(f)
config["auth"] = {"ssh_user": user, "ssh_private_key": key}
if proxy:
    config["auth"]["ssh_proxy_command"] = proxy
with open(dst, "w") as f:
    f.write(f"# {src} for scripts/local-cluster.sh (its user, key and SSH port)\n")
    yaml.safe_dump(config, f, sort_keys=False)
EOF
}

# ---------------------------------------------------------------- the app

read_app_config() {  # sets HTTP_URL and MODEL from the disagg config
  local out
  out="$("$PY" - "$1" <<'EOF'
import sys
from runtime.app_config import AppConfig
config = AppConfig.from_yaml(sys.argv[1])
print(f"http://{config.server.host}:{config.server.http_port}")
print(config.engine.model)
EOF
)" || die "cannot read the app config $1 (above)"
  { read -r HTTP_URL; read -r MODEL; } <<<"$out"
}

start_app() {
  local config="$1" start
  start=$(date +%s)
  if http_ok "$HTTP_URL/health"; then
    say "app already serving at $HTTP_URL"
  else
    (cd "$PROJECT" && ray_env timeout 600 "$PROJECT/.venv/bin/disagg" serve --config "$config" \
      --address auto --detach) || die "disagg serve failed (above; replica logs under" \
      "/tmp/ray/session_latest/logs/serve/)"
    local i
    for ((i = 0; i < 120; i++)); do
      http_ok "$HTTP_URL/health" && break
      sleep 1
    done
    http_ok "$HTTP_URL/health" || die "$HTTP_URL/health does not answer 200 after 120 s"
  fi
  say "app: $(elapsed "$start") s"
}

stop_app() {  # every Serve app of this cluster, replicas and their engines shut down in order
  pid_of "$STATE/ray-node.pid" "--block" >/dev/null || return 0
  say "shutting down Ray Serve on 127.0.0.1:$RAY_PORT"
  ray_env timeout 180 "$PY" -c '
import ray
from ray import serve
ray.init(address="auto", log_to_driver=False)
serve.shutdown()
' >"$STATE/serve-shutdown.log" 2>&1 || {
    tail -n 20 "$STATE/serve-shutdown.log" >&2
    say "Serve shutdown failed (above); stopping the Ray node anyway"
  }
}

# ---------------------------------------------------------------- commands

cmd_up() {
  local config="deploy/tiny.yaml"
  while (($#)); do
    case "$1" in
      --config) config="${2:?--config needs a file}"; shift 2 ;;
      *) die "unknown option for up: $1 (see --help)" ;;
    esac
  done
  need_venv
  if [[ "$config" != /* ]]; then  # relative to here, else to the project
    if [[ -f "$config" ]]; then config="$PWD/$config"; else config="$PROJECT/$config"; fi
  fi
  [[ -f "$config" ]] || die "no app config $config"
  read_app_config "$config"
  [[ -e "$MODEL" ]] || die "no model at $MODEL (the tiny one: .venv/bin/disagg make-tiny-model" \
    "$HOME/.cache/disagg/tiny-llama)"
  mkdir -p "$STATE"
  chmod 700 "$STATE"
  if [[ -f "$STATE/ray-port" && "$(cat "$STATE/ray-port")" != "$RAY_PORT" ]] &&
    pid_of "$STATE/ray-node.pid" "--block" >/dev/null; then
    die "this cluster is up on port $(cat "$STATE/ray-port"), not $RAY_PORT: run down first"
  fi
  echo "$RAY_PORT" >"$STATE/ray-port"
  ensure_packages
  ensure_keys
  ensure_authorized_key
  ensure_sshd
  render_cluster_yaml
  local start
  start=$(date +%s)
  if pid_of "$STATE/ray-node.pid" "--block" >/dev/null; then
    say "Ray already up at 127.0.0.1:$RAY_PORT"
  else
    port_free "$RAY_PORT" || die "port $RAY_PORT is taken (another Ray?): set DISAGG_RAY_PORT"
    (cd "$PROJECT" && timeout 300 "$RAY" up -y --no-config-cache --disable-usage-stats \
      "$CLUSTER_YAML") || die "ray up failed (above; node log $STATE/ray-node.log)"
  fi
  say "ray up: $(elapsed "$start") s"
  start_app "$config"
  echo "$HTTP_URL" >"$STATE/url"
  say "URL: $HTTP_URL  (OpenAI API $HTTP_URL/v1, $HTTP_URL/health, $HTTP_URL/metrics)"
  say "status: RAY_ADDRESS=127.0.0.1:$RAY_PORT RAY_AUTH_MODE=token .venv/bin/disagg status"
  say "stop:   scripts/local-cluster.sh down"
}

cmd_down() {
  local start phase
  start=$(date +%s)
  mkdir -p "$STATE"
  if [[ -x "$PY" ]]; then
    phase=$(date +%s)
    stop_app
    say "serve shutdown: $(elapsed "$phase") s"
  fi
  phase=$(date +%s)
  node_stop
  say "ray node stop: $(elapsed "$phase") s"
  # sshd goes before `ray down`: its own `ray stop` (every Ray instance on the machine) then
  # cannot reach the node, and ray down only marks the node terminated
  stop_sshd
  if [[ -f "$CLUSTER_YAML" && -x "$RAY" ]]; then
    (cd "$PROJECT" && timeout 120 "$RAY" down -y "$CLUSTER_YAML") >"$STATE/ray-down.log" 2>&1 ||
      say "ray down failed (log $STATE/ray-down.log); this cluster's processes are stopped anyway"
  fi
  remove_authorized_key
  # what `ray up` copied into the node's home: our key and its config
  if [[ -f "$HOME/ray_bootstrap_key.pem" && -f "$KEY" ]] && cmp -s "$KEY" "$HOME/ray_bootstrap_key.pem"; then
    rm -f "$HOME/ray_bootstrap_key.pem" "$HOME/ray_bootstrap_config.yaml"
  fi
  rm -f "$KEY" "$KEY.pub" "$STATE/ssh_host_ed25519_key" "$STATE/ssh_host_ed25519_key.pub" \
    "$STATE/sshd_config" "$STATE/ssh-port" "$CLUSTER_YAML" "$STATE/url" "$STATE/ray-port"
  say "down: $(elapsed "$start") s (logs kept in $STATE)"
}

cmd_status() {
  local pid
  if pid="$(pid_of "$STATE/sshd.pid" "$STATE/sshd_config")"; then
    say "sshd: pid $pid on 127.0.0.1:$(cat "$STATE/ssh-port")"
  else
    say "sshd: not running"
  fi
  if pid="$(pid_of "$STATE/ray-node.pid" "--block")"; then
    say "Ray: pid $pid, address 127.0.0.1:$RAY_PORT"
  else
    say "Ray: not running"
  fi
  if [[ -f "$STATE/url" ]] && http_ok "$(cat "$STATE/url")/health"; then
    say "app: $(cat "$STATE/url") healthy"
  else
    say "app: not serving"
  fi
}

case "${1:-}" in
  up) shift; cmd_up "$@" ;;
  down) shift; [[ $# -eq 0 ]] || die "down takes no options"; cmd_down ;;
  status) cmd_status ;;
  node-start) shift; node_start "$@" ;;
  node-stop) node_stop ;;
  -h|--help|help) usage ;;
  *) usage >&2; exit 2 ;;
esac
