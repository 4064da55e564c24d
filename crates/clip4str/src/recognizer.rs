//! High-level recognizer API (in progress).
