"""Differential testing of the reference walker and the fast engine against Bochs's VMX/EPT."""
