"""Tools above the library: the `remat` command, the demo, peer strategies, model specs, plots."""
