"""The ``resona-adapt`` command line (`resona_adapt.cli.main.cli`); one module per subcommand.

Importing it is light: torch and transformers load only inside the command that runs.
"""
