"""Model definitions: plain math over injected tensor-parallel linears.

Each arch is described once by its spec (megaret/models/spec.py: `arch_spec`, `build_model`);
this package imports nothing eagerly, so the spec (and the config that consults it) loads
without megatron-core.
"""
