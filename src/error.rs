//! The crate's one error type. Its variants tell the caller what to do: retry, dead-letter, or stop.

/// Everything that can go wrong in the worker, the producer and the ops commands.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Redis command failed; [`Error::is_transient`] says whether retrying can help.
    #[error("redis error: {0}")]
    Redis(#[from] redis::RedisError),
    /// Redis could not be reached (the URL is shown without its password).
    #[error("cannot reach Redis at {url}: {source}")]
    Connect {
        /// The URL, redacted.
        url: String,
        /// Why.
        source: redis::RedisError,
    },
    /// The circuit breaker is open: nothing is sent to Redis for a while.
    #[error("Redis is unavailable (circuit breaker open, next try in {0:?})")]
    BreakerOpen(std::time::Duration),
    /// An entry is not a valid v1 event; the text is the dead-letter reason.
    #[error("invalid event: {0}")]
    InvalidEvent(String),
    /// A configuration value is wrong; the text names it.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Redis answered something this version does not understand.
    #[error("unexpected reply from Redis: {0}")]
    Protocol(String),
    /// Local I/O (starting a Redis for the demo, reading a file).
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// Whether the operation may succeed if retried: connection trouble, timeouts and the
    /// server states that pass (`LOADING`, `BUSY`, `TRYAGAIN`, `MASTERDOWN`, `READONLY`,
    /// `CLUSTERDOWN`). Permanent errors (`WRONGTYPE`, `NOPERM`, script errors) are not.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Redis(e) | Error::Connect { source: e, .. } => redis_is_transient(e),
            Error::Io(_) | Error::BreakerOpen(_) => true,
            _ => false,
        }
    }
}

impl Error {
    /// A short, bounded class name for metrics: `io`, `timeout`, a server error code in lower
    /// case (`loading`, `busy`, `wrongtype`, `noperm`, ...), `breaker_open`, or `other`.
    pub fn class(&self) -> &'static str {
        let e = match self {
            Error::Redis(e) | Error::Connect { source: e, .. } => e,
            Error::BreakerOpen(_) => return "breaker_open",
            Error::Io(_) => return "io",
            _ => return "other",
        };
        if e.is_timeout() {
            return "timeout";
        }
        if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
            return "io";
        }
        match e.code() {
            Some("LOADING") => "loading",
            Some("BUSY") => "busy",
            Some("TRYAGAIN") => "tryagain",
            Some("MASTERDOWN") => "masterdown",
            Some("READONLY") => "readonly",
            Some("CLUSTERDOWN") => "clusterdown",
            Some("NOSCRIPT") => "noscript",
            Some("WRONGTYPE") => "wrongtype",
            Some("NOPERM") => "noperm",
            Some("NOGROUP") => "nogroup",
            Some(c) if c.starts_with("ERR") => "err",
            _ => "other",
        }
    }
}

/// Classifies a Redis error as transient (see [`Error::is_transient`]).
pub fn redis_is_transient(e: &redis::RedisError) -> bool {
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
        return true;
    }
    matches!(
        e.code(),
        Some(
            "LOADING"
                | "BUSY"
                | "TRYAGAIN"
                | "MASTERDOWN"
                | "READONLY"
                | "CLUSTERDOWN"
                | "NOSCRIPT"
        )
    )
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
