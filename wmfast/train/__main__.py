"""`python -m wmfast.train ...`: the entry point for torchrun and the deepspeed launcher (same flags as
`wmfast train`; the launcher's --local_rank is accepted)."""
import sys

from wmfast.cli import Parser, quiet_libraries, run_command, setup_logging
from wmfast.cli import train as command


def main(argv=None) -> int:
    parser = Parser(prog="python -m wmfast.train", description=command.__doc__.splitlines()[0])
    command.add_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of every error")
    args = parser.parse_args(argv)
    setup_logging(args.debug)
    if not args.debug:
        quiet_libraries()
    return run_command(parser.prog, command.run, args, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
