#!/bin/sh
# mmdebstrap's customize hook for `bootserver image os debian` (bootserver/tools/osimage.py): run outside the
# chroot as `os_customize.sh ROOT` once every package is installed. It leaves what every installed machine
# shares; the install step adds what is each machine's own (fstab, hostname, network, host keys, boot loader).
# It also writes what the manifest reports into the directory $BOOTSERVER_OS_FACTS (outside the image).
set -eu
root="$1"

# networkd brings up the NIC the install configures by MAC; resolved serves /etc/resolv.conf
chroot "$root" systemctl enable systemd-networkd.service systemd-resolved.service
# nobody logs in with a password: root is reached over SSH with the provisioning key only
chroot "$root" passwd --lock root
# the server makes each machine's host key and pins it: keys made here would be shared by every machine
rm -f "$root"/etc/ssh/ssh_host_*
# empty: systemd makes a machine id on first boot, a different one on every machine
: > "$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
# mmdebstrap copied the build host's name; the install writes the machine's own
echo debian > "$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' > "$root/etc/hosts"
rm -f "$root/etc/.resolv.conf.systemd-resolved.bak"

facts="$BOOTSERVER_OS_FACTS"
dpkg-query --admindir="$root/var/lib/dpkg" -W -f='${Package}\t${Version}\n' > "$facts/packages"
ls "$root/lib/modules" > "$facts/kernels"
# apt's downloads and lists are still there: mmdebstrap removes them after this hook
du -sb --one-file-system --exclude="$root/var/cache/apt" --exclude="$root/var/lib/apt/lists" "$root" \
  | cut -f1 > "$facts/unpacked-bytes"
