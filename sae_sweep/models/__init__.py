"""Language models: loading weights (tiny, local dir, hub, GGUF stand-in), families and hook points."""
