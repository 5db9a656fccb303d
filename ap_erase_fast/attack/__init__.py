"""Attacks on an erased model (``ap-erase attack``): does the erasure hold?

    from ap_erase_fast.attack import attack, AttackConfig
    report = attack(AttackConfig(run="outputs/my_run"))   # writes outputs/my_run/attack/

See docs/attack.md. Nothing heavy is imported until used.
"""
__all__ = ["AttackConfig", "attack"]


def __getattr__(name):
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'ap_erase_fast.attack' has no attribute {name!r}")
