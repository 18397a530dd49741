"""Configuration: suite descriptions (TOML) and checkpoint-suite presets.

Imports nothing else of tokendyn but errors."""
