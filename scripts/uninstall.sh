#!/bin/sh
# `make uninstall`: removes what scripts/install.sh put in place — the venv at $PREFIX,
# the unit, and the config unless it changed since `make install` wrote it (a changed
# config, and anything else in $CONFDIR such as a web config or keys, is kept).
# Same variables as install: DESTDIR, PREFIX, CONFDIR, UNITDIR.
set -eu

DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/opt/sockscope}
CONFDIR=${CONFDIR:-/etc/sockscope}
UNITDIR=${UNITDIR:-/etc/systemd/system}
SRC=$(cd "$(dirname "$0")/.." && pwd)
. "$SRC/scripts/install-common.sh"

check_paths

# Removing the files of a running or enabled service would leave a process running
# deleted code, or a dangling *.wants/ link.
if [ -z "$DESTDIR" ] && systemctl is-active --quiet sockscope.service 2>/dev/null; then
  die "sockscope.service is running: systemctl disable --now sockscope first"
fi
for link in "$DESTDIR"/etc/systemd/system/*.wants/sockscope.service \
  "$DESTDIR$UNITDIR"/*.wants/sockscope.service; do
  if [ -L "$link" ]; then
    die "sockscope.service is enabled ($link): systemctl disable --now sockscope first"
  fi
done

target=$DESTDIR$PREFIX
sum=""
if [ -e "$target" ]; then
  is_sockscope_install "$target" ||
    die "$target is not a sockscope install (no pyvenv.cfg and bin/sockscope); refusing to remove it"
  if [ -f "$target/$CONFIG_RECORD" ]; then
    sum=$(cut -d' ' -f1 "$target/$CONFIG_RECORD")
  fi
  rm -rf "$target"
  echo "uninstall: removed $PREFIX"
fi
# A build interrupted before its swap (scripts/install.sh).
rm -rf "$target.new" "$target.old"

unit=$DESTDIR$UNITDIR/sockscope.service
if [ -e "$unit" ]; then
  rm -f "$unit"
  echo "uninstall: removed $UNITDIR/sockscope.service"
  if [ -d "$unit.d" ]; then
    echo "uninstall: kept the drop-ins in $UNITDIR/sockscope.service.d"
  fi
fi

conf=$DESTDIR$CONFDIR/sockscope.yaml
if [ -e "$conf" ]; then
  if [ -n "$sum" ] && [ "$(sha256 "$conf")" = "$sum" ]; then
    rm -f "$conf"
    echo "uninstall: removed $CONFDIR/sockscope.yaml"
  else
    echo "uninstall: kept $CONFDIR/sockscope.yaml (changed since make install wrote it, or not written by it)"
  fi
fi
# Only if empty: a web config, keys or a kept config stay with their directory.
rmdir "$DESTDIR$CONFDIR" 2>/dev/null || true
if [ -z "$DESTDIR" ]; then
  echo "now: systemctl daemon-reload"
fi
