"""One module per op: the Pallas TPU kernel, its ``pallas_call`` wrapper, the public function and
the jnp ``*_reference``, as in JAX's ``pallas/ops/``."""
