#!/bin/sh
# Installs what `make bench` compares against (Debian 12): collectd's tcpconns plugin
# (collectd-core) and node_exporter 1.5 (prometheus-node-exporter), and GNU time (`time`:
# /usr/bin/time -f %M gives ss its own peak RSS, see bench/tools.py Ss). apt would start both
# services: a policy-rc.d holds them back during the install and their units are disabled
# afterwards; the benchmark starts its own instances inside its namespace.
set -u
missing=""
for p in collectd-core prometheus-node-exporter iproute2 time; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "bench deps: not root, cannot install:$missing (those tools are skipped)"; exit 0
fi
echo "bench deps: installing$missing"
policy_made=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; policy_made=1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq && apt-get install -y -qq --no-install-recommends $missing >/dev/null
rc=$?
[ -n "$policy_made" ] && rm -f /usr/sbin/policy-rc.d
for s in collectd prometheus-node-exporter; do systemctl disable --now "$s" >/dev/null 2>&1 || true; done
exit $rc
