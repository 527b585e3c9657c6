"""Ember's builder function (handler.py), run in a namespace's sandbox: not imported by Ember."""
