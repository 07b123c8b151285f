"""Public ops: validate the arguments, pick a backend, call it."""
