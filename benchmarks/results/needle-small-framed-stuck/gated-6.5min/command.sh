RECIPES=B WORKERS=12 MINUTES=6.5 DEADLINE=75 TEMPLATE_SAMPLES=50 TRAIN_ARGS="--framed 0.5" bash benchmarks/gpu.sh small OUT  # killed at the 600 s limit while packing the model (the logs came back)
