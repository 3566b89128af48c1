# A NixOS netboot image that bootserver can provision, like its own agent image. Build it with
#   nix-build '<nixpkgs/nixos>' -I nixos-config=nix/netboot.nix \
#     -A config.system.build.kernel -A config.system.build.netbootRamdisk -A config.system.build.netbootIpxeScript
# and give bootserver a profile with the bzImage as kernel, the ramdisk's initrd as initrd, and as cmdline
# the `init=/nix/store/...-nixos-system-.../init` (and other parameters) of the built netboot.ipxe.
#
# bootserver's iPXE script adds bootserver.url=, bootserver.mac= and bootserver.token= to the kernel
# command line and a per-boot overlay initrd: the kernel unpacks it over this image's initramfs, so
# /etc/bootserver/{config.json,authorized_keys} are there in stage 1. Stage 1 then switches to a
# tmpfs root, so postMountCommands copies them into it for stage 2, where the unit below installs
# the keys, waits for sshd and phones home with the same JSON as the agent (bootserver/tools/image.py).
{ lib, pkgs, modulesPath, ... }:

{
  imports = [ (modulesPath + "/installer/netboot/netboot-minimal.nix") ];

  boot.initrd.postMountCommands = ''
    if [ -d /etc/bootserver ]; then
      mkdir -p -m 0755 $targetRoot/etc
      cp -a /etc/bootserver $targetRoot/etc/
    fi
  '';

  # Keys only (the installer profile allows root passwords); some installer profiles left sshd stopped.
  services.openssh = {
    enable = true;
    settings.PermitRootLogin = "prohibit-password";
  };
  systemd.services.sshd.wantedBy = lib.mkForce [ "multi-user.target" ];

  # What provisioning runs on the node (see bootserver/provision/disk.py), besides coreutils and util-linux;
  # openssl makes the node's TLS key and certificate request on the node (bootserver/provision/deploy.py).
  environment.systemPackages = with pkgs; [ parted dosfstools e2fsprogs openssl ];

  systemd.services.bootserver-phone-home = {
    description = "Report to bootserver: token, address, SSH host key, disks";
    wantedBy = [ "multi-user.target" ];
    wants = [ "network-online.target" "sshd.service" ];
    after = [ "network-online.target" "sshd.service" ];
    path = with pkgs; [ coreutils curl jq iproute2 ];
    serviceConfig = { Type = "oneshot"; RemainAfterExit = true; };
    script = ''
      arg() { tr ' ' '\n' < /proc/cmdline | sed -n "s/^bootserver\.$1=//p" | head -n 1; }
      conf=/etc/bootserver/config.json
      field() { if [ -f $conf ]; then jq -r --arg k "$1" '.[$k] // empty' $conf; fi; }
      url=$(arg url); url=''${url:-$(field url)}
      token=$(arg token); token=''${token:-$(field token)}
      mac=$(arg mac); mac=''${mac:-$(field mac)}; mac=$(echo "$mac" | tr 'A-F-' 'a-f:')
      if [ -z "$url" ] || [ -z "$mac" ]; then echo "no bootserver.url or bootserver.mac: not phoning home"; exit 0; fi

      # The keys the overlay brought, else the same list from the server (the token proves who asks).
      install -d -m 0700 /root/.ssh
      if [ -s /etc/bootserver/authorized_keys ]; then
        install -m 0600 /etc/bootserver/authorized_keys /root/.ssh/authorized_keys
      else
        curl -fsS --retry 10 --retry-all-errors "$url/boot/''${mac//:/-}/$token/config.json" \
          | jq -r '.authorized_keys[]' > /root/.ssh/authorized_keys
        chmod 0600 /root/.ssh/authorized_keys
      fi

      host_key=$(cut -d ' ' -f 1,2 /etc/ssh/ssh_host_ed25519_key.pub || true)
      iface=$(ip -j link | jq -r --arg m "$mac" '.[] | select(.address == $m) | .ifname' | head -n 1)
      disks() {
        for d in /sys/block/*; do
          n=''${d##*/} size=$(cat "$d/size")
          case $n in loop*|ram*|zram*|sr*|dm-*|fd*) continue ;; esac
          [ "$size" -gt 0 ] || continue
          parts=$(find -H "$d" -mindepth 2 -maxdepth 2 -name partition | wc -l)
          jq -n --arg n "$n" --argjson s "$size" --argjson p "$parts" --argjson r "$(cat "$d/removable")" \
            '{name: $n, size_bytes: ($s * 512), partitions: $p, removable: ($r == 1)}'
        done | jq -s .
      }

      delay=1
      while :; do
        ip=$(ip -j -4 addr show ''${iface:+dev "$iface"} | jq -r '[.[].addr_info[] | select(.scope == "global")][0].local // empty')
        body=$(jq -n --arg mac "$mac" --arg ip "$ip" --arg host_key "$host_key" --arg token "$token" \
          --arg kernel "$(uname -r)" --argjson disks "$(disks)" \
          --arg uuid "$(cat /sys/class/dmi/id/product_uuid 2>/dev/null || true)" \
          '{mac: $mac, ip: $ip, host_key: $host_key, token: $token, kernel: $kernel, disks: $disks, uuid: $uuid}')
        status=$(curl -sS -o /tmp/phone-home.out -w '%{http_code}' --max-time 20 \
          -H 'Content-Type: application/json' --data "$body" "$url/boot/''${mac//:/-}/phone-home" || true)
        case $status in
          2??) echo "phoned home to $url ok"; exit 0 ;;
          401|403) echo "phone-home refused ($status): $(cat /tmp/phone-home.out)"; exit 1 ;;
        esac
        echo "phone-home to $url failed (''${status:-no answer}); retrying in ''${delay}s"
        sleep $delay
        delay=$(( delay * 2 > 30 ? 30 : delay * 2 ))
      done
    '';
  };
}
