import os

# Tests never pick up third-party plugins installed in the environment by accident.
os.environ.setdefault("KOMMANDER_DISABLE_PLUGIN_AUTOLOAD", "1")
