"""The spec (typed sections, validation, YAML, ``--set``), the registry of parts, and plugins."""
