#!/bin/sh
# `make install`: a venv at $PREFIX built from a system interpreter, the config in
# $CONFDIR (kept if changed), the unit in $UNITDIR. Every path may be staged under
# $DESTDIR: the tree is built at its staged place and every reference to that place is
# rewritten to $PREFIX, so the staged tree can be packaged or moved to $PREFIX as is.
# docs/service.md explains each step; `make uninstall` (scripts/uninstall.sh) undoes it.
#
# Environment (the Makefile passes its variables): DESTDIR, PREFIX, CONFDIR, UNITDIR,
# INSTALL_PYTHON (default /usr/bin/python3), PIP_INSTALL_ARGS (extra pip arguments,
# e.g. "--no-index --find-links /srv/wheels" for an offline build).
set -eu
umask 022  # the service's DynamicUser must read everything installed

DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/opt/sockscope}
CONFDIR=${CONFDIR:-/etc/sockscope}
UNITDIR=${UNITDIR:-/etc/systemd/system}
INSTALL_PYTHON=${INSTALL_PYTHON:-/usr/bin/python3}
PIP_INSTALL_ARGS=${PIP_INSTALL_ARGS:-}
SRC=$(cd "$(dirname "$0")/.." && pwd)
. "$SRC/scripts/install-common.sh"

check_paths
case "$INSTALL_PYTHON" in
  /*) ;;
  *) die "INSTALL_PYTHON must be an absolute path (got '$INSTALL_PYTHON'): the venv links to it" ;;
esac
[ -x "$INSTALL_PYTHON" ] || die "INSTALL_PYTHON=$INSTALL_PYTHON is not an executable"

# The venv links to the interpreter's base executable (a pyenv shim or a venv's python
# leads to its base interpreter; a symlink is kept as it is): that path, what it resolves
# to and the standard library must all be where the service can see them.
info=$("$INSTALL_PYTHON" -c 'import os, sys
exe = getattr(sys, "_base_executable", sys.executable)
print(exe); print(os.path.realpath(exe)); print(os.path.realpath(sys.base_prefix))
print("%d.%d" % sys.version_info[:2], int(sys.version_info >= (3, 11)))') ||
  die "cannot run INSTALL_PYTHON=$INSTALL_PYTHON"
base_exe=$(echo "$info" | sed -n 1p)
for p in "$base_exe" "$(echo "$info" | sed -n 2p)" "$(echo "$info" | sed -n 3p)"; do
  hidden_from_service "$p" || continue
  die "INSTALL_PYTHON=$INSTALL_PYTHON runs from $p, under /home, /root or /run/user, which the unit's ProtectHome=yes hides from the service: use a system interpreter (the default /usr/bin/python3; Debian: python3 and python3-venv)"
done
set -- $(echo "$info" | sed -n 4p)
py_version=$1 py_ok=$2
[ "$py_ok" = 1 ] || die "INSTALL_PYTHON=$INSTALL_PYTHON is Python $py_version; sockscope needs >= 3.11"
"$INSTALL_PYTHON" -c 'import ensurepip, venv' 2>/dev/null ||
  die "INSTALL_PYTHON=$INSTALL_PYTHON cannot create a venv with pip (Debian: apt-get install python3-venv)"

target=$DESTDIR$PREFIX
old_sum=""
if [ -e "$target" ]; then
  is_sockscope_install "$target" ||
    die "$target exists and is not a sockscope install (no pyvenv.cfg and bin/sockscope); refusing to replace it"
  if [ -f "$target/$CONFIG_RECORD" ]; then
    old_sum=$(cut -d' ' -f1 "$target/$CONFIG_RECORD")
  fi
fi

# Build next to the target and swap at the end: an upgrade starts from an empty venv (no
# package or script of an older release survives) and the running service keeps a
# complete tree until the rename.
build=$target.new
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rm -rf "$build"
mkdir -p "$(dirname "$build")"
"$INSTALL_PYTHON" -m venv "$build"

# A copy of the sources, so that the build (setuptools writes build/ and *.egg-info next
# to pyproject.toml) never touches the checkout.
mkdir "$work/src"
cp -R "$SRC/pyproject.toml" "$SRC/README.md" "$SRC/daemon" "$work/src/"
find "$work/src" -name __pycache__ -prune -exec rm -rf {} +
# shellcheck disable=SC2086  # PIP_INSTALL_ARGS is a list of words
"$build/bin/python" -m pip install --quiet --no-compile --no-warn-script-location \
  --disable-pip-version-check $PIP_INSTALL_ARGS "$work/src"
# pip records where it installed sockscope from (the temporary copy); meaningless later.
rm -f "$build"/lib/python3*/site-packages/sockscope-*.dist-info/direct_url.json

# Shebangs, pyvenv.cfg and the activate scripts name the build path: rewrite it to $PREFIX.
# The byte-code pip and ensurepip compiled names it too: drop it and compile again below.
find "$build" -name __pycache__ -prune -exec rm -rf {} +
"$build/bin/python" "$SRC/scripts/relocate.py" "$build" "$build" "$PREFIX"
# Byte-code with the final paths in tracebacks: the service cannot write it later
# (ProtectSystem=strict), and without it every start compiles numpy in memory.
"$build/bin/python" -m compileall -q -j 0 -d "$PREFIX/lib" "$build/lib" ||
  die "compileall failed in $build/lib"
left=$(grep -rlF -- "$build" "$build" || true)
[ -z "$left" ] || die "the build path $build is still named in: $left"

# The config: installed if absent; replaced by the new default if it is still exactly the
# one a previous `make install` wrote; otherwise (changed by hand, or not ours) kept.
conf=$DESTDIR$CONFDIR/sockscope.yaml
new_sum=$(sha256 "$SRC/config/sockscope.yaml")
install -d -m 0755 "$DESTDIR$CONFDIR"
if [ ! -e "$conf" ] || { [ -n "$old_sum" ] && [ "$(sha256 "$conf")" = "$old_sum" ]; }; then
  install -m 0644 "$SRC/config/sockscope.yaml" "$conf"
  record=$new_sum
else
  echo "install: kept $CONFDIR/sockscope.yaml (changed since install, or not installed by make install); the new default is config/sockscope.yaml"
  record=$old_sum
fi
if [ -n "$record" ]; then
  mkdir -p "$build/$(dirname "$CONFIG_RECORD")"
  echo "$record  $CONFDIR/sockscope.yaml" > "$build/$CONFIG_RECORD"
fi

if [ -e "$target" ]; then
  rm -rf "$target.old"
  mv "$target" "$target.old"
  mv "$build" "$target"
  rm -rf "$target.old"
else
  mv "$build" "$target"
fi

# The unit names the default PREFIX and CONFDIR; install it with the chosen ones.
install -d -m 0755 "$DESTDIR$UNITDIR"
sed -e "s|/opt/sockscope/|$PREFIX/|g" -e "s|/etc/sockscope/|$CONFDIR/|g" \
  "$SRC/systemd/sockscope.service" > "$work/sockscope.service"
install -m 0644 "$work/sockscope.service" "$DESTDIR$UNITDIR/sockscope.service"

echo "installed sockscope in $target (Python $py_version, $base_exe)"
if [ -z "$DESTDIR" ]; then
  echo "now: systemctl daemon-reload && systemctl enable --now sockscope"
fi
