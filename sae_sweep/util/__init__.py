"""Small things every stage uses: atomic files and build-once, owned locks, hub reachability, devices."""
