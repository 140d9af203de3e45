"""`.proto` files and their generated stubs."""
