"""Unit tests, one package per code package: no broker, no service processes, no Go tools."""
