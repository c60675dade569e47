"""``optimum-cli mosaic prune|eval|push``: the optimum-cli plug-in of optimum-mosaic.

Installed as ``optimum/commands/register/register_mosaic.py`` (a PEP 420 namespace file that optimum-cli
imports on every start). The sub-commands and their options come from ``optimum_mosaic.commands``,
the same table as the ``optimum-mosaic`` console script, but that module (and torch behind it) is only
imported when ``mosaic`` is the command being run, so other optimum-cli commands start as fast as before.
"""

import sys

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo


def _subcommands() -> tuple:
    if sys.argv[1:2] != ["mosaic"]:
        return ()
    from optimum_mosaic.commands import SUBCOMMANDS, run

    def command_class(name, add_arguments):
        def run_command(self):
            status = run(name, self.args)
            if status:
                sys.exit(status)

        attrs = {"parse_args": staticmethod(add_arguments), "run": run_command}
        return type(f"Mosaic{name.title()}Command", (BaseOptimumCLICommand,), attrs)

    return tuple(
        CommandInfo(name=name, help=help_text, subcommand_class=command_class(name, add_arguments))
        for name, (help_text, add_arguments, _) in SUBCOMMANDS.items()
    )


class MosaicCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="mosaic", help="prune, evaluate and push models with Mosaic (optimum-mosaic)")
    SUBCOMMANDS = _subcommands()


REGISTER_COMMANDS = [MosaicCommand]
