"""The plugin's dock widgets (each a thin QWidget over ciml_core)."""
