"""Opt-in helpers for libraries whose models need a small change for ger to fuse them
fully. Nothing here runs unless the user calls it."""
