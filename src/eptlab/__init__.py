"""eptlab: a laboratory for second-level address translation (Intel EPT / AMD NPT)."""

__version__ = "0.1.0"
