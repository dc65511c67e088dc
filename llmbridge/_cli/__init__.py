"""The ``llmbridge`` command line: one module per subcommand, dispatched by :mod:`.main`.

A subcommand module ``llmbridge/_cli/<name>.py`` defines::

    HELP = "one line for `llmbridge --help`"

    def add_arguments(parser: argparse.ArgumentParser) -> None: ...

    def run(args: argparse.Namespace) -> int: ...  # the exit status

and is listed in :data:`llmbridge._cli.main.COMMANDS`. It is imported only when its
command runs (or ``--help`` lists it), so ``llmbridge demo`` never imports libcst and
``llmbridge migrate`` never imports Flask.
"""
