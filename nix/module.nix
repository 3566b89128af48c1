# NixOS module: services.bootserver. In configuration.nix:
#   imports = [ /path/to/bootserver/nix/module.nix ];
#   services.bootserver = { enable = true; openFirewall = true; settings.profiles = { ... }; };
# `settings` is the TOML config of README.md "Configuration", written as Nix attributes.
{ config, lib, pkgs, ... }:

let
  cfg = config.services.bootserver;
  toml = pkgs.formats.toml { };
  configFile = toml.generate "bootserver.toml" cfg.settings;
  defaultDir = cfg.dataDir == "/var/lib/bootserver"; # else made by tmpfiles, not StateDirectory
  port = listen: lib.toInt (lib.last (lib.splitString ":" listen));
  str = default: description: lib.mkOption { type = lib.types.str; inherit default description; };
in
{
  options.services.bootserver = {
    enable = lib.mkEnableOption "bootserver, the PXE/netboot boot server";

    package = lib.mkOption {
      type = lib.types.package;
      default = pkgs.callPackage ./package.nix { };
      defaultText = lib.literalExpression "pkgs.callPackage ./package.nix { }";
      description = "The bootserver package.";
    };

    dataDir = lib.mkOption {
      type = lib.types.str;
      default = "/var/lib/bootserver";
      description = "The SQLite store, the TFTP root, keys/ (SSH key and CA) and images.";
    };

    openFirewall = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Open the HTTP port (TCP), TFTP (UDP) and DHCP/proxyDHCP (UDP 67, 4011).";
    };

    settings = lib.mkOption {
      description = "bootserver's TOML configuration; see README.md \"Configuration\".";
      default = { };
      type = lib.types.submodule {
        freeformType = toml.type;
        options.server = lib.mkOption {
          default = { };
          description = "The [server] table.";
          type = lib.types.submodule {
            freeformType = toml.type;
            options = {
              http = str "0.0.0.0:80" "HTTP listen address, host:port (80, as etc/bootserver.toml).";
              tftp = str "0.0.0.0:69" "TFTP listen address, or \"off\"; PXE firmware uses port 69 only.";
              data_dir = str cfg.dataDir "Follows services.bootserver.dataDir; set that instead.";
              ipxe_dir = lib.mkOption {
                type = lib.types.str;
                default = "${pkgs.ipxe}";
                defaultText = lib.literalExpression ''"''${pkgs.ipxe}"'';
                description = "iPXE binaries served for chainloading (undionly.kpxe, ipxe.efi).";
              };
            };
          };
        };
      };
    };
  };

  config = lib.mkIf cfg.enable {
    users.users.bootserver = {
      isSystemUser = true;
      group = "bootserver";
      home = cfg.dataDir;
    };
    users.groups.bootserver = { };

    systemd.tmpfiles.rules = lib.optional (!defaultDir)
      "d ${cfg.dataDir} 0750 bootserver bootserver -";

    # The same service as systemd/bootserver.service; see there why each setting is (or is not) made.
    systemd.services.bootserver = {
      description = "bootserver PXE/netboot boot server";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      # A new configFile is a new store path in ExecStart, so a changed `settings` restarts the service
      # (SIGHUP reloads a file edited in place, which a store path never is).
      serviceConfig = {
        Type = "exec";
        ExecStart = "${lib.getExe cfg.package} --config ${configFile} serve";
        Restart = "on-failure";
        RestartSec = "5s";
        # SIGTERM to the main process only: it stops its worker processes ([server] workers) itself.
        KillMode = "mixed";
        User = "bootserver";
        Group = "bootserver";
        StateDirectory = lib.mkIf defaultDir "bootserver";
        StateDirectoryMode = "0750";
        ReadWritePaths = lib.mkIf (!defaultDir) [ cfg.dataDir ];
        WorkingDirectory = cfg.dataDir;
        UMask = "0077";
        AmbientCapabilities = [ "CAP_NET_BIND_SERVICE" "CAP_NET_RAW" ];
        CapabilityBoundingSet = [ "CAP_NET_BIND_SERVICE" "CAP_NET_RAW" ];
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        PrivateMounts = true;
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        ProtectClock = true;
        ProtectHostname = true;
        ProtectProc = "invisible";
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        LockPersonality = true;
        RemoveIPC = true;
        RestrictAddressFamilies = [ "AF_INET" "AF_INET6" "AF_UNIX" "AF_NETLINK" ];
        SystemCallArchitectures = "native";
        SystemCallFilter = [ "@system-service" "~@privileged @resources" ];
        SystemCallErrorNumber = "EPERM";
      };
    };

    networking.firewall = lib.mkIf cfg.openFirewall {
      allowedTCPPorts = [ (port cfg.settings.server.http) ];
      allowedUDPPorts = [ 67 4011 ] ++ lib.optional (cfg.settings.server.tftp != "off") (port cfg.settings.server.tftp);
    };
  };
}
