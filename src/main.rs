//! The `presence-worker` binary: parse flags, set up logging, run the command.

use clap::Parser;
use presence_worker::cli::{Cli, LogFormat};
use tracing_subscriber::EnvFilter;

/// mimalloc instead of the system allocator: the worker allocates per entry (the reply tree,
/// decoded events, coalesced updates) and glibc's malloc/free were about a quarter of its CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.common.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Pretty => builder.init(),
    }
    match presence_worker::commands::execute(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "presence-worker: {}",
                presence_worker::redact::redact(&e.to_string())
            );
            std::process::ExitCode::FAILURE
        }
    }
}
