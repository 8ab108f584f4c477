"""Pure tensor functions (no modules, no configs): each fast op has a plain reference beside it."""
