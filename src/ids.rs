//! Fresh event ids and wall-clock time for producers.

use std::time::{SystemTime, UNIX_EPOCH};

/// A new producer-unique event id: a UUID v7 (time-ordered, random tail).
pub fn new_event_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Milliseconds since the Unix epoch by this machine's clock.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
