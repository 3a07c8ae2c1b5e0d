"""mtpsl: multi-task dense prediction learned from partially annotated images."""

__version__ = "0.1.0"
