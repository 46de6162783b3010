"""Offline side of the ranker: load data, export the encoder, train the ranker, write a release."""
