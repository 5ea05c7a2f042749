"""The toy world (world.py) and its two-tower VLM's pretraining (pretrain.py): the quickstart."""
