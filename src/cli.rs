//! The command line: flags (also read from the environment) and the subcommands.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{GroupStart, WorkerConfig};
use crate::connection::ConnectOptions;
use crate::error::Result;

/// presence-worker: exact presence state from a Redis Stream of join/leave/heartbeat events.
#[derive(Debug, Parser)]
#[command(name = "presence-worker", version, about)]
pub struct Cli {
    /// Options every subcommand shares.
    #[command(flatten)]
    pub common: Common,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Options every subcommand shares.
#[derive(Debug, Args)]
pub struct Common {
    /// Redis URL: `redis://[user:password@]host[:port][/db]`, or `rediss://` for TLS; a Redis
    /// Cluster by its seed nodes: `redis+cluster://[user:password@]host:port[,host:port...]`
    /// (`rediss+cluster://` for TLS).
    // `hide_env_values`: `--help` would otherwise print REDIS_URL's value, password included.
    #[arg(
        long,
        env = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        hide_env_values = true,
        global = true
    )]
    pub redis_url: String,
    /// Redis ACL user (instead of the user in the URL).
    #[arg(long, env = "REDIS_USERNAME", global = true)]
    pub redis_username: Option<String>,
    /// File holding the Redis password (instead of the password in the URL); one trailing
    /// newline is stripped.
    #[arg(long, env = "REDIS_PASSWORD_FILE", global = true)]
    pub redis_password_file: Option<PathBuf>,
    /// PEM file of the CA certificates trusted for the server's certificate (`rediss://`
    /// only; default: the system's trust store).
    #[arg(long, env = "REDIS_CA_FILE", global = true)]
    pub redis_ca_file: Option<PathBuf>,
    /// PEM certificate chain presented to Redis for mutual TLS (with --redis-client-key).
    #[arg(long, env = "REDIS_CLIENT_CERT", global = true)]
    pub redis_client_cert: Option<PathBuf>,
    /// PEM private key of --redis-client-cert.
    #[arg(long, env = "REDIS_CLIENT_KEY", global = true)]
    pub redis_client_key: Option<PathBuf>,
    /// Events stream.
    #[arg(
        long,
        env = "PRESENCE_STREAM",
        default_value = "sessions:events",
        global = true
    )]
    pub stream: String,
    /// Spread events over this many streams `<stream>:{0}` ... `<stream>:{N-1}` by document
    /// (FNV-1a-32 of the document id mod N; see the README). 0: the one stream `--stream`.
    /// Workers consume every shard; producers, workers and ops commands must agree on N.
    #[arg(
        long,
        env = "PRESENCE_STREAM_SHARDS",
        default_value_t = 0,
        value_parser = clap::value_parser!(u32).range(0..=1024),
        global = true
    )]
    pub stream_shards: u32,
    /// Prefix of the state keys.
    #[arg(
        long,
        env = "PRESENCE_PREFIX",
        default_value = "sessions",
        global = true
    )]
    pub prefix: String,
    /// Log format.
    #[arg(long, env = "PRESENCE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty, global = true)]
    pub log_format: LogFormat,
}

impl Common {
    /// The security options beside the URL, for [`crate::connection::client_with`].
    pub fn connect_options(&self) -> ConnectOptions {
        ConnectOptions {
            username: self.redis_username.clone(),
            password_file: self.redis_password_file.clone(),
            ca_file: self.redis_ca_file.clone(),
            client_cert: self.redis_client_cert.clone(),
            client_key: self.redis_client_key.clone(),
        }
    }

    /// A client for `--redis-url` with the security options.
    pub fn client(&self) -> Result<crate::connection::Client> {
        crate::connection::open(&self.redis_url, &self.connect_options())
    }
}

/// How logs are written (filtered by `RUST_LOG`, default `info`).
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Consume the stream and maintain presence state until SIGTERM/SIGINT.
    Run(Box<RunArgs>),
    /// Append one event in the MessagePack form.
    Publish(PublishArgs),
    /// Print the users, the count and the sessions of a document.
    Inspect {
        /// Document id.
        doc: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List or replay dead letters.
    Dlq {
        /// Dead-letter stream.
        #[arg(
            long,
            env = "PRESENCE_DEAD_LETTER_STREAM",
            default_value = "sessions:events:dead",
            global = true
        )]
        dead_letter_stream: String,
        /// What to do.
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Show groups, consumers, lag, pending, dead letters, stream length, oldest pending age.
    Status {
        /// Dead-letter stream.
        #[arg(
            long,
            env = "PRESENCE_DEAD_LETTER_STREAM",
            default_value = "sessions:events:dead"
        )]
        dead_letter_stream: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the documents with the most users present.
    Top {
        /// How many.
        #[arg(short = 'n', long, default_value_t = 20)]
        n: usize,
    },
    /// Check every document's users, count and indexes against its sessions (dry run by default).
    Repair {
        /// Rebuild what is inconsistent.
        #[arg(long)]
        fix: bool,
        /// The workers' --history.
        #[arg(long, env = "PRESENCE_HISTORY", default_value = "10m", value_parser = duration)]
        history: Duration,
        /// The workers' --session-ttl.
        #[arg(long, env = "PRESENCE_SESSION_TTL", default_value = "90s", value_parser = duration)]
        session_ttl: Duration,
    },
    /// Print snapshot requests (`--follow`: and wait for new ones).
    Snapshots {
        /// The snapshot stream.
        #[arg(
            long,
            env = "PRESENCE_SNAPSHOT_STREAM",
            default_value = "sessions:snapshots"
        )]
        snapshot_stream: String,
        /// Keep waiting for new requests.
        #[arg(long)]
        follow: bool,
    },
    /// Print the membership changes of one document as they happen (needs --publish-changes).
    Watch {
        /// Document id.
        doc: String,
    },
    /// Benchmark the worker on this machine against its own redis-server.
    Bench(crate::bench::BenchArgs),
    /// Run a worker beside a demo producer and show presence changing (starts a local Redis when
    /// none is reachable at a loopback URL).
    Demo(crate::demo::DemoArgs),
}

/// `dlq` subcommands.
#[derive(Debug, Subcommand)]
pub enum DlqAction {
    /// Show dead letters, oldest first.
    List {
        /// Most entries shown.
        #[arg(long, default_value_t = 100)]
        count: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Move dead letters back to the events stream (all, or the given ids) after a fix.
    Replay {
        /// Dead-letter ids to replay (repeatable); default: all.
        #[arg(long = "id")]
        ids: Vec<String>,
    },
}

/// Flags of `run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Consumer group.
    #[arg(long, env = "PRESENCE_GROUP", default_value = "presence")]
    pub group: String,
    /// Consumer name, stable per replica (default: the host name).
    #[arg(long, env = "PRESENCE_CONSUMER")]
    pub consumer: Option<String>,
    /// Most entries per batch.
    #[arg(long, env = "PRESENCE_BATCH", default_value_t = 2000)]
    pub batch: usize,
    /// How long one read waits for new entries.
    #[arg(long, env = "PRESENCE_BLOCK", default_value = "2s", value_parser = duration)]
    pub block: Duration,
    /// Dead-letter stream.
    #[arg(
        long,
        env = "PRESENCE_DEAD_LETTER_STREAM",
        default_value = "sessions:events:dead"
    )]
    pub dead_letter_stream: String,
    /// How long ended sessions are remembered for ordering and de-duplication.
    #[arg(long, env = "PRESENCE_HISTORY", default_value = "10m", value_parser = duration)]
    pub history: Duration,
    /// Where a newly created group starts: `begin` (all entries) or `end` (new ones only).
    #[arg(long, env = "PRESENCE_GROUP_START", default_value = "begin", value_parser = ["begin", "end"])]
    pub group_start: String,
    /// A session not refreshed by join/heartbeat within this time expires (0: never).
    #[arg(long, env = "PRESENCE_SESSION_TTL", default_value = "90s", value_parser = duration)]
    pub session_ttl: Duration,
    /// Entries pending on another consumer longer than this are reclaimed (0: never).
    /// Must exceed the slowest batch.
    #[arg(long, env = "PRESENCE_CLAIM_IDLE", default_value = "60s", value_parser = duration)]
    pub claim_idle: Duration,
    /// An entry delivered more often than this is dead-lettered.
    #[arg(long, env = "PRESENCE_MAX_DELIVERIES", default_value_t = 5)]
    pub max_deliveries: u64,
    /// Consumers idle longer than this with nothing pending are removed from the group (0: never).
    #[arg(long, env = "PRESENCE_CONSUMER_IDLE", default_value = "1h", value_parser = duration)]
    pub consumer_idle: Duration,
    /// Trim events older than this from the stream, unless a group still needs them (0: never).
    #[arg(long, env = "PRESENCE_RETAIN", default_value = "1h", value_parser = duration)]
    pub retain: Duration,
    /// Consecutive Redis failures that open the circuit breaker (0: no breaker).
    #[arg(long, env = "PRESENCE_BREAKER_FAILURES", default_value_t = 5)]
    pub breaker_failures: u32,
    /// How long the breaker stays open before one probe (jittered up to +20%).
    #[arg(long, env = "PRESENCE_BREAKER_COOLDOWN", default_value = "5s", value_parser = duration)]
    pub breaker_cooldown: Duration,
    /// Counts that trigger a snapshot request when a document reaches them from below, e.g.
    /// `10,50,100` (default: none).
    #[arg(long, env = "PRESENCE_SNAPSHOT_THRESHOLDS", default_value = "", value_parser = crate::snapshot::parse_thresholds)]
    pub snapshot_thresholds: std::vec::Vec<u64>,
    /// A threshold re-arms only when the count falls below threshold - hysteresis.
    #[arg(long, env = "PRESENCE_SNAPSHOT_HYSTERESIS", default_value_t = 0)]
    pub snapshot_hysteresis: u64,
    /// Least time between two threshold requests of one document (0: none).
    #[arg(long, env = "PRESENCE_SNAPSHOT_COOLDOWN", default_value = "0", value_parser = duration)]
    pub snapshot_cooldown: Duration,
    /// Also request a snapshot when a document's last user leaves or expires.
    #[arg(long, env = "PRESENCE_SNAPSHOT_ON_EMPTY")]
    pub snapshot_on_empty: bool,
    /// The snapshot stream.
    #[arg(
        long,
        env = "PRESENCE_SNAPSHOT_STREAM",
        default_value = "sessions:snapshots"
    )]
    pub snapshot_stream: String,
    /// Most users listed in a snapshot request.
    #[arg(long, env = "PRESENCE_SNAPSHOT_USERS", default_value_t = 100)]
    pub snapshot_users: usize,
    /// Publish every membership change on sessions:doc:{<doc>}:presence (SPUBLISH).
    #[arg(long, env = "PRESENCE_PUBLISH_CHANGES")]
    pub publish_changes: bool,
    /// Where /metrics, /healthz and /readyz are served (`off`: nowhere).
    #[arg(long, env = "PRESENCE_HTTP_ADDR", default_value = "0.0.0.0:9464", value_parser = http_addr)]
    pub http_addr: HttpAddr,
    /// On SIGTERM/SIGINT, how long the batch in hand may still take.
    #[arg(long, env = "PRESENCE_DRAIN_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub drain_timeout: Duration,
    /// Largest entry accepted, field names and values together (bytes); larger: dead letter.
    #[arg(long, env = "PRESENCE_MAX_ENTRY_BYTES", default_value_t = 64 * 1024)]
    pub max_entry_bytes: usize,
    /// Most fields in one entry.
    #[arg(long, env = "PRESENCE_MAX_FIELDS", default_value_t = 64)]
    pub max_fields: usize,
    /// Longest doc, user or session id (bytes).
    #[arg(long, env = "PRESENCE_MAX_ID_BYTES", default_value_t = 256)]
    pub max_id_bytes: usize,
    /// Largest `meta`, MessagePack-encoded (bytes).
    #[arg(long, env = "PRESENCE_MAX_META_BYTES", default_value_t = 1024)]
    pub max_meta_bytes: usize,
    /// Most keys in `meta`.
    #[arg(long, env = "PRESENCE_MAX_META_KEYS", default_value_t = 16)]
    pub max_meta_keys: usize,
    /// Most sessions one user keeps in one document, live and ended within --history. A new
    /// session beyond it drops the user's earliest ended one, or else ends one silent for
    /// --session-ttl; when all are live and refreshed, its events are dead-lettered
    /// (`too_many_sessions`).
    #[arg(long, env = "PRESENCE_MAX_USER_SESSIONS", default_value_t = crate::apply::DEFAULT_USER_SESSIONS)]
    pub max_user_sessions: usize,
    /// Apply every document with the Lua script, never on the planned path (the worker reads
    /// under WATCH, decides, and writes in MULTI/EXEC; see the README's performance section).
    #[arg(long, env = "PRESENCE_SCRIPT_ONLY")]
    pub script_only: bool,
    /// Use redis-rs's connections for backlog reads and the planned path too, instead of the
    /// worker's lean RESP2 connections (plain TCP or Unix socket only; see the README's
    /// performance section).
    #[arg(long, env = "PRESENCE_REDIS_RS_CONNECTIONS")]
    pub redis_rs_connections: bool,
}

/// `--http-addr`: an address, or `off`.
#[derive(Debug, Clone, Copy)]
pub struct HttpAddr(pub Option<std::net::SocketAddr>);

fn http_addr(s: &str) -> std::result::Result<HttpAddr, String> {
    if s == "off" {
        return Ok(HttpAddr(None));
    }
    s.parse()
        .map(|a| HttpAddr(Some(a)))
        .map_err(|e| format!("{e} (write host:port, e.g. 0.0.0.0:9464, or off)"))
}

/// Parses a duration such as `500ms`, `5s`, `2m`, `1h`; a bare `0` is zero (off).
pub fn duration(s: &str) -> std::result::Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{e} (write durations like 500ms, 5s, 2m, 1h)"))
}

impl RunArgs {
    /// The worker configuration these flags describe.
    pub fn config(&self, common: &Common) -> WorkerConfig {
        let consumer = self.consumer.clone().unwrap_or_else(default_consumer);
        let mut c = WorkerConfig::new(&common.redis_url, consumer);
        c.connect = common.connect_options();
        c.stream.clone_from(&common.stream);
        c.stream_shards = common.stream_shards;
        c.prefix.clone_from(&common.prefix);
        c.group.clone_from(&self.group);
        c.batch = self.batch;
        c.block = self.block;
        c.dead_letter_stream.clone_from(&self.dead_letter_stream);
        c.history = self.history;
        c.session_ttl = self.session_ttl;
        c.claim_idle = self.claim_idle;
        c.max_deliveries = self.max_deliveries;
        c.consumer_idle = self.consumer_idle;
        c.retain = self.retain;
        c.drain_timeout = self.drain_timeout;
        c.limits = crate::limits::Limits {
            max_entry_bytes: self.max_entry_bytes,
            max_fields: self.max_fields,
            max_id_len: self.max_id_bytes,
            max_meta_bytes: self.max_meta_bytes,
            max_meta_keys: self.max_meta_keys,
            ..Default::default()
        };
        c.max_user_sessions = self.max_user_sessions;
        c.planned = !self.script_only;
        c.lean = !self.redis_rs_connections;
        c.http_addr = self.http_addr.0;
        c.snapshots = crate::snapshot::SnapshotConfig {
            thresholds: self.snapshot_thresholds.clone(),
            hysteresis: self.snapshot_hysteresis,
            cooldown: self.snapshot_cooldown,
            on_empty: self.snapshot_on_empty,
            stream: self.snapshot_stream.clone(),
            users_cap: self.snapshot_users,
            publish_changes: self.publish_changes,
        };
        c.breaker = crate::breaker::BreakerConfig::default()
            .with_failure_threshold(self.breaker_failures)
            .with_cooldown(self.breaker_cooldown);
        c.group_start = if self.group_start == "end" {
            GroupStart::End
        } else {
            GroupStart::Beginning
        };
        c
    }
}

/// The host name, the default consumer name.
pub fn default_consumer() -> String {
    gethostname::gethostname()
        .into_string()
        .unwrap_or_else(|_| "presence-worker".into())
}

/// Flags of `publish`.
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// `join`, `leave` or `heartbeat`.
    #[arg(value_parser = ["join", "leave", "heartbeat"])]
    pub kind: String,
    /// Document id.
    #[arg(long)]
    pub doc: String,
    /// User id.
    #[arg(long)]
    pub user: String,
    /// Session (tab) id; default: the user's single session.
    #[arg(long)]
    pub session: Option<String>,
    /// Per-session sequence number.
    #[arg(long)]
    pub seq: Option<u64>,
    /// Per-session data, `key=value`, repeatable.
    #[arg(long, value_parser = parse_meta_pair)]
    pub meta: Vec<(String, String)>,
}

fn parse_meta_pair(s: &str) -> std::result::Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected key=value, got {s:?}"))
}
