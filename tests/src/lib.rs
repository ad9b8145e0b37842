//! End-to-end test helpers live in the test files themselves.
