"""The runtime's commands (`clipfuse doctor`, `run`, `compare`, `eval`, `eval-refer`, `refer`,
`serve`, `triton-repo`): each module has HELP, ORDER, add_arguments(parser) and run(args), and is an
entry point of the group `clipfuse.commands` (pyproject.toml). Torch-free like the runtime: they
parse and call the library modules (protocol, segmenter, backends, eval/, refer/, serve/)."""
