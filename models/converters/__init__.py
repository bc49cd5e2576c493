"""Checkpoint converters: one module per foreign format, each with ``detect(state_dict) -> bool``
and ``convert(state_dict, model) -> state_dict`` (keys renamed to ours); ``models.weights`` picks one."""
