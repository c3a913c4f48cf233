"""`python -m bench latency|sweep|report ...`"""
import sys

from . import cli_entry

sys.exit(cli_entry())
