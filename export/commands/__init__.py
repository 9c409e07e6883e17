"""The export package's commands (`clipfuse heads`, `export`, `export-text`, `export-refer`, `build`):
each module has HELP, ORDER, add_arguments(parser) and run(args), and is an entry point of the
group `clipfuse.commands` (pyproject.toml). They parse and call the library modules beside them."""
