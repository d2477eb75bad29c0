//! Input limits: what an entry may weigh before it is dead-lettered instead of applied.

/// Limits applied to every entry read from the stream (and checked by producers before sending).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest entry, all field names and values together, in bytes.
    pub max_entry_bytes: usize,
    /// Most fields in one entry.
    pub max_fields: usize,
    /// Longest `doc`, `user` or `session`, in bytes.
    pub max_id_len: usize,
    /// Longest event `id`, in bytes.
    pub max_event_id_len: usize,
    /// Largest `meta` map, MessagePack-encoded, in bytes.
    pub max_meta_bytes: usize,
    /// Most keys in `meta`.
    pub max_meta_keys: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_entry_bytes: 64 * 1024,
            max_fields: 64,
            max_id_len: 256,
            max_event_id_len: 128,
            max_meta_bytes: 1024,
            max_meta_keys: 16,
        }
    }
}
