"""Data only: prompt YAML files, a package so that installs ship them (pyproject package-data)."""
