"""Language models: where weights come from (``weights/``: tiny, local dir, hub, GGUF stand-in, one
module each behind a registry), the tiny model's recipe (``tiny.py``), families and hook points
(``lm.py``)."""
