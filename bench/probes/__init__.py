"""GPU probes: measurement and inspection tools on one shared harness (bench/README.md, "Probes")."""
