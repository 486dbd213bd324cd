#!/bin/sh
# System programs some tests drive for real, installed once before the suite runs (root + apt only):
#   chromium            web UI tests (Playwright drives /usr/bin/chromium; no browser download)
#   slapd, ldap-utils   LDAP sign-in tests against a real OpenLDAP
#   nginx-light         the shipped nginx config is run against a real nginx
#   buildah, debootstrap  the container image is built (on a debootstrapped Debian) and run
# Anything missing that cannot be installed here is reported; the fixtures then say what they need.
missing=""
[ -x /usr/bin/chromium ] || missing="$missing chromium"
[ -x /usr/sbin/slapd ] || missing="$missing slapd ldap-utils"
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing="$missing nginx-light"
command -v buildah >/dev/null 2>&1 || missing="$missing buildah"
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || missing="$missing debootstrap"
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "tests need:$missing (install them, or run as root on Debian/Ubuntu)" >&2
  exit 0
fi
echo "installing for the tests:$missing" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends $missing >/dev/null \
  || echo "warning: could not install$missing" >&2
exit 0
