"""The `servegen` console command: `servegen <command> [flags]`, one module per command."""

import importlib
import sys

COMMANDS = {
    "start_server": ("servegen.pipeline.start_server", "start a model server and print its address"),
    "generate": ("servegen.pipeline.generate", "run a generation job over a JSONL dataset"),
    "demo-model": ("servegen.demo_model", "build (or find) the embedded demo model and print its folder"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: servegen <command> [flags]\n\ncommands:")
        for name, (_, summary) in COMMANDS.items():
            print(f"  {name:<14} {summary}")
        print("\n`servegen <command> --help` shows a command's flags.")
        return 0 if argv else 2
    # start-server and demo_model work too
    by_spelling = {name.replace("-", "_"): name for name in COMMANDS}
    name = by_spelling.get(argv[0].replace("-", "_"))
    if name is None:
        print(f"error: unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
