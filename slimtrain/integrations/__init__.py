"""Bridges to other training loops (``slimtrain.integrations.hf`` for ``transformers.Trainer``)."""
