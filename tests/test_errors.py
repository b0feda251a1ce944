"""Errors cross process boundaries whole (a worker of ``demo --jobs`` or of a sweep raises one
in another process): pickled and back, each keeps its class, message and fields."""

from __future__ import annotations

import pickle

import pytest

from eptlab.errors import (
    ConfigError,
    EptlabError,
    KvmError,
    RecordError,
    ReservedBitsError,
    TraceFormatError,
)


@pytest.mark.parametrize(
    "error",
    [
        ConfigError("seeds", "run at least one seed"),
        TraceFormatError("t.txt", 7, "bad size", unit="line"),
        ReservedBitsError("EPT PML4E", 1 << 3, 0b1111000),
        RecordError(["ls", "-l"], "exited 2", status=2),
        KvmError("KVM_RUN", 4, "interrupted"),
        EptlabError("plain"),
    ],
)
def test_an_error_pickles_with_its_fields(error: EptlabError) -> None:
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and str(back) == str(error)
    assert back.__dict__ == error.__dict__

