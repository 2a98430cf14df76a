"""Thin Lambda entry points (see the AWS stack)."""
