"""On-demand fuzzing of a running `bootserver serve` over TFTP, DHCP and HTTP: `fuzz/run [--quick]`."""
