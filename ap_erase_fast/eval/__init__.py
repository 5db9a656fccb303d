"""Evaluation of erasure and preservation (``ap-erase eval``).

    from ap_erase_fast.eval import evaluate, EvalConfig
    report = evaluate(EvalConfig(run="outputs/my_run"))   # writes outputs/my_run/eval/

See docs/eval.md. Nothing heavy is imported until used.
"""
__all__ = ["evaluate", "EvalConfig"]


def __getattr__(name):
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'ap_erase_fast.eval' has no attribute {name!r}")
