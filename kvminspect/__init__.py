"""kvminspect: what KVM's MMU is doing inside a Linux host kernel, via drgn."""

__version__ = "0.1.0"
