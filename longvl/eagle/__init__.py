"""A compact Eagle 2.5: model, processor, data pipeline and the progressive long-context trainer."""
