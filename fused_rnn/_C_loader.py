"""Loads the compiled extension, with an error that says what to do."""

import importlib

import torch


def load_extension():
    try:
        importlib.import_module("fused_rnn._C")
    except ImportError as error:
        hint = ""
        if "undefined symbol" in str(error):
            hint = (
                " It was most likely compiled against another torch release than the "
                "installed one."
            )
        raise ImportError(
            f"fused_rnn's compiled extension fused_rnn._C failed to load: {error}.{hint} "
            f"Rebuild it against the installed torch {torch.__version__}: "
            "pip install --no-build-isolation --force-reinstall --no-deps <fused_rnn source>"
        ) from error
