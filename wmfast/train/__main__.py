"""`python -m wmfast.train ...`: the entry point for torchrun and the deepspeed launcher (same flags as
`wmfast train`; the launcher's --local_rank is accepted)."""
import argparse
import logging
import sys

from wmfast.cli import train as command


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wmfast.train", description=command.__doc__.splitlines()[0])
    command.add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return command.run(args)


if __name__ == "__main__":
    sys.exit(main())
