#!/usr/bin/env bash
# .ci/prefect-image.sh: build a local docker image with Prefect inside, offline (no image
# registry): wheels come from PyPI via the host's pip, the base image from container_runtime.sh.
#
#   eval "$(bash .ci/prefect-image.sh)"   # prints: export PREFECT_TEST_IMAGE=<tag>
#
# Idempotent: skips everything if the image tag exists; reuses the wheel dir if it is complete.
# stdout carries only `export NAME=value` lines; all progress goes to stderr.
#
# Environment (all optional):
#   DOCKER_HOST, CONTAINER_TEST_IMAGE  if both set, used as is; otherwise this script runs
#                          `bash $CONTAINER_RUNTIME_SCRIPT` (idempotent "up") and evals its exports
#   CONTAINER_RUNTIME_SCRIPT  default: .ci/container_runtime.sh, kept in the repository so
#                          that a bare clone runs CI
#   PREFECT_VERSION        default 3.9.1
#   FASTAPI_PIN            a fastapi version installed over prefect's own; default none. 3.0 to
#                          3.8 declare fastapi>=0.139.0, whose import of prefect.server fails
#                          (Body(min_items=...)): their server needs 0.128.0, their client not.
#   PREFECT_TEST_IMAGE     tag to build, default local/bookworm-prefect:$PREFECT_VERSION
#   PREFECT_WHEEL_DIR      default $CONTAINER_STATE_DIR/prefect-wheels-$PREFECT_VERSION-cpXY
#   HOST_PYTHON            python used for `pip download`, default python3 (any version works:
#                          the target version/platform are passed explicitly)
#   HOST_BUILT_WHEELS      requirements PyPI has no wheel of for the image's Python, built with
#                          `HOST_PYTHON -m pip wheel` first (HOST_PYTHON must then be the image's
#                          Python version). prefect 2.20 needs "pendulum<3" on Python < 3.12, whose
#                          last release (2.1.2) has no cp311 wheel: without it the binary-only
#                          download falls back to pendulum 0.4 and `import prefect` fails.
set -euo pipefail

PREFECT_VERSION="${PREFECT_VERSION:-3.9.1}"
FASTAPI_PIN="${FASTAPI_PIN-}"
TAG="${PREFECT_TEST_IMAGE:-local/bookworm-prefect:$PREFECT_VERSION}"
RUNTIME="${CONTAINER_RUNTIME_SCRIPT:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/container_runtime.sh}"
STATE_DIR="${CONTAINER_STATE_DIR:-/var/lib/container-runtime-bench}"
HOST_PYTHON="${HOST_PYTHON:-python3}"
HOST_BUILT_WHEELS="${HOST_BUILT_WHEELS:-}"

log() { printf '[build_prefect_image] %s\n' "$*" >&2; }
die() { printf '[build_prefect_image] ERROR: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v s="$1" -v e="$(now)" 'BEGIN { printf "%.1fs", e - s }'; }
print_env() { echo "export PREFECT_TEST_IMAGE=$TAG"; }

T0=$(now)
if [ -z "${DOCKER_HOST:-}" ] || [ -z "${CONTAINER_TEST_IMAGE:-}" ]; then
  [ -f "$RUNTIME" ] || die "no container runtime script at $RUNTIME (set CONTAINER_RUNTIME_SCRIPT)"
  log "running $RUNTIME (idempotent up)"
  exports=$(bash "$RUNTIME") || die "$RUNTIME failed"
  eval "$exports"
fi
export DOCKER_HOST
BASE="$CONTAINER_TEST_IMAGE"

if docker image inspect "$TAG" >/dev/null 2>&1; then
  log "image $TAG present; nothing to do"
  print_env
  exit 0
fi
docker image inspect "$BASE" >/dev/null 2>&1 || die "base image $BASE missing (run $RUNTIME)"

# Target interpreter and platform: ask the base image itself.
read -r PYVER GLIBC MACHINE < <(docker run --rm --network none "$BASE" python3 -c \
  'import sys,platform; print("%d.%d" % sys.version_info[:2], platform.libc_ver()[1], platform.machine())')
[ -n "$PYVER" ] || die "could not read the python version of $BASE"
PYTAG="cp${PYVER/./}"
log "base $BASE: python $PYVER, glibc $GLIBC, $MACHINE"

WHEELS="${PREFECT_WHEEL_DIR:-$STATE_DIR/prefect-wheels-$PREFECT_VERSION-$PYTAG}"
MARK="$WHEELS/.complete-prefect-$PREFECT_VERSION-fastapi-${FASTAPI_PIN:-none}${HOST_BUILT_WHEELS:+-host-built}"
if [ -e "$MARK" ]; then
  log "wheels cached in $WHEELS"
else
  t=$(now)
  mkdir -p "$WHEELS"
  # manylinux tags up to the image's glibc, plus the legacy aliases.
  gmaj=${GLIBC%%.*}; gmin=${GLIBC#*.}; gmin=${gmin%%.*}
  plat=()
  for m in $(seq "$gmin" -1 5); do plat+=(--platform "manylinux_${gmaj}_${m}_${MACHINE}"); done
  plat+=(--platform "manylinux2014_${MACHINE}" --platform "manylinux2010_${MACHINE}"
         --platform "manylinux1_${MACHINE}" --platform "linux_${MACHINE}")
  common=(download --only-binary=:all: --python-version "$PYVER" --implementation cp
          --abi "$PYTAG" --abi abi3 --abi none "${plat[@]}" --find-links "$WHEELS" -d "$WHEELS")
  if [ -n "$HOST_BUILT_WHEELS" ]; then
    hostver=$("$HOST_PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    [ "$hostver" = "$PYVER" ] || die "HOST_BUILT_WHEELS needs HOST_PYTHON $PYVER (the image's), not $hostver"
    log "pip wheel $HOST_BUILT_WHEELS -> $WHEELS"
    # shellcheck disable=SC2086  # a list of requirements
    "$HOST_PYTHON" -m pip wheel -q -w "$WHEELS" $HOST_BUILT_WHEELS >"$WHEELS/host-built.log" 2>&1 \
      || { tail -20 "$WHEELS/host-built.log" >&2; die "pip wheel $HOST_BUILT_WHEELS failed"; }
  fi
  log "pip download prefect==$PREFECT_VERSION ${FASTAPI_PIN:+fastapi==$FASTAPI_PIN }pip -> $WHEELS (log: $WHEELS/download.log)"
  {
    "$HOST_PYTHON" -m pip "${common[@]}" "prefect==$PREFECT_VERSION"
    [ -z "$FASTAPI_PIN" ] || "$HOST_PYTHON" -m pip "${common[@]}" "fastapi==$FASTAPI_PIN"
    "$HOST_PYTHON" -m pip "${common[@]}" pip
  } >"$WHEELS/download.log" 2>&1 || { tail -20 "$WHEELS/download.log" >&2; die "pip download failed"; }
  # pip download evaluates environment markers with the HOST interpreter, not --python-version:
  # e.g. redis needs async-timeout only for python_full_version < "3.11.3" (bookworm has 3.11.2),
  # and a 3.11.7 host skips it. So resolve each requirement inside the base image itself, offline,
  # against the wheel dir, and download whatever it reports missing. Bounded.
  PIPWHL=$(cd "$WHEELS" && ls -1 pip-*.whl | sort -V | tail -n 1)
  [ -n "$PIPWHL" ] || die "no pip wheel in $WHEELS"
  for req in "prefect==$PREFECT_VERSION" ${FASTAPI_PIN:+"fastapi==$FASTAPI_PIN"}; do
    for try in $(seq 1 10); do
      out=$(docker run --rm --network none -v "$WHEELS:/wheels:ro" "$BASE" sh -c \
        "python3 -m venv --without-pip /tmp/v && /tmp/v/bin/python /wheels/$PIPWHL/pip install -q --dry-run --no-index --find-links /wheels '$req'" 2>&1) \
        && break
      missing=$(printf '%s\n' "$out" | sed -n 's/.*No matching distribution found for \([^ ]*\).*/\1/p' | head -n 1)
      [ -n "$missing" ] || { printf '%s\n' "$out" | tail -20 >&2; die "resolving $req in $BASE failed"; }
      log "resolving $req in $BASE: missing $missing; downloading it"
      "$HOST_PYTHON" -m pip "${common[@]}" "$missing" >>"$WHEELS/download.log" 2>&1 \
        || { tail -20 "$WHEELS/download.log" >&2; die "pip download $missing failed"; }
      [ "$try" -lt 10 ] || die "resolving $req: still missing wheels after 10 rounds"
    done
  done
  touch "$MARK"
  log "downloaded and resolved in $(since "$t"): $(find "$WHEELS" -name '*.whl' | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1)"
fi

PIPWHL=$(cd "$WHEELS" && ls -1 pip-*.whl | sort -V | tail -n 1)
[ -n "$PIPWHL" ] || die "no pip wheel in $WHEELS"

CTX=$(mktemp -d /var/tmp/prefect-image.XXXXXX)
trap 'rm -rf "$CTX"' EXIT
mkdir "$CTX/wheels"
cp -l "$WHEELS"/*.whl "$CTX/wheels/" 2>/dev/null || cp "$WHEELS"/*.whl "$CTX/wheels/"

# The base image has python3 but no pip, no ensurepip, and Debian's EXTERNALLY-MANAGED marker:
# make a venv --without-pip, run pip straight from its wheel to install pip + prefect into it.
# Two stages, so the wheels never end up in a layer of the final image.
cat > "$CTX/Dockerfile" <<EOF
FROM $BASE AS build
LABEL local.prefect-image-build-stage=1
COPY wheels /wheels
RUN python3 -m venv --without-pip /opt/prefect \\
 && /opt/prefect/bin/python /wheels/$PIPWHL/pip install --no-cache-dir --no-index --find-links /wheels pip \\
 && /opt/prefect/bin/pip install --no-cache-dir --no-index --find-links /wheels "prefect==$PREFECT_VERSION" \\
 ${FASTAPI_PIN:+&& /opt/prefect/bin/pip install --no-cache-dir --no-index --find-links /wheels "fastapi==$FASTAPI_PIN" }\\
 && /opt/prefect/bin/python -c "import prefect, prefect.engine; assert prefect.__version__ == '$PREFECT_VERSION', prefect.__version__"

FROM $BASE
COPY --from=build /opt/prefect /opt/prefect
ENV PATH=/opt/prefect/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    PYTHONUNBUFFERED=1
LABEL io.prefect.version="$PREFECT_VERSION"
CMD ["python", "-m", "prefect.engine"]
EOF

t=$(now)
log "docker build -t $TAG (log: $STATE_DIR/prefect-image-build.log)"
mkdir -p "$STATE_DIR"
# The legacy builder: the docker 28 CLI has no buildx plugin here, and dockerd 20.10's BuildKit
# is reached only through buildx.
DOCKER_BUILDKIT=0 docker build --force-rm --network none -t "$TAG" "$CTX" >"$STATE_DIR/prefect-image-build.log" 2>&1 \
  || { tail -30 "$STATE_DIR/prefect-image-build.log" >&2; die "docker build failed"; }
log "built in $(since "$t")"
# The legacy builder keeps the build stage as dangling images (~375 MB): drop only those.
docker image prune -f --filter label=local.prefect-image-build-stage=1 >/dev/null || true

got=$(docker run --rm --network none "$TAG" python -c 'import prefect; print(prefect.__version__)') \
  || die "smoke test of $TAG failed"
[ "$got" = "$PREFECT_VERSION" ] || die "smoke test: prefect $got in $TAG, want $PREFECT_VERSION"
log "ready in $(since "$T0"): $TAG, prefect $got, $(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}')"
print_env
