#!/bin/sh
# shellcheck shell=sh
# /init of the bootserver agent (packed by bootserver.image; its module docstring has the
# contract with the server: settings, overlay files, phone-home). busybox sh runs it.
#
# Steps are shell functions so that later features can add their own; anything in
# /etc/bootserver/init.d/*.sh is sourced after the phone-home, before "ready".
# /init must never exit: the kernel panics when PID 1 does.

export PATH=/bin:/sbin:/usr/bin:/usr/sbin
umask 022

CONFIG=/etc/bootserver/config.json
HOST_KEY_FILE=/etc/dropbear/dropbear_ed25519_host_key

log() { echo "bootserver agent: $*"; }

mount_basics() {
    mkdir -p /proc /sys /dev /run /tmp
    mount -t proc proc /proc
    mount -t sysfs sysfs /sys
    mount -t devtmpfs devtmpfs /dev 2>/dev/null || mdev -s
    mkdir -p /dev/pts /dev/shm
    mount -t devpts devpts /dev/pts  # dropbear's ptys
    mount -t tmpfs -o mode=0755 tmpfs /run
    # the cpio's /dev/console is hidden under devtmpfs now: reopen the real one
    exec 0</dev/console 1>/dev/console 2>&1
    echo 4 > /proc/sys/kernel/printk 2>/dev/null  # only warnings and worse on the console
}

cmdline_arg() {  # cmdline_arg NAME: the value of NAME=VALUE on the kernel command line
    # shellcheck disable=SC2013  # its words are what we want: the command line is one line
    for word in $(cat /proc/cmdline); do
        case "$word" in
            "$1"=*) echo "${word#*=}"; return 0 ;;
        esac
    done
    return 1
}

config_field() {  # config_field NAME: the string field NAME of config.json (flat fields only)
    [ -f "$CONFIG" ] || return 1
    sed -n "s/.*\"$1\"[[:space:]]*:[[:space:]]*\"\([^\"]*\)\".*/\1/p" "$CONFIG" | head -n 1
}

setting() {  # setting NAME: bootserver.NAME from the kernel command line, else NAME of config.json
    cmdline_arg "bootserver.$1" || config_field "$1"
}

read_settings() {
    [ -f "$CONFIG" ] && log "reading $CONFIG"
    URL=$(setting url)
    PEERS=$(config_field peers)  # the other replicas' base URLs, space-separated
    TOKEN=$(setting token)
    HOST_NAME=$(setting hostname)
    MAC=$(setting mac | tr 'A-F-' 'a-f:')
    if [ -n "$MAC" ] && ! echo "$MAC" | grep -qE '^([0-9a-f]{2}:){5}[0-9a-f]{2}$'; then
        log "ignoring mac $MAC: not a MAC address"
        MAC=
    fi
}

set_hostname() {
    if [ -n "$HOST_NAME" ] && ! echo "$HOST_NAME" | grep -qE '^[A-Za-z0-9][A-Za-z0-9.-]{0,62}$'; then
        log "ignoring hostname $HOST_NAME: not a host name"
        HOST_NAME=
    fi
    HOST_NAME=${HOST_NAME:-bootserver-agent}
    hostname "$HOST_NAME"
    echo "$HOST_NAME" > /etc/hostname
    printf '127.0.1.1\t%s\n' "$HOST_NAME" >> /etc/hosts
}

load_modules() {
    kver=$(uname -r)
    [ -f /etc/bootserver/modules ] || return 0
    while read -r module; do
        [ -n "$module" ] || continue
        insmod "/lib/modules/$kver/$module" || log "insmod $module failed"
    done < /etc/bootserver/modules
}

start_ssh() {  # dropbear on port 22: root, with the keys of /etc/bootserver/authorized_keys
    mkdir -p /etc/dropbear /root/.ssh
    chmod 0700 /root /root/.ssh  # dropbear ignores keys that others could have written
    if [ -s /etc/bootserver/authorized_keys ]; then
        cp /etc/bootserver/authorized_keys /root/.ssh/authorized_keys
    else
        log "no /etc/bootserver/authorized_keys: nobody can log in with SSH"
        : > /root/.ssh/authorized_keys
    fi
    chmod 0600 /root/.ssh/authorized_keys
    if ! dropbearkey -t ed25519 -f "$HOST_KEY_FILE" >/tmp/dropbearkey.log 2>&1; then
        cat /tmp/dropbearkey.log
        log "could not make an SSH host key"
        return 1
    fi
    HOST_KEY=$(dropbearkey -y -f "$HOST_KEY_FILE" | grep '^ssh-ed25519 ' | cut -d ' ' -f 1,2)
    log "SSH host key: $HOST_KEY"
    # in the foreground (-F) of a loop that restarts it; -s: keys only; -E: log on the console
    (
        while :; do
            dropbear -F -E -s -r "$HOST_KEY_FILE" -p 22 -P /run/dropbear.pid
            log "dropbear exited ($?); restarting it"
            sleep 1
        done
    ) </dev/null &
    for i in $(seq 1 100); do
        if netstat -ltn 2>/dev/null | grep -q ':22 '; then
            log "SSH server listening on port 22"
            return 0
        fi
        sleep 0.1
    done
    log "SSH server not listening on port 22"
    return 1
}

console_shell() {  # a shell on the console, again whenever it exits
    while :; do
        setsid cttyhack sh -l
        sleep 1
    done
}

find_interface() {  # the interface with MAC $1 if given, else the first ethernet one
    want=$(echo "$1" | tr 'A-F' 'a-f')
    for i in $(seq 1 50); do
        first=
        for dir in /sys/class/net/*; do
            name=${dir##*/}
            [ "$name" = lo ] && continue
            [ "$(cat "$dir/type" 2>/dev/null)" = 1 ] || continue  # ARPHRD_ETHER
            if [ -n "$want" ] && [ "$(cat "$dir/address")" = "$want" ]; then
                echo "$name"; return 0
            fi
            [ -n "$first" ] || first=$name
        done
        if [ -n "$first" ] && { [ -z "$want" ] || [ "$i" -ge 10 ]; }; then
            echo "$first"; return 0
        fi
        sleep 0.2
    done
    return 1
}

bring_up_network() {
    ip link set lo up
    IFACE=$(find_interface "$MAC")
    if [ -z "$IFACE" ]; then
        log "no ethernet interface found"
        return 1
    fi
    ip link set "$IFACE" up
    [ -n "$MAC" ] || MAC=$(cat "/sys/class/net/$IFACE/address")
    log "DHCP on $IFACE ($MAC)"
    if ! udhcpc -i "$IFACE" -n -q -t 10 -T 2 -s /etc/udhcpc/default.script \
            -x "hostname:$HOST_NAME" >/tmp/udhcpc.log 2>&1; then
        cat /tmp/udhcpc.log
        log "DHCP on $IFACE failed"
        return 1
    fi
    IP=$(ip -4 -o addr show dev "$IFACE" | sed -n 's/.* inet \([0-9.]*\).*/\1/p' | head -n 1)
    log "network up: $IFACE $IP"
}

json_string() {  # json_string TEXT: TEXT as a JSON string, quotes included
    printf '"%s"' "$(printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g')"
}

disks_json() {  # the disks worth provisioning, as a JSON array
    list=
    for dir in /sys/block/*; do
        [ -f "$dir/size" ] || continue
        name=${dir##*/}
        case "$name" in loop*|ram*|zram*|sr*|dm-*|fd*) continue ;; esac
        sectors=$(cat "$dir/size")  # always 512-byte units
        [ "${sectors:-0}" -gt 0 ] || continue
        parts=0
        for part in "$dir/$name"*; do
            [ -f "$part/partition" ] && parts=$((parts + 1))
        done
        removable=false
        [ "$(cat "$dir/removable" 2>/dev/null)" = 1 ] && removable=true
        disk="{\"name\": \"$name\", \"size_bytes\": $((sectors * 512)),"
        disk="$disk \"partitions\": $parts, \"removable\": $removable}"
        list="${list:+$list, }$disk"
    done
    echo "[$list]"
}

phone_home() {  # POST what the server needs to provision us, to it or else its peers; retry until one answers
    if [ -z "$URL" ]; then
        log "no bootserver.url (kernel command line or $CONFIG); not phoning home"
        return 1
    fi
    mac_path=$(echo "$MAC" | tr ':A-F' '-a-f')
    delay=1
    while :; do
        # the server that booted us first, then the other replicas (any of them may provision us)
        for base in $URL $PEERS; do
            phone_home_to "${base%/}/boot/$mac_path/phone-home" && return 0
            [ "$REFUSED" = 1 ] && return 1
        done
        log "no bootserver answered; retrying in ${delay}s"
        sleep "$delay"
        delay=$((delay * 2))
        [ "$delay" -le 30 ] || delay=30
    done
}

secure_boot_json() {  # true/false from the firmware's SecureBoot variable (4 attribute bytes, then 0 or 1); null: no UEFI
    var=/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c
    [ -d /sys/firmware/efi ] || { echo null; return; }
    [ -e "$var" ] || mount -t efivarfs efivarfs /sys/firmware/efi/efivars 2>/dev/null
    # its last byte (busybox od ignores -j: tail instead)
    case "$(tail -c 1 "$var" 2>/dev/null | od -An -t u1 | tr -d ' ')" in
        1) echo true ;;
        0) echo false ;;
        *) echo null ;;
    esac
}

phone_home_to() {  # phone_home_to URL: one try; sets REFUSED=1 when the server will never accept us
    target=$1
    REFUSED=0
    # made again at every try: a slow disk may have shown up since
    body="{\"mac\": \"$MAC\", \"ip\": \"$IP\", \"host_key\": $(json_string "$HOST_KEY"),"
    body="$body \"token\": $(json_string "$TOKEN"), \"kernel\": \"$(uname -r)\","
    # the SMBIOS UUID the firmware reported with our script: the server checks they are one machine
    body="$body \"uuid\": $(json_string "$(cat /sys/class/dmi/id/product_uuid 2>/dev/null)"),"
    body="$body \"secure_boot\": $(secure_boot_json), \"disks\": $(disks_json)}"
    # not wget -T: busybox 1.35's wget crashes with it (SIGSEGV, every time)
    if timeout 20 wget -q -O /tmp/phone-home.out --header 'Content-Type: application/json' \
            --post-data "$body" "$target" 2>/tmp/phone-home.err; then
        log "phoned home to $target ok"
        return 0
    fi
    error=$(grep . /tmp/phone-home.err | tail -n 1)
    error=${error#wget: }
    # busybox wget says "wget: server returned error: HTTP/1.1 403 Forbidden"
    status=$(sed -n 's/.*server returned error: HTTP\/[0-9.]* \([0-9][0-9][0-9]\).*/\1/p' /tmp/phone-home.err)
    case "$status" in
        401|403)
            log "phone-home to $target refused: $error"
            log "not trying again: the server does not accept this machine (its token?)"
            REFUSED=1
            ;;
        *) log "phone-home to $target failed: ${error:-no answer}" ;;
    esac
    return 1
}

run_hooks() {
    for hook in /etc/bootserver/init.d/*.sh; do
        [ -f "$hook" ] || continue
        log "running ${hook##*/}"
        # shellcheck source=/dev/null  # hooks come with the overlay, at boot
        . "$hook"
    done
}

stay_up() {  # the server logs in with SSH, provisions, and ends with `reboot -f`
    log "ready"
    while :; do
        sleep 3600
    done
}

mount_basics
log "starting (kernel $(uname -r))"
IFACE=
IP=
HOST_KEY=
read_settings
set_hostname
load_modules
log "modules loaded"
start_ssh
# the console is usable at once, even while the server is away
console_shell </dev/console >/dev/console 2>&1 &
bring_up_network && phone_home
run_hooks
stay_up
