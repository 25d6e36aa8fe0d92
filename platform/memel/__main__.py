"""``python -m memel ...``: the ``memel`` command line where its script is not installed."""

from memel.cli import app

app(prog_name="memel")
