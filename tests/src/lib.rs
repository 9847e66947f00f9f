//! Shared helpers for end-to-end tests (processes, ports, fixtures).
