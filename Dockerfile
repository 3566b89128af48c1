# bootserver in a container (README.md "Installing"):
#   docker build -t bootserver .
#   docker run --network host --cap-drop all --cap-add NET_BIND_SERVICE -v bootserver-data:/var/lib/bootserver bootserver
#
# `./setup container` builds it with podman as localhost/bootserver:latest (and, where no registry is reachable,
# first makes the debian:bookworm-slim it starts from out of Debian packages: mmdebstrap --variant=minbase).
# --network host: firmware finds a boot server by DHCP broadcast and fetches iPXE over TFTP, which
# answers from a new UDP port per transfer; neither survives Docker's published ports and NAT.
# The server runs as the unprivileged user `bootserver` (10001) with the config in etc/bootserver.toml
# (HTTP 80, TFTP 69, data in /var/lib/bootserver); mount your own over
# /etc/bootserver/bootserver.toml to add profiles. Other commands: `docker run --rm -v
# bootserver-data:/var/lib/bootserver bootserver nodes` (the entrypoint is `bootserver --config ...`).
FROM debian:bookworm-slim AS engine
# The TFTP transfer loop in C (bootserver/tftp/engine.c), compiled apart so that the image carries no compiler
# and this stage is rebuilt only when engine.c changes; hatch_build.py compiles it the same way for the wheel.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev python3 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY hatch_build.py ./
COPY bootserver/tftp/engine.c bootserver/tftp/
RUN python3 hatch_build.py

FROM debian:bookworm-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/bootserver/bin:$PATH

# Debian's Python 3.11 in a virtualenv of its own (Debian refuses system-wide pip installs).
# ipxe: the iPXE binaries served for chainloading (/usr/lib/ipxe). libarchive13: the library of
# libarchive-c, which writes every per-boot initrd overlay and the agent image. kmod: depmod, for
# `bootserver image build` (which also uses the base image's apt and dpkg).
# libcap2-bin only lends setcap: PXE firmware speaks TFTP to UDP port 69 only (and DHCP is 67), so the
# interpreter may bind ports below 1024 without root: a file capability, since Docker gives a non-root user
# none of the container's own. With --network host that is the host's rule, not the container's;
# `--security-opt no-new-privileges` disables file capabilities, and with it binding port 69.
# Only NET_BIND_SERVICE: a file capability the container's bounding set lacks makes exec fail.
# Debian package versions are not pinned: a security update removes the pinned version from the mirror.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ipxe libarchive13 kmod libcap2-bin \
 && setcap cap_net_bind_service=+ep "$(readlink -f /usr/bin/python3)" \
 && apt-get purge -y --auto-remove libcap2-bin \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/bootserver \
 && useradd --system --user-group --uid 10001 --home-dir /var/lib/bootserver --shell /usr/sbin/nologin bootserver \
 && install -d -o bootserver -g bootserver -m 0750 /var/lib/bootserver

WORKDIR /src
COPY pyproject.toml README.md hatch_build.py ./
COPY bootserver/ bootserver/
COPY ipxe/ ipxe/
COPY grub/ grub/
# Behind a TLS-intercepting proxy pip needs its CA: give the build the bundle as a secret (./setup does when
# $PIP_CERT is set): `--secret id=pip-cert,src=/etc/ssl/certs/ca-certificates.crt`. Not a layer of the image.
COPY --from=engine /src/bootserver/tftp/_engine.so /tmp/_engine.so
# The wheel built here is pure Python (no compiler in this stage): the engine stage's library goes beside it.
RUN --mount=type=secret,id=pip-cert \
    if [ -f /run/secrets/pip-cert ]; then export PIP_CERT=/run/secrets/pip-cert; fi \
 && pip install . && rm -rf /src/* \
 && mv /tmp/_engine.so "$(python3 -c 'import importlib.util as u; print(u.find_spec("bootserver").submodule_search_locations[0])')/tftp/"
COPY etc/bootserver.toml /etc/bootserver/bootserver.toml

# numeric, so that runtimes checking runAsNonRoot need not resolve the name
USER 10001:10001
WORKDIR /var/lib/bootserver
VOLUME /var/lib/bootserver
# HTTP (iPXE scripts, kernels, phone-home, /healthz) and TFTP; DHCP (67/udp, 4011/udp) when [dhcp] is on.
EXPOSE 80/tcp 69/udp
# podman keeps a HEALTHCHECK only in Docker's image format (`podman build --format docker`, as ./setup does).
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:80/healthz', timeout=4)"]
ENTRYPOINT ["bootserver", "--config", "/etc/bootserver/bootserver.toml"]
CMD ["serve"]
