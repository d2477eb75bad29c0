//! The `presence-worker` binary: parse flags, set up logging, run the command.

use clap::Parser;
use presence_worker::cli::{Cli, Command, LogFormat};
use tracing_subscriber::EnvFilter;

/// mimalloc instead of the system allocator: the worker allocates per entry (the reply tree,
/// decoded events, coalesced updates) and glibc's malloc/free were about a quarter of its CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's option `mi_option_purge_delay`: libmimalloc-sys names no constant for it; this is its
/// number in both mimalloc 2 and 3, the sources libmimalloc-sys bundles (pinned by Cargo.lock).
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Has mimalloc return freed memory to the system after 10 ms (mimalloc 2's default) instead of
/// the bundled mimalloc 3's 1 s, unless `MIMALLOC_PURGE_DELAY` says otherwise: the worker frees a
/// batch's memory while it allocates the next one's, and with 1 s its peak RSS varied from 44 to
/// 55 MB in the benchmark (10 ms: 39-40 MB and 2.9 s of worker CPU per million events instead of
/// 2.3; 0: 36-37 MB and 3.0-3.3 s; events/s the same within noise, Redis being the bound).
fn purge_freed_memory_soon() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: mimalloc's option functions take any option and may be called at any time.
        unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, 10) };
    }
}

fn main() -> std::process::ExitCode {
    purge_freed_memory_soon();
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
