"""The names of the built-in networks, apart from their torch code (see the package)."""

BUILTIN = ("mlp", "cnn1d", "papercnn")
