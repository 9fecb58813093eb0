"""Built-in passes, one module per technique; importing this package registers them."""

from peftc.passes import generic

__all__ = ["generic"]
