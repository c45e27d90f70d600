"""Errors the training CLIs show to people: one line that names the flag or file and the fix."""


class TrainingError(Exception):
    """A problem the person running `python -m training` can fix; printed without a traceback."""


class DataFormatError(TrainingError):
    """An input file or prepared data directory is not in the expected shape."""


class ModelLoadError(TrainingError):
    """`--base` or `--model` does not point at a loadable causal language model."""
