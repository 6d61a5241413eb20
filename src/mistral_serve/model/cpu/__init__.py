"""Our CPU kernels (kernels.c), their bindings, and the layers and weight layouts built on them."""
