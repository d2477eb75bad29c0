//! The crate's one error type. Its variants tell the caller what to do: retry, dead-letter, or stop.

/// Everything that can go wrong in the worker, the producer and the ops commands.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Redis command failed; [`Error::is_transient`] says whether retrying can help.
    #[error("redis error: {0}")]
    Redis(#[from] redis::RedisError),
    /// Redis could not be reached or refused us (the URL is shown without its password).
    #[error("cannot reach Redis at {url}: {}", describe_connect(url, source))]
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

/// Why a connection failed, in words an operator can act on. The server's own text is kept
/// for everything else; Redis never echoes a password in it.
fn describe_connect(url: &str, e: &redis::RedisError) -> String {
    if e.kind() == redis::ErrorKind::AuthenticationFailed || e.code() == Some("WRONGPASS") {
        return "authentication failed (wrong user name or password, or the user is disabled)"
            .into();
    }
    if e.code() == Some("NOAUTH") {
        return "authentication required (give a password in --redis-url or \
                --redis-password-file)"
            .into();
    }
    let text = e.to_string();
    if text.contains("invalid peer certificate") {
        return format!(
            "{text} (the server's certificate must chain to --redis-ca-file, or the system's \
             trust store, and name the host of the URL)"
        );
    }
    if url.starts_with("rediss://")
        && (e.is_connection_dropped() || text.contains("CertificateRequired"))
    {
        // TLS 1.3 servers check the client's certificate after the handshake, then hang up.
        return format!(
            "{text} (the server closed the TLS connection: if it requires client certificates, \
             give --redis-client-cert and --redis-client-key)"
        );
    }
    text
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
