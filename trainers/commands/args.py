"""argparse for kiln's own subcommands, failing with one line instead of usage text."""
from __future__ import annotations

import argparse


class CommandParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ValueError(message)
