__version__ = "0.0.1"


def __getattr__(name):
    "`diffusegen.make_synthetic` (issue 19), imported on first use: `import diffusegen` stays light (no torch)."
    if name == "make_synthetic":
        from diffusegen.synthetic import make_synthetic

        return make_synthetic
    raise AttributeError(f"module 'diffusegen' has no attribute {name!r}")
