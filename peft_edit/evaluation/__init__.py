"""Scoring edits the ways the field reports them (see ``metrics``)."""
