//! The wall clock, read one way everywhere: the serving lease, the gate's
//! lease sidecar and the file replication's freshness all compare
//! milliseconds since the Unix epoch, and must agree on how they are read.

/// Milliseconds since the Unix epoch by this node's wall clock; 0 for a
/// clock set before 1970, `u64::MAX` past the year 584 million.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
