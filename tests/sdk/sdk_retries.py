"""Counts the retries the official OpenAI SDK makes, from its own log: imported by the
scripts in this folder (run by path, so this folder is on their import path)."""

import logging


class Retries(logging.Handler):
    """Counts the log lines that begin with "Retrying": the SDK logs one or more before
    each retry (and "Not retrying" when it decides against one)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record):
        if record.getMessage().startswith("Retrying"):
            self.count += 1


def watch_retries():
    """A counter of the SDK's retries from now on."""
    retries = Retries()
    sdk_log = logging.getLogger("openai")
    sdk_log.setLevel(logging.DEBUG)
    sdk_log.addHandler(retries)
    return retries
