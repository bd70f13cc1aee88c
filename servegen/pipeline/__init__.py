"""The command-line commands (`servegen start_server`, `servegen generate`): flags, checks, dry
runs, submission."""
