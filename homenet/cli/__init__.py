"""The `homenet` and `hnctl` commands: parse, call, print; no logic."""
