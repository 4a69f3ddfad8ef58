"""The one exception type lorakit raises for user mistakes.

Every message says what is wrong (the bad value) and how to fix it (the supported set, or the call to
make instead). Functions raise before they change anything: a refused call leaves the model as it was.
"""


class LoraError(ValueError):
    """A lorakit call was refused; the message says why and what to do instead."""
