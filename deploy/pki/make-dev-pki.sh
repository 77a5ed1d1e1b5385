#!/usr/bin/env bash
# make-dev-pki.sh: a throwaway development/test PKI for tvilling (NOT for production; see README.md).
#
#   make-dev-pki.sh [--force] OUTDIR
#
# Writes, with EC P-256 keys (mode 0600):
#   ca.pem/.key                 CA "tvilling-dev-ca"
#   site-a|site-b|site-c.pem/.key  CN=<site>, SAN DNS:<site>,DNS:localhost,IP:127.0.0.1, server+client auth
#   operator.pem/.key           CN=operator, client auth
# and test material:
#   other-ca.pem/.key           an unrelated CA "tvilling-other-ca"
#   other-site-a.pem/.key       CN=site-a signed by the other CA (must be rejected)
#   tenant-b.pem/.key           CN=tenant-b signed by our CA (valid, but not a site)
#   expired.pem/.key            CN=site-a signed by our CA, validity entirely in the past
# Idempotent: if OUTDIR/ca.pem exists the script does nothing unless --force is given.
set -euo pipefail

force=0
if [[ "${1:-}" == "--force" ]]; then
  force=1
  shift
fi
if [[ $# -ne 1 ]]; then
  echo "usage: $0 [--force] OUTDIR" >&2
  exit 2
fi
out=$1
if [[ -e "$out/ca.pem" && $force -eq 0 ]]; then
  exit 0
fi
command -v openssl >/dev/null || { echo "$0: openssl not found in PATH" >&2; exit 1; }
mkdir -p "$out"
umask 077
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

days=3650

newkey() {  # newkey NAME
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$out/$1.key" 2>/dev/null
  chmod 0600 "$out/$1.key"
}

newca() {  # newca NAME CN
  newkey "$1"
  openssl req -x509 -new -key "$out/$1.key" -subj "/CN=$2" -days "$days" -sha256 \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$out/$1.pem" 2>/dev/null
}

# leaf NAME CN CA EKU [SAN]
leaf() {
  local name=$1 cn=$2 ca=$3 eku=$4 san=${5:-}
  newkey "$name"
  openssl req -new -key "$out/$name.key" -subj "/CN=$cn" -out "$tmp/$name.csr" 2>/dev/null
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$eku"
    if [[ -n "$san" ]]; then echo "subjectAltName=$san"; fi
  } >"$tmp/$name.ext"
  openssl x509 -req -in "$tmp/$name.csr" -CA "$out/$ca.pem" -CAkey "$out/$ca.key" \
    -set_serial "0x$(openssl rand -hex 12)" -days "$days" -sha256 -extfile "$tmp/$name.ext" \
    -out "$out/$name.pem" 2>/dev/null
}

newca ca tvilling-dev-ca
for site in site-a site-b site-c; do
  leaf "$site" "$site" ca serverAuth,clientAuth "DNS:$site,DNS:localhost,IP:127.0.0.1"
done
leaf operator operator ca clientAuth

newca other-ca tvilling-other-ca
leaf other-site-a site-a other-ca serverAuth,clientAuth "DNS:site-a,DNS:localhost,IP:127.0.0.1"
leaf tenant-b tenant-b ca serverAuth,clientAuth "DNS:tenant-b,DNS:localhost,IP:127.0.0.1"

# expired: `openssl ca` accepts explicit start and end dates in the past (x509 -req cannot do it on 3.0).
newkey expired
openssl req -new -key "$out/expired.key" -subj "/CN=site-a" -out "$tmp/expired.csr" 2>/dev/null
mkdir -p "$tmp/ca"
: >"$tmp/ca/index.txt"
cat >"$tmp/ca.cnf" <<CNF
[ca]
default_ca = dev
[dev]
dir = $tmp/ca
database = $tmp/ca/index.txt
new_certs_dir = $tmp/ca
serial = $tmp/ca/serial
default_md = sha256
policy = any
copy_extensions = none
unique_subject = no
x509_extensions = leaf
[any]
commonName = supplied
[leaf]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth,clientAuth
subjectAltName = DNS:site-a,DNS:localhost,IP:127.0.0.1
CNF
openssl rand -hex 12 >"$tmp/ca/serial"
openssl ca -batch -config "$tmp/ca.cnf" -cert "$out/ca.pem" -keyfile "$out/ca.key" \
  -startdate 20200101000000Z -enddate 20200102000000Z -notext \
  -in "$tmp/expired.csr" -out "$out/expired.pem" >/dev/null 2>&1

chmod 0644 "$out"/*.pem
chmod 0600 "$out"/*.key
