"""Byte layouts of svcard: APDUs, BER-TLV, purse structures and the PBOC purse crypto.

This package imports nothing else of svcard; every other layer builds on it.
"""
