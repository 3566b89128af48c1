# bootserver in a container (README.md "Installing"):
#   docker build -t bootserver .
#   docker run --network host -v bootserver-data:/var/lib/bootserver bootserver
#
# --network host: firmware finds a boot server by DHCP broadcast and fetches iPXE over TFTP, which
# answers from a new UDP port per transfer; neither survives Docker's published ports and NAT.
# The server runs as the unprivileged user `bootserver` with the config in etc/bootserver.toml
# (HTTP 8080, TFTP 69, data in /var/lib/bootserver); mount your own over
# /etc/bootserver/bootserver.toml to add profiles. Other commands: `docker run --rm -v
# bootserver-data:/var/lib/bootserver bootserver nodes` (the entrypoint is `bootserver --config ...`).
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# ipxe: the iPXE binaries served for chainloading (/usr/lib/ipxe). libarchive13: the library of
# libarchive-c, which writes every per-boot initrd overlay and the agent image. kmod: depmod, for
# `bootserver image build` (which also uses the base image's apt and dpkg).
# libcap2-bin only lends setcap: PXE firmware speaks TFTP to UDP port 69 only (and DHCP is 67), so the
# interpreter may bind ports below 1024 without root. With --network host that is the host's rule,
# not the container's; `--security-opt no-new-privileges` disables file capabilities, and with it
# binding port 69.
# Debian package versions are not pinned: a security update removes the pinned version from the mirror.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ipxe libarchive13 kmod libcap2-bin \
 && setcap cap_net_bind_service=+ep "$(readlink -f /usr/local/bin/python3)" \
 && apt-get purge -y --auto-remove libcap2-bin \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --user-group --uid 10001 --home-dir /var/lib/bootserver --shell /usr/sbin/nologin bootserver \
 && install -d -o bootserver -g bootserver -m 0750 /var/lib/bootserver

WORKDIR /src
COPY pyproject.toml README.md ./
COPY bootserver/ bootserver/
COPY ipxe/ ipxe/
RUN pip install --no-cache-dir . && rm -rf /src/*
COPY etc/bootserver.toml /etc/bootserver/bootserver.toml

# numeric, so that runtimes checking runAsNonRoot need not resolve the name
USER 10001:10001
WORKDIR /var/lib/bootserver
VOLUME /var/lib/bootserver
# HTTP (iPXE scripts, kernels, phone-home, /healthz) and TFTP; DHCP (67/udp) once bootserver answers it.
EXPOSE 8080/tcp 69/udp
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]
ENTRYPOINT ["bootserver", "--config", "/etc/bootserver/bootserver.toml"]
CMD ["serve"]
