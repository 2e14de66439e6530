"""Official `mamba_ssm.utils` module paths, so that imports written for it work with a change of package name."""
