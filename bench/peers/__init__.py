"""Scripts run inside a peer tool's own environment (its pins clash with ours); see Makefile `bench-peers`."""
