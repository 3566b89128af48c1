#!/bin/sh
# shellcheck shell=sh
# udhcpc event script of the bootserver agent: configures $interface from the lease.
# udhcpc passes the lease in the environment ($interface, $ip, $router, $dns...):
# shellcheck disable=SC2154
[ -n "$1" ] || exit 1
case "$1" in
    deconfig)
        ip -4 addr flush dev "$interface"
        ip link set dev "$interface" up
        ;;
    bound|renew)
        ifconfig "$interface" "$ip" netmask "${subnet:-255.255.255.0}" \
            ${broadcast:+broadcast "$broadcast"}
        while ip route del default dev "$interface" 2>/dev/null; do :; done
        for gw in $router; do
            ip route add default via "$gw" dev "$interface" && break
        done
        : > /etc/resolv.conf
        [ -n "$domain" ] && echo "search $domain" >> /etc/resolv.conf
        for ns in $dns; do
            echo "nameserver $ns" >> /etc/resolv.conf
        done
        # the lease, for /init and hooks that want more than the address
        {
            echo "interface='$interface'"
            echo "ip='$ip'"
            echo "subnet='$subnet'"
            echo "router='$router'"
            echo "dns='$dns'"
            echo "serverid='$serverid'"
            echo "siaddr='$siaddr'"
        } > "/run/udhcpc.$interface.env"
        ;;
esac
exit 0
