"""The benchmarks' commands (`clipfuse bench`, `bench-serve`): each module has HELP, ORDER,
add_arguments(parser) and run(args), and is an entry point of the group `clipfuse.commands`."""
