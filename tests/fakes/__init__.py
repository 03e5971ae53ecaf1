"""Fakes of external APIs that cannot run on a build machine. Each follows
the real API's documented request and response shapes."""
