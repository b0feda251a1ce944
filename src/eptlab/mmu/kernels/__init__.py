"""numba kernels of the fast translation engine.

The rule of this package: kernels take and return numpy arrays and scalars only, never Python
objects, and hold no policy (what to do about an exit is the hypervisor's business). The loop
over a chunk of accesses lives inside :func:`run.run_chunk`. The Python side
(:mod:`eptlab.mmu.engine`) owns the state objects, packs them into the arrays described in
:mod:`layout`, and turns status codes into exit records.
"""
