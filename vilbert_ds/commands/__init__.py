"""`vilbert-ds` subcommands that are not training entry points."""
