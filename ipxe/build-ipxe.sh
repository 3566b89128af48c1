#!/usr/bin/env bash
# Build iPXE with bootserver's chain script embedded, so machines need no DHCP filename tricks:
# the binaries do `dhcp`, then `chain SERVER/boot.ipxe` (ipxe/embed.ipxe), and, for an https://
# SERVER, trust only bootserver's CA.
#
#   ipxe/build-ipxe.sh IPXE_SRC SERVER_URL [CA_CERT] [OUT_DIR]
#
#   IPXE_SRC    a checkout of iPXE's source (git clone https://github.com/ipxe/ipxe): this script
#               does not download it
#   SERVER_URL  bootserver's base URL as machines reach it, e.g. http://192.0.2.10:8080
#   CA_CERT     PEM certificate to trust for HTTPS, default /var/lib/bootserver/keys/ca.crt (bootserver
#               makes it on first start, in data_dir/keys); only used for an https:// SERVER_URL
#   OUT_DIR     where undionly.kpxe (BIOS) and ipxe.efi (x86_64 UEFI) go, default ./ipxe-build
#
# Serve the results instead of Debian's: copy them into a directory and point the config's
# [server] ipxe_dir at it. Building needs gcc, make, perl, liblzma-dev and mtools (Debian:
# apt-get install build-essential liblzma-dev mtools).
#
# HTTPS: bootserver itself serves plain HTTP; put a TLS proxy in front with a certificate issued by
# its CA. The CA key is ECDSA P-256, which only recent iPXE verifies (github.com/ipxe/ipxe issue
# 1179); older iPXE accepts only RSA chains. config/local/general.h gets DOWNLOAD_PROTO_HTTPS.
set -euo pipefail

usage() { sed -n '6,13p' "$0" >&2; exit 2; }

if [ $# -lt 2 ] || [ $# -gt 4 ]; then usage; fi
src=$1 server=${2%/} ca=${3:-/var/lib/bootserver/keys/ca.crt} out=${4:-ipxe-build}
here=$(cd "$(dirname "$0")" && pwd)

if [ ! -f "$src/src/Makefile" ] || [ ! -d "$src/src/config" ]; then
  echo "build-ipxe: $src is not an iPXE source checkout (no src/Makefile);" \
       "clone https://github.com/ipxe/ipxe and pass its path" >&2
  exit 1
fi
case $server in
  http://*) ca= ;;
  https://*)
    if [ ! -r "$ca" ]; then
      echo "build-ipxe: cannot read CA certificate $ca (bootserver makes data_dir/keys/ca.crt on first start)" >&2
      exit 1
    fi
    ca=$(cd "$(dirname "$ca")" && pwd)/$(basename "$ca") ;;
  *) echo "build-ipxe: SERVER_URL must start with http:// or https://, not $server" >&2; exit 1 ;;
esac
case $server in *[[:space:]\|\&]*) echo "build-ipxe: SERVER_URL holds a space, | or &: $server" >&2; exit 1 ;; esac

mkdir -p "$out"
out=$(cd "$out" && pwd)
embed=$out/embed.ipxe
sed "s|@SERVER@|$server|g" "$here/embed.ipxe" > "$embed"

# iPXE reads config/local/*.h after its defaults; add HTTPS once, keeping what is there.
general=$src/src/config/local/general.h
touch "$general"
grep -q '^#define DOWNLOAD_PROTO_HTTPS' "$general" || echo '#define DOWNLOAD_PROTO_HTTPS' >> "$general"

targets=(bin/undionly.kpxe bin-x86_64-efi/ipxe.efi)
make_args=(-C "$src/src" -j "$(nproc)" "EMBED=$embed")
[ -z "$ca" ] || make_args+=("TRUST=$ca")
make "${make_args[@]}" "${targets[@]}"

for target in "${targets[@]}"; do cp "$src/src/$target" "$out/"; done
echo "build-ipxe: $out/undionly.kpxe and $out/ipxe.efi chain $server/boot.ipxe${ca:+, trusting $ca}"
