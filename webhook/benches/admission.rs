//! Placeholder; the TLS keep-alive benchmark lands in a later commit.

fn main() {}
