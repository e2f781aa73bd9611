"""Influence methods: each fits a cached, fingerprinted artifact once and scores through the shared
scorer (``methods/base.py``)."""
