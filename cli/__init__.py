"""The `edje-qdrant` command line (installed as ``edje_qdrant.cli``): click commands that parse options, call the
library and print; ``main.py`` holds the commands, ``options.py`` the shared options, ``serve.py`` the HTTP server,
``render_options.py`` the --html/--grid options."""
