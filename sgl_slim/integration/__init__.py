"""The only package that imports sglang: plugin registration, backend adapter, hooks."""
