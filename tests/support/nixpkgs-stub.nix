# Just enough of nixpkgs' `lib` and `pkgs` to evaluate nix/package.nix and nix/module.nix with `nix-instantiate
# --eval` where nixpkgs cannot be fetched (tests/test_packaging.py). Each stub does what nixpkgs' function does
# with the arguments those files give it, or returns its arguments (fileset, mkOption, mkIf) for the test to read.
# Not a NixOS evaluation: options are not merged and types are not checked.
# pythonNames: the Python packages to offer (pyproject's dependencies, as nixpkgs names them); any other name that
# package.nix asks for is an undefined variable, and the evaluation fails.
{ pythonNames }:

rec {
  lib = rec {
    inherit (builtins) head;
    last = list: builtins.elemAt list (builtins.length list - 1);
    toInt = builtins.fromJSON;
    splitString = sep: text: builtins.filter builtins.isString (builtins.split sep text); # sep: no regex characters
    optional = condition: x: if condition then [ x ] else [ ];
    mkIf = condition: content: { _type = "if"; inherit condition content; };
    mkOption = attrs: attrs // { _type = "option"; };
    mkEnableOption = name: mkOption { default = false; description = "Whether to enable ${name}."; };
    literalExpression = text: { _type = "literalExpression"; inherit text; };
    getExe = package: "${package.outPath}/bin/${package.meta.mainProgram}";
    types = { str = "str"; bool = "bool"; package = "package"; submodule = module: { submodule = module; }; };
    fileset = { unions = paths: paths; toSource = { root, fileset }: { inherit root fileset; }; };
    licenses.mit = "mit";
    platforms.linux = [ "x86_64-linux" "aarch64-linux" ];
  };

  python3Packages = builtins.listToAttrs (map (name: { inherit name; value = name; }) (pythonNames ++ [ "hatchling" ]))
    // { buildPythonApplication = attrs: attrs // { outPath = "/nix/store/stub-${attrs.pname}-${attrs.version}"; }; };

  pkgs = {
    formats.toml = { }: { type = "toml"; generate = name: value: "/nix/store/stub-${name}"; };
    ipxe = "/nix/store/stub-ipxe";
    callPackage = path: args: import path ({ inherit lib python3Packages; } // args);
  };
}
