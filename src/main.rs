//! The `presence-worker` binary: parse flags, set up logging, run the command.

use clap::Parser;
use presence_worker::cli::{Cli, Command, LogFormat};
use tracing_subscriber::EnvFilter;

/// mimalloc instead of the system allocator: the worker allocates per entry (the reply tree,
/// decoded events, coalesced updates) and glibc's malloc/free were about a quarter of its CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.common.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Pretty => builder.init(),
    }
    // `run` on one thread: its stream loops are joined in one task, so the pool's only
    // parallelism was redis-rs parsing replies on another thread, paid for with cross-thread
    // wake-ups; and on the 2-core machines it is sized for, Redis needs the other core (bench:
    // about 10% less worker CPU, more events/s). The other commands keep the thread pool.
    let mut runtime = match cli.command {
        Command::Run(_) => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match runtime.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("presence-worker: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(presence_worker::commands::execute(cli)) {
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
