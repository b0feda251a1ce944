"""Applications: hypervisor policies written against :mod:`eptlab.hv`, one module each."""
