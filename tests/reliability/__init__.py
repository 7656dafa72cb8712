"""Reliability (fault-injection) suite: kills, corruption, mismatches, full disks, races, bad input.

A package so that its conftest and helper modules do not shadow ``tests/conftest.py``.
"""
