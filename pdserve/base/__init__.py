"""The base layer: types, config, environment variables, small OS helpers. Imports nothing of ours."""
