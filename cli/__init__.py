"""The `longdoc` command (typer + rich)."""
