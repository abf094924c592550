BEYOND=30 bash benchmarks/gpu.sh beyond OUT  # the bundled examples/models/needle-small
