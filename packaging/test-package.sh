#!/usr/bin/env bash
# Builds the .deb and tests it for real, as root: lintian, systemd-analyze verify and security,
# dpkg -i, every installed file's path, owner and mode, the installed binary run as the unit runs
# it (packaging/installed.test.mjs), dpkg -r keeping config and data, dpkg --purge removing them.
# Cleans up after itself, so it can run twice.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "packaging/test-package.sh must run as root (it installs the package)"; exit 1; }

missing=()
command -v lintian >/dev/null 2>&1 || missing+=(lintian)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v adduser >/dev/null 2>&1 || missing+=(adduser)
command -v setpriv >/dev/null 2>&1 || missing+=(util-linux)
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing ${missing[*]} (Debian packages)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

passed=0
failed=0
ok() { echo "ok - $1"; passed=$((passed + 1)); }
not_ok() { echo "not ok - $1"; failed=$((failed + 1)); }
check() { local what=$1; shift; if "$@"; then ok "$what"; else not_ok "$what"; fi; }
mode_owner() { [ "$(stat -c '%a %U %G' "$1")" = "$2" ] || { echo "  $1: $(stat -c '%a %U %G' "$1"), want $2"; return 1; }; }

echo "== building the package"
packaging/build-deb.sh
deb=$(ls target/debian/sio-push_*.deb)

echo "== static checks"
check "lintian reports no errors" lintian --fail-on error "$deb"
lintian "$deb" | sed 's/^/  lintian: /' || true
exposure=$(systemd-analyze security --offline=true packaging/sio-push.service 2>/dev/null | sed -n 's/.*Overall exposure level for sio-push.service: \([0-9.]*\).*/\1/p')
echo "  systemd-analyze security: exposure $exposure"
check "systemd-analyze security rates the unit 2.0 or lower" awk -v e="$exposure" 'BEGIN { exit !(e != "" && e <= 2.0) }'

echo "== install"
dpkg --purge sio-push >/dev/null 2>&1 || true
check "dpkg -i installs the package" dpkg -i "$deb"
check "/usr/bin/sio-push is 755 root:root" mode_owner /usr/bin/sio-push "755 root root"
check "/etc/sio-push/config.toml is 640 root:sio-push" mode_owner /etc/sio-push/config.toml "640 root sio-push"
check "/etc/sio-push/config.toml is a conffile" sh -c "dpkg-query -W -f='\${Conffiles}' sio-push | grep -q /etc/sio-push/config.toml"
check "the unit is 644 root:root" mode_owner /usr/lib/systemd/system/sio-push.service "644 root root"
check "the man page is installed" mode_owner /usr/share/man/man1/sio-push.1.gz "644 root root"
check "copyright and changelog are installed" test -f /usr/share/doc/sio-push/copyright -a -f /usr/share/doc/sio-push/changelog.Debian.gz
check "/var/lib/sio-push is 750 sio-push:sio-push" mode_owner /var/lib/sio-push "750 sio-push sio-push"
check "the sio-push system user has no login shell" sh -c "getent passwd sio-push | grep -q ':/usr/sbin/nologin$'"
check "the installed config has the demo off" grep -q '^demo = false' /etc/sio-push/config.toml
check "systemd-analyze verify accepts the installed unit" systemd-analyze verify /usr/lib/systemd/system/sio-push.service

echo "== the installed binary, run as the unit runs it"
(cd tests/e2e && npm ci --no-audit --no-fund --loglevel=error)
if node --test --test-concurrency=1 packaging/installed.test.mjs; then ok "installed service serves and delivers"; else not_ok "installed service serves and delivers"; fi

echo "== backup, verify and restore of the installed data dir, as root (the service stopped)"
snapshot=$(mktemp -d)/data.snapshot
if [ -d /run/systemd/system ]; then systemctl stop sio-push; fi
check "sio-push backup --data-dir reads the installed data dir" \
  sio-push backup --config /etc/sio-push/config.toml --data-dir /var/lib/sio-push --output "$snapshot"
check "the backup file is 600" sh -c "[ \"\$(stat -c %a '$snapshot')\" = 600 ]"
check "sio-push verify finds no damage" sio-push verify --config /etc/sio-push/config.toml
check "sio-push restore --force replaces it" sio-push restore --config /etc/sio-push/config.toml --input "$snapshot" --force
check "the restored data dir is still 750 sio-push:sio-push" mode_owner /var/lib/sio-push "750 sio-push sio-push"
check "the restored files belong to sio-push" sh -c "[ -z \"\$(find /var/lib/sio-push ! -user sio-push)\" ]"
check "the service's user can open the restored data dir" \
  setpriv --reuid=sio-push --regid=sio-push --init-groups -- sio-push verify --config /etc/sio-push/config.toml --scratch /tmp
rm -rf /var/lib/sio-push.before-restore-* "$(dirname "$snapshot")"

echo "== upgrade (reinstall over an edited config and existing data)"
echo "# edited by the operator" >> /etc/sio-push/config.toml
check "dpkg -i over the installed package succeeds" dpkg -i "$deb"
check "the upgrade keeps the operator's config" grep -q '^# edited by the operator' /etc/sio-push/config.toml
check "the upgrade keeps the data" sh -c "[ -n \"\$(ls -A /var/lib/sio-push)\" ]"
check "the upgrade keeps the config's owner and mode" mode_owner /etc/sio-push/config.toml "640 root sio-push"

echo "== remove and purge"
check "dpkg -r removes the package" dpkg -r sio-push
check "remove keeps the config" test -f /etc/sio-push/config.toml
check "remove keeps the data" sh -c "[ -n \"\$(ls -A /var/lib/sio-push)\" ]"
check "remove leaves no binary" test ! -e /usr/bin/sio-push
check "dpkg --purge purges the package" dpkg --purge sio-push
check "purge removes the config" test ! -e /etc/sio-push
check "purge removes the data" test ! -e /var/lib/sio-push
check "purge removes the user" sh -c "! getent passwd sio-push >/dev/null"
check "purge removes the group" sh -c "! getent group sio-push >/dev/null"

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
