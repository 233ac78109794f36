#!/usr/bin/env bash
# The compose test bed with a real container engine: build both images with podman, run
# deploy/docker-compose.yml (SuperLink, server app, 3 devices; TLS and SuperNode authentication)
# for 2 rounds, kill the server app mid-run and check that it restarts and resumes, check what the
# namespace runner cannot (read-only root, dropped capabilities, non-root users, health checks,
# restart policies) and the bad-input messages, then print image sizes, build times and the result.
#
#   sudo deploy/container-smoke.sh                      # from the repository root
#
# Too heavy for CI (several GB of wheels, minutes of build): deploy/README.md records its output.
# Works without any image registry: the base image is a Debian root file system made with
# debootstrap (Debian's mirror) and imported, and every Python package comes from a local
# wheelhouse filled with `pip download` (PyPI), installed with `--no-index --find-links`.
#
# Settings (environment):
#   SMOKE_DIR      work folder: root file system, test bed, logs       (default /var/tmp/fedser-smoke)
#   BASE_IMAGE     a base to use instead of the debootstrapped one, e.g. python:3.11.11-slim-bookworm
#   COMPOSE        the compose command   (default: podman compose, else podman-compose on PATH or in .venv)
#   FEDSER         the workstation command for `fedser testbed prepare` (default: fedser on PATH, else .venv/bin/fedser)
#   PYTHON         a host Python 3.11 with pip, for `pip download`     (default: python3)
#   DEBIAN_MIRROR  (default http://deb.debian.org/debian)
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD
SMOKE_DIR=${SMOKE_DIR:-/var/tmp/fedser-smoke}
BED=$SMOKE_DIR/testbed
PROJECT=fedser-testbed             # `name:` of deploy/docker-compose.yml
ROUNDS=2
PYTHON=${PYTHON:-python3}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
LOCAL_BASE=localhost/fedser-base:bookworm
export FEDSER_TESTBED=$BED FEDSER_ROUNDS=$ROUNDS FEDSER_MIN_CLIENTS=3 FEDSER_LOCAL_EPOCHS=1
FAILED=0

say() { printf '\n== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*"; FAILED=1; }
die() { printf 'container-smoke: %s\n' "$*" >&2; exit 2; }
ok() { printf 'ok: %s\n' "$*"; }
container() {   # the container of a compose service
  podman ps -a -q --filter "label=io.podman.compose.project=$PROJECT" \
    --filter "label=com.docker.compose.service=$1" | head -n1
}
wait_for() {    # wait_for SECONDS WHAT COMMAND...: poll until the command succeeds
  local limit=$1 what=$2 t0=$SECONDS; shift 2
  until "$@" >/dev/null 2>&1; do
    (( SECONDS - t0 > limit )) && { fail "no $what after ${limit}s"; return 1; }
    sleep 3
  done
  ok "$what after $(( SECONDS - t0 ))s"
}

# ---------------------------------------------------------------- what this needs
[[ $(id -u) == 0 ]] || die "run as root (podman with runc as root; sudo $0)"
command -v podman >/dev/null || die "podman is not installed (apt-get install podman runc)"
if [[ -z ${COMPOSE:-} ]]; then
  if podman compose version >/dev/null 2>&1; then COMPOSE="podman compose"
  elif command -v podman-compose >/dev/null; then COMPOSE=podman-compose
  elif [[ -x .venv/bin/podman-compose ]]; then COMPOSE=$PWD/.venv/bin/podman-compose
  else die "no compose engine: pip install podman-compose (or podman >= 4.7 with a compose provider)"; fi
fi
if [[ -z ${FEDSER:-} ]]; then
  if command -v fedser >/dev/null; then FEDSER=fedser
  elif [[ -x .venv/bin/fedser ]]; then FEDSER=.venv/bin/fedser
  else die "no fedser command: make setup (or pip install -e '.[tools]'), or set FEDSER"; fi
fi
if [[ $(podman info --format '{{.Host.OCIRuntime.Name}}') == runc ]] \
   && ! grep -qs '^default_ulimits *= *\[ *\]' /etc/containers/containers.conf; then
  die "runc as root cannot apply podman's default ulimits here: add 'default_ulimits = []' under [containers] in /etc/containers/containers.conf"
fi
mkdir -p "$SMOKE_DIR"
echo "machine: $(uname -m), $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; $(podman --version); $($COMPOSE version 2>/dev/null | head -n1)"
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"

# ---------------------------------------------------------------- 1. base image and wheelhouse
say "base image"
if [[ -n ${BASE_IMAGE:-} ]]; then
  echo "using $BASE_IMAGE"
elif podman image exists "$LOCAL_BASE"; then
  BASE_IMAGE=$LOCAL_BASE; echo "using $BASE_IMAGE (built before; podman rmi it to rebuild)"
else
  command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap), or set BASE_IMAGE"
  t0=$SECONDS
  rm -rf "$SMOKE_DIR/rootfs"
  # What python:3.11-slim gives the Dockerfiles (python, venv, pip) and the runtime libraries,
  # so that the image build needs no package index.
  debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,python-is-python3,libsndfile1,libportaudio2,ca-certificates \
    bookworm "$SMOKE_DIR/rootfs" "$DEBIAN_MIRROR" > "$SMOKE_DIR/debootstrap.log"
  rm -rf "$SMOKE_DIR"/rootfs/var/lib/apt/lists/* "$SMOKE_DIR"/rootfs/var/cache/apt/archives/*.deb
  tar -C "$SMOKE_DIR/rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' - "$LOCAL_BASE" >/dev/null
  BASE_IMAGE=$LOCAL_BASE
  echo "debootstrap + import: $(( SECONDS - t0 ))s"
fi

say "wheelhouse (deploy/wheels)"
t0=$SECONDS
# The pinned set for both images; the host's Python must match the image's (3.11, same machine).
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || die "$PYTHON is not Python 3.11: set PYTHON"
"$PYTHON" -m pip download -q -d deploy/wheels -c constraints.txt \
  "torch==2.11.0" "torchaudio==2.11.0" ".[client,server]" "setuptools>=77,<85" 2>&1 | grep -v "^ *WARNING\|^ *$" || true
echo "$(ls deploy/wheels/*.whl | wc -l) wheels, $(du -sh deploy/wheels | cut -f1), $(( SECONDS - t0 ))s"

# ---------------------------------------------------------------- 2. the images
declare -A BUILD_S
for role in server client; do
  say "image fedser-$role:0.1.0"
  t0=$SECONDS
  podman build --format docker -f deploy/Dockerfile.$role -t fedser-$role:0.1.0 \
    --build-arg BASE="$BASE_IMAGE" --build-arg PIP_ARGS="--no-index --find-links /wheels" \
    --build-arg TORCH_INDEX= . > "$SMOKE_DIR/build-$role.log" 2>&1 \
    || { tail -n 30 "$SMOKE_DIR/build-$role.log"; die "building fedser-$role failed (log: $SMOKE_DIR/build-$role.log)"; }
  BUILD_S[$role]=$(( SECONDS - t0 ))
  echo "built in ${BUILD_S[$role]}s"
done
podman image prune -f >/dev/null    # the builder stages

# ---------------------------------------------------------------- 3. the federation
say "test bed: fedser testbed prepare"
$COMPOSE -f deploy/docker-compose.yml down -t 5 >/dev/null 2>&1 || true
"$FEDSER" testbed prepare --out "$BED" --force | tail -n 2

say "compose up: superlink, serverapp, client-1..3 ($COMPOSE)"
t_run=$SECONDS
$COMPOSE -f deploy/docker-compose.yml up -d --no-build > "$SMOKE_DIR/compose-up.log" 2>&1 \
  || { tail -n 30 "$SMOKE_DIR/compose-up.log"; die "compose up failed (log: $SMOKE_DIR/compose-up.log)"; }
podman ps --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}  {{.Image}}  {{.Status}}'

progress() { podman logs "$(container serverapp)" 2>&1; }
round_done() { progress | grep -q "round $1/$ROUNDS done"; }
wait_for 900 "round 1 of $ROUNDS" round_done 1

say "health checks (run by hand: podman runs them from systemd timers, absent in containers here)"
for svc in superlink client-1 client-2 client-3; do
  if podman healthcheck run "$(container "$svc")" >/dev/null 2>&1; then ok "$svc healthy"; else fail "$svc unhealthy"; fi
done

say "what the file says, in the running containers"
for svc in superlink serverapp client-1 client-2 client-3; do
  c=$(container "$svc")
  uid=$(podman exec "$c" python -c 'import os; print(os.getuid())')
  caps=$(podman exec "$c" sh -c 'grep CapEff /proc/self/status' | awk '{print $2}')
  if podman exec "$c" sh -c 'touch /opt/venv/probe' >/dev/null 2>&1; then ro=writable; else ro=read-only; fi
  nnp=$(podman exec "$c" sh -c 'grep NoNewPrivs /proc/self/status' | awk '{print $2}')
  restart=$(podman inspect -f '{{.HostConfig.RestartPolicy.Name}}' "$c")
  line="$svc: uid $uid, effective capabilities $caps, root file system $ro, no_new_privs $nnp, restart $restart"
  if [[ $uid != 0 && $caps == 0000000000000000 && $ro == read-only && $nnp == 1 ]]; then ok "$line"; else fail "$line"; fi
done

say "restart: the server app's process killed mid-run"
c=$(container serverapp)
before=$(podman inspect -f '{{.RestartCount}}' "$c")
kill -9 "$(podman inspect -f '{{.State.Pid}}' "$c")"
restarted() { [[ $(podman inspect -f '{{.RestartCount}}' "$c") -gt $before ]]; }
wait_for 120 "the serverapp container restarted (restart: on-failure)" restarted
wait_for 900 "round $ROUNDS of $ROUNDS" round_done "$ROUNDS"
if progress | grep -q "resuming after round"; then ok "$(progress | grep -m1 'resuming after round')"; else fail "no resume line in the server app's log"; fi
finished() { [[ $(podman inspect -f '{{.State.Status}} {{.State.ExitCode}}' "$c") == "exited 0" ]]; }
wait_for 120 "the server app exited 0 and stays down" finished
RUN_S=$(( SECONDS - t_run ))
if [[ -f $BED/run/metrics.json ]]; then
  "$PYTHON" - "$BED/run/metrics.json" <<'EOF'
import json, sys
rows = json.load(open(sys.argv[1]))["rounds"]
for r in rows:
    print(f"round {r['round']}: {r['clients-used']} of {r['clients-sampled']} devices used, "
          f"{r['clients-rejected']} rejected; KWS accuracy {r['kws-accuracy']:.3f}, emotion UAR "
          f"{r['emotion-uar']:.3f} (the devices' held-out utterances); max device epsilon {r['max-device-epsilon']:.2f}; "
          f"{r['seconds']:.0f} s")
EOF
else
  fail "no metrics.json in the run volume"
fi

say "bad input: a device container with a wrong CA, one with no data volume"
other_ca=$SMOKE_DIR/other-ca
rm -rf "$other_ca"
"$FEDSER" certs --out "$other_ca" --host superlink >/dev/null    # a CA of its own: not the one the server's certificate is from
net=$(podman inspect -f '{{range $k, $v := .NetworkSettings.Networks}}{{$k}}{{end}}' "$(container superlink)")
wrong_ca=$(podman run --rm --network "$net" -v "$other_ca/ca.pem:/run/secrets/ca.pem:ro" \
  -v "$BED/client-1/data:/data:ro" fedser-client:0.1.0 \
  fedser-client start --server superlink:9092 --root-cert /run/secrets/ca.pem --data /data/data.csv --max-restarts 0 2>&1 || true)
echo "$wrong_ca" | tail -n 2
echo "$wrong_ca" | grep -q "root-cert" && ok "wrong CA: refused, naming --root-cert" || fail "wrong CA: no clear message"
no_data=$(podman run --rm --network "$net" -v "$BED/secrets/ca.pem:/run/secrets/ca.pem:ro" fedser-client:0.1.0 \
  fedser-client start --server superlink:9092 --root-cert /run/secrets/ca.pem --data /data/data.csv 2>&1 || true)
echo "$no_data" | tail -n 1
echo "$no_data" | grep -q "data volume" && ok "no data volume: refused, naming the volume" || fail "no data volume: no clear message"

say "compose down"
$COMPOSE -f deploy/docker-compose.yml down -t 10 >/dev/null 2>&1 || true

say "bad input before any container starts: fedser testbed up's checks"
mv "$BED/secrets/client-2.key" "$BED/client-2.key.aside"
python3 -m http.server 9092 --bind 0.0.0.0 >/dev/null 2>&1 & holder=$!
sleep 1
msg=$(FEDSER_FLEET_PORT=9092 "$FEDSER" testbed up --testbed "$BED" --rounds 1 --runner docker 2>&1 || true)
kill $holder; mv "$BED/client-2.key.aside" "$BED/secrets/client-2.key"
echo "$msg" | tr ';' '\n' | sed 's/^ */  /'
echo "$msg" | grep -q "service client-2: secret client-2.key is missing" && ok "missing secret named" || fail "missing secret not named"
echo "$msg" | grep -q "service superlink: host port 9092 is already in use" && ok "port in use named" || fail "port in use not named"

# ---------------------------------------------------------------- 4. summary
say "summary"
for role in server client; do
  size=$(podman image inspect -f '{{.Size}}' fedser-$role:0.1.0)
  printf 'fedser-%s:0.1.0  %s MB  built in %ss\n' "$role" "$(( size / 1000000 ))" "${BUILD_S[$role]}"
done
# Where the size goes: PyPI's torch for x86-64 is the CUDA build; PyTorch's CPU index (the
# Dockerfiles' default where it is reachable) has neither the nvidia libraries nor triton.
podman run --rm --entrypoint sh fedser-client:0.1.0 -c \
  'cd /opt/venv/lib/python3.11/site-packages && du -sm torch nvidia triton onnxruntime opensmile 2>/dev/null; du -sm /opt/venv' \
  2>/dev/null | awk '{printf "  %-60s %6s MB\n", $2, $1}'
printf 'base %s; federation: %s rounds with a server restart, %ss from compose up\n' "$BASE_IMAGE" "$ROUNDS" "${RUN_S:-?}"
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
if (( FAILED )); then echo "RESULT: FAILED"; exit 1; fi
echo "RESULT: passed"
