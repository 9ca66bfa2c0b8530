//! A fixture for scripts/audit: never built.
