"""Command lines, thin over library functions: `python -m editcollapse.cli.<name> --help`."""
