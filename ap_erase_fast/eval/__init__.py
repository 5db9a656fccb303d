"""Evaluation of erasure and preservation (``ap-erase eval``)."""
