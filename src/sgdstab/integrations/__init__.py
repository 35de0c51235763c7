"""Adapters from sgdstab's ``Monitor`` to training frameworks; each imports its framework only when imported itself."""
