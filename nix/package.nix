# bootserver as a Nix package: `nix-build -E 'with import <nixpkgs> { }; callPackage ./nix/package.nix { }'`.
# iPXE's binaries are not bundled: the NixOS module (module.nix) points the config's ipxe_dir at pkgs.ipxe.
# `bootserver image build` needs Debian's apt and is not for NixOS hosts: boot netboot.nix's image instead.
{ lib, python3Packages }:

python3Packages.buildPythonApplication {
  pname = "bootserver";
  # written once, in the package (pyproject.toml's version is dynamic: hatch reads it from there too)
  version = lib.head (builtins.match ''.*__version__ = "([^"]+)".*'' (builtins.readFile ../bootserver/__init__.py));
  pyproject = true;

  # Only what the wheel is built from, so that editing tests or nix/ does not rebuild it.
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [ ../pyproject.toml ../README.md ../hatch_build.py ../bootserver ../ipxe ../grub ];
  };

  build-system = [ python3Packages.hatchling ];
  dependencies = with python3Packages; [
    aiohttp
    tftpy
    jinja2
    cryptography
    asyncssh
    netaddr
    libarchive-c
    pyelftools
    prometheus-client
    psycopg
    pyghmi
    sushy
  ];

  # The test suite boots QEMU virtual machines; importing the package is the check here.
  pythonImportsCheck = [ "bootserver" "bootserver.app" ];

  meta = {
    description = "PXE/netboot boot server: from power-on to running services, with no hands";
    license = lib.licenses.mit;
    mainProgram = "bootserver";
    platforms = lib.platforms.linux;
  };
}
