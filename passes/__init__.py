"""Built-in passes, one module per technique; importing this package registers them."""

from peftc.passes import generic, loha, lokr, lora, merge, nf4

__all__ = ["generic", "lora", "loha", "lokr", "merge", "nf4"]
