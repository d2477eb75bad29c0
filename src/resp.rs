//! A lean RESP2 connection for the hot path: the backlog's reads and the planned path's rounds.
//!
//! redis-rs parses every reply with a general parser-combinator (`combine`) and sends each
//! request through a multiplexing task: on a backlog that was about a third of the worker's CPU
//! (a 1,000-entry read cost 1.1 us per entry to parse). [`LeanConn`] is one plain connection, one
//! request at a time, with a direct RESP2 reader building the same [`redis::Value`]s. It speaks
//! only what the hot path needs: a standalone Redis over TCP or a Unix socket, RESP2, `AUTH` and
//! `SELECT`. TLS, RESP3 and clusters keep redis-rs's connections ([`eligible`]).
//!
//! Like redis-rs's connection manager it reconnects by itself: a request that fails on the
//! connection (I/O, a timeout, a reply it cannot parse) or is dropped before its reply (a
//! cancelled blocking read) leaves the connection closed, and the next request opens a new one.
//! Server error replies are values ([`redis::Value::ServerError`]), as with redis-rs.

use std::io;
use std::time::Duration;

use redis::{ConnectionAddr, RedisError, RedisResult, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Where a lean connection goes and how it logs in.
#[derive(Debug, Clone)]
enum Target {
    Tcp(String, u16),
    #[cfg(unix)]
    Unix(std::path::PathBuf),
}

/// Whether `client` can use lean connections: a standalone Redis over plain TCP or a Unix socket,
/// spoken to in RESP2.
pub fn eligible(client: &redis::Client) -> bool {
    target(client).is_some()
}

fn target(client: &redis::Client) -> Option<Target> {
    let info = client.get_connection_info();
    if info.redis_settings().protocol() != redis::ProtocolVersion::RESP2 {
        return None;
    }
    match info.addr() {
        ConnectionAddr::Tcp(host, port) => Some(Target::Tcp(host.clone(), *port)),
        #[cfg(unix)]
        ConnectionAddr::Unix(path) => Some(Target::Unix(path.clone())),
        _ => None,
    }
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    #[cfg(unix)]
    Unix(tokio::net::UnixStream),
}

impl Stream {
    async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.write_all(bytes).await,
            #[cfg(unix)]
            Stream::Unix(s) => s.write_all(bytes).await,
        }
    }

    async fn read_buf(&mut self, buf: &mut Vec<u8>) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read_buf(buf).await,
            #[cfg(unix)]
            Stream::Unix(s) => s.read_buf(buf).await,
        }
    }
}

/// How much a read asks the socket for at least (a backlog read's reply is some 160 KB).
const READ_CHUNK: usize = 64 * 1024;

/// Buffers larger than this after a request are shrunk back (one huge reply does not pin its
/// memory for the connection's life).
const KEEP_BUFFER: usize = 1024 * 1024;

/// One RESP2 connection, one request at a time (see the module docs).
pub struct LeanConn {
    target: Target,
    username: Option<String>,
    password: Option<String>,
    db: i64,
    response_timeout: Duration,
    /// The open connection; `None` after a failed or abandoned request (the next one opens a
    /// new connection).
    stream: Option<Stream>,
    out: Vec<u8>,
    input: Vec<u8>,
}

impl std::fmt::Debug for LeanConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LeanConn({:?}, db {})", self.target, self.db)
    }
}

impl LeanConn {
    /// A lean connection to `client`'s server, each request (connecting included) bounded by
    /// `response_timeout`; `None` when the client is not [`eligible`]. Connects on first use.
    pub fn new(client: &redis::Client, response_timeout: Duration) -> Option<Self> {
        let target = target(client)?;
        let settings = client.get_connection_info().redis_settings();
        Some(Self {
            target,
            username: settings.username().map(str::to_owned),
            password: settings.password().map(str::to_owned),
            db: settings.db(),
            response_timeout,
            stream: None,
            out: Vec::new(),
            input: Vec::new(),
        })
    }

    /// Sends the request in `self.out` and reads `replies` replies.
    async fn exchange(&mut self, replies: usize) -> RedisResult<Vec<Value>> {
        // Dropped before the reply (a cancelled blocking read): the connection is closed at
        // once, so that Redis unblocks it, delivers nothing more to it, and no later request
        // reads that reply.
        let mut request = Request {
            con: self,
            done: false,
        };
        let timeout = request.con.response_timeout;
        let result = match tokio::time::timeout(timeout, request.con.round(replies)).await {
            Ok(r) => r,
            Err(_) => {
                Err(io::Error::new(io::ErrorKind::TimedOut, "Redis did not reply in time").into())
            }
        };
        // After a failure the connection's state is unknown: the next request opens a new one.
        request.done = result.is_ok();
        let con = &mut *request.con;
        con.input.shrink_to(KEEP_BUFFER);
        con.out.shrink_to(KEEP_BUFFER);
        result
    }

    async fn round(&mut self, replies: usize) -> RedisResult<Vec<Value>> {
        if self.stream.is_none() {
            self.input.clear();
            self.stream = Some(self.open().await?);
        }
        let stream = self.stream.as_mut().expect("just opened");
        stream.write_all(&self.out).await?;
        read_replies(stream, &mut self.input, replies).await
    }

    /// Connects and logs in.
    async fn open(&mut self) -> RedisResult<Stream> {
        let mut stream = match &self.target {
            Target::Tcp(host, port) => {
                let s = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                s.set_nodelay(true)?;
                Stream::Tcp(s)
            }
            #[cfg(unix)]
            Target::Unix(path) => Stream::Unix(tokio::net::UnixStream::connect(path).await?),
        };
        let mut hello = Vec::new();
        let mut expected = 0;
        if let Some(password) = &self.password {
            let mut auth = redis::cmd("AUTH");
            if let Some(user) = &self.username {
                auth.arg(user);
            }
            auth.arg(password);
            auth.write_packed_command(&mut hello);
            expected += 1;
        }
        if self.db != 0 {
            redis::cmd("SELECT")
                .arg(self.db)
                .write_packed_command(&mut hello);
            expected += 1;
        }
        if expected > 0 {
            stream.write_all(&hello).await?;
            for reply in read_replies(&mut stream, &mut self.input, expected).await? {
                reply.extract_error()?;
            }
        }
        Ok(stream)
    }
}

/// Reads `replies` whole replies from `stream`, `input` holding what was read and not yet used.
async fn read_replies(
    stream: &mut Stream,
    input: &mut Vec<u8>,
    replies: usize,
) -> RedisResult<Vec<Value>> {
    let mut values = Vec::with_capacity(replies);
    let mut at = 0;
    // How far the reply at `at` is scanned (offsets from `at`): kept while more of it is read, so
    // that a large reply is scanned once, not again from its start after every read.
    let mut scanned = Scan::default();
    while values.len() < replies {
        match scan_from(&input[at..], &mut scanned)? {
            Some(_) => {
                values.push(parse(input, &mut at, 0)?);
                scanned = Scan::default();
            }
            None => {
                input.drain(..at);
                at = 0;
                input.reserve(READ_CHUNK);
                if stream.read_buf(input).await? == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "Redis closed the connection",
                    )
                    .into());
                }
            }
        }
    }
    input.drain(..at);
    Ok(values)
}

/// A request in progress on a [`LeanConn`]: unless `done`, the connection is closed when it is
/// dropped.
struct Request<'a> {
    con: &'a mut LeanConn,
    done: bool,
}

impl Drop for Request<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.con.stream = None;
        }
    }
}

impl redis::aio::ConnectionLike for LeanConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        Box::pin(async move {
            self.out.clear();
            cmd.write_packed_command(&mut self.out);
            let mut replies = self.exchange(1).await?;
            Ok(replies.pop().unwrap_or(Value::Nil))
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            self.out = pipeline.get_packed_pipeline();
            let mut replies = self.exchange(offset + count).await?;
            // A transaction's skipped replies (MULTI's OK, each QUEUED): an error there (a
            // command refused when queued) aborts it. As with redis-rs, the error's code is
            // EXECABORT (callers match on it); its message names the first refusal.
            if pipeline.is_transaction() {
                if let Some(Value::ServerError(e)) = replies[..offset]
                    .iter()
                    .find(|v| matches!(v, Value::ServerError(_)))
                {
                    let detail = RedisError::from(e.clone())
                        .to_string()
                        .replace(['\r', '\n'], " ");
                    let line = format!("-EXECABORT Transaction discarded: {detail}\r\n");
                    return match redis::parse_redis_value(line.as_bytes())?.extract_error() {
                        Err(abort) => Err(abort),
                        Ok(_) => Err(e.clone().into()),
                    };
                }
            }
            Ok(replies.split_off(offset))
        })
    }

    fn get_db(&self) -> i64 {
        self.db
    }
}

/// A lean connection or one of redis-rs's, as one [`redis::aio::ConnectionLike`].
#[derive(Debug)]
pub enum Either<L, R> {
    /// A lean connection.
    Lean(L),
    /// redis-rs's (TLS, RESP3, a cluster, or lean connections turned off).
    Redis(R),
}

impl<L, R> redis::aio::ConnectionLike for Either<L, R>
where
    L: redis::aio::ConnectionLike + Send,
    R: redis::aio::ConnectionLike + Send,
{
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        match self {
            Either::Lean(con) => con.req_packed_command(cmd),
            Either::Redis(con) => con.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        match self {
            Either::Lean(con) => con.req_packed_commands(pipeline, offset, count),
            Either::Redis(con) => con.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Either::Lean(con) => con.get_db(),
            Either::Redis(con) => con.get_db(),
        }
    }
}

/// The read connection of a stream loop: lean where [`eligible`], else redis-rs's.
pub type ReadConn = Either<LeanConn, crate::connection::Conn>;

impl ReadConn {
    /// A read connection to `client` whose requests may take up to `response_timeout`: lean
    /// when `lean` and the client is [`eligible`].
    pub async fn connect(
        client: &crate::connection::Client,
        response_timeout: Duration,
        lean: bool,
    ) -> crate::error::Result<Self> {
        if let (true, crate::connection::Client::Single(c)) = (lean, client) {
            if let Some(con) = LeanConn::new(c, response_timeout) {
                return Ok(Either::Lean(con));
            }
        }
        crate::connection::connect(client, response_timeout)
            .await
            .map(Either::Redis)
    }
}

/// A connection of the planned path's own (see `apply::planned`): lean where [`eligible`], else
/// a multiplexed connection of redis-rs.
pub type OwnConn = Either<LeanConn, redis::aio::MultiplexedConnection>;

fn protocol_error(what: &str) -> RedisError {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("invalid RESP2 reply from Redis: {what}"),
    )
    .into()
}

/// Most elements of one array and bytes of one bulk string a reply may announce (Redis's own
/// `proto-max-bulk-len` default is 512 MB).
const MAX_LEN: i64 = 512 * 1024 * 1024;

/// The line at the start of `buf` (without its CRLF) and the offset after it; `None` when the
/// line is not all there yet.
fn line(buf: &[u8]) -> Option<(&[u8], usize)> {
    let cr = buf.iter().position(|&b| b == b'\r')?;
    match buf.get(cr + 1) {
        Some(b'\n') => Some((&buf[..cr], cr + 2)),
        Some(_) => Some((&buf[..cr], usize::MAX)),
        None => None,
    }
}

fn number(digits: &[u8]) -> RedisResult<i64> {
    let (negative, digits) = match digits.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, digits),
    };
    if digits.is_empty() || digits.len() > 19 {
        return Err(protocol_error("a bad number"));
    }
    let mut n: i128 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return Err(protocol_error("a bad number"));
        }
        n = n * 10 + i128::from(d - b'0');
    }
    i64::try_from(if negative { -n } else { n })
        .map_err(|_| protocol_error("a number out of range"))
}

/// Checks that `buf` starts with one whole, well-formed RESP2 value and returns its length;
/// `None` when more bytes are needed. Allocates nothing: a reply is scanned (as it arrives) before
/// [`parse`] builds it.
#[cfg(test)]
fn scan(buf: &[u8]) -> RedisResult<Option<usize>> {
    scan_from(buf, &mut Scan::default())
}

/// Where a [`scan_from`] stopped: the offset of the first element not yet scanned, and how many
/// elements are still to come (over all the enclosing arrays).
#[derive(Debug, Clone, Copy)]
struct Scan {
    at: usize,
    left: i64,
}

impl Default for Scan {
    fn default() -> Self {
        Scan { at: 0, left: 1 }
    }
}

/// [`scan`], resumed from `state` (which `buf` must still start where it did) and leaving in it
/// where it stopped when more bytes are needed.
fn scan_from(buf: &[u8], state: &mut Scan) -> RedisResult<Option<usize>> {
    let Scan { mut at, mut left } = *state;
    while left > 0 {
        // Saved before each element: an element cut short is scanned again whole.
        *state = Scan { at, left };
        let Some(&kind) = buf.get(at) else {
            return Ok(None);
        };
        let Some((text, next)) = line(&buf[at + 1..]) else {
            return Ok(None);
        };
        if next == usize::MAX {
            return Err(protocol_error("a line without CRLF"));
        }
        let mut end = at + 1 + next;
        match kind {
            b'+' | b'-' => {}
            b':' => {
                number(text)?;
            }
            b'$' => match number(text)? {
                -1 => {}
                n if (0..=MAX_LEN).contains(&n) => {
                    let body = end + n as usize;
                    if buf.len() < body + 2 {
                        return Ok(None);
                    }
                    if &buf[body..body + 2] != b"\r\n" {
                        return Err(protocol_error("a bulk string without CRLF"));
                    }
                    end = body + 2;
                }
                _ => return Err(protocol_error("a bad bulk length")),
            },
            b'*' => match number(text)? {
                -1 => {}
                n if (0..=MAX_LEN).contains(&n) => left += n,
                _ => return Err(protocol_error("a bad array length")),
            },
            _ => return Err(protocol_error("an unknown type byte")),
        }
        at = end;
        left -= 1;
    }
    *state = Scan { at, left };
    Ok(Some(at))
}

/// How deep arrays may nest in a reply (as in redis-rs; Redis's own replies nest a few levels).
const MAX_DEPTH: usize = 100;

/// Builds the value at `buf[*at..]`, which [`scan`] found whole and well formed, the way
/// redis-rs does for RESP2, and moves `at` past it.
fn parse(buf: &[u8], at: &mut usize, depth: usize) -> RedisResult<Value> {
    let kind = buf[*at];
    let (text, next) = line(&buf[*at + 1..]).ok_or_else(|| protocol_error("a cut line"))?;
    let start = *at;
    *at += 1 + next;
    Ok(match kind {
        b'+' if text == b"OK" => Value::Okay,
        b'+' => Value::SimpleString(String::from_utf8_lossy(text).into_owned()),
        // Rare: redis-rs's own parser, so that error codes come out exactly as it makes them.
        b'-' => redis::parse_redis_value(&buf[start..*at])?,
        b':' => Value::Int(number(text)?),
        b'$' => match number(text)? {
            -1 => Value::Nil,
            len => {
                let len = len as usize;
                let bytes = buf[*at..*at + len].to_vec();
                *at += len + 2;
                Value::BulkString(bytes)
            }
        },
        _ => match number(text)? {
            -1 => Value::Nil,
            _ if depth >= MAX_DEPTH => return Err(protocol_error("arrays nested too deep")),
            len => {
                let mut items = Vec::with_capacity(len as usize);
                for _ in 0..len {
                    items.push(parse(buf, at, depth + 1)?);
                }
                Value::Array(items)
            }
        },
    })
}

#[cfg(test)]
mod tests;
