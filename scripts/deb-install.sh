#!/bin/sh
# Installs the Debian packages named as arguments that are missing (root only; otherwise
# says what it could not install and exits 0, so the tests that need them skip locally
# and fail under CI=true). apt would start the services some of them ship (prometheus,
# carbon-cache, collectd, node_exporter): a policy-rc.d holds them back during the install
# and their units are disabled afterwards; tests and benchmarks start their own instances.
set -u
missing=""
for p in "$@"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "deb-install: not root, cannot install:$missing"; exit 0
fi
echo "deb-install: installing$missing"
policy_made=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; policy_made=1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq && apt-get install -y -qq --no-install-recommends $missing >/dev/null
rc=$?
[ -n "$policy_made" ] && rm -f /usr/sbin/policy-rc.d
for s in prometheus carbon-cache collectd prometheus-node-exporter; do
  systemctl disable --now "$s" >/dev/null 2>&1 || true
done
exit $rc
