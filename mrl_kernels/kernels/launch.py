"""Launch helpers shared by the kernel launchers and the ahead-of-time check (kernels/aot.py)."""


def split_launch_options(cfg: dict) -> tuple[dict, dict]:
    """A launcher's config split into (constexprs, launch options num_warps / num_stages / maxnreg)."""
    options = {k: cfg[k] for k in ("num_warps", "num_stages", "maxnreg") if k in cfg}
    return {k: v for k, v in cfg.items() if k not in options}, options
