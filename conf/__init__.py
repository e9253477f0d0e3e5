"""ringctl's shipped configs, as the package `ringctl.conf` (Hydra's pkg://ringctl.conf).

pyproject.toml maps this directory onto the package, so the YAML here is what a clone, an
editable install and a wheel all compose. Nothing to import: the files are the content.
"""
